"""The workloads of tests/benchmarks/run.py. Each builder takes a spec (a dict: kind, impl "ours" or
"diffusers", dtype, sizes, the cache folder) and returns a no-argument callable that runs the workload once;
run.py times it in a fresh process. Random weights are written once to the cache folder by write_weights():
full-size UNet, VAE and text encoders in bf16 in both layouts (the project's converters map them), a mid-size
SDXL as a diffusers folder, and a full-size fp16 single file for loading.
"""

import json
from pathlib import Path

import torch

from models.layers import channels_last
from models.text import TextEncoderConfig
from models.unet import UNetConfig
from models.vae import VAEConfig

# A mid-size SDXL for the whole text-to-image call and a training step: SDXL's layout (3 levels, attention at
# the lower two, both text encoders) at about a twentieth of its compute, so 20 steps take seconds on a CPU.
MID_CLIP_L = TextEncoderConfig(49408, 77, 256, 4, 4, 1024, "quick_gelu", None)
MID_BIGG = TextEncoderConfig(49408, 77, 512, 4, 8, 2048, "gelu", 256)
MID_UNET = UNetConfig(model_channels=128, transformer_depth=(0, 1, 2), transformer_depth_middle=2, context_dim=768,
                      adm_in_channels=256 + 6 * 256, sample_size=32)
MID_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4))


def mid_config():
    from models.sdxl import SDXLConfig

    return SDXLConfig(MID_UNET, MID_VAE, MID_CLIP_L, MID_BIGG)


# ----------------------------------------------------------------------------- weights


def random_weights(module, seed=0):
    """A state dict for `module` (built on the meta device): matrices and kernels ~ N(0, 1/fan_in), norm
    scales 1, biases 0, each tensor from its own seeded generator."""
    out = {}
    for i, (name, p) in enumerate(module.state_dict().items()):
        if p.ndim >= 2:
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            out[name] = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5)
        else:
            out[name] = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
    return out


def write_weights(cache, loading=True):
    """The cache folder's files, each written once: {unet,vae,text}_{ours,diffusers}.safetensors (bf16) and the
    diffusers configs, mid/ (a diffusers folder), and with `loading`, sdxl_fp16.safetensors + its config folder."""
    from safetensors.torch import save_file

    from models.diffusers_layout import (
        save_diffusers,
        text_config_to_hf,
        unet_config_to_diffusers,
        vae_config_to_diffusers,
    )
    from models.keys import openclip_to_hf, unet_to_diffusers, vae_to_diffusers
    from models.sdxl import SDXL
    from models.text import CLIP_L, OPENCLIP_BIGG, CLIPTextEncoder, OpenCLIPTextEncoder
    from models.unet import SDXL_BASE, UNet
    from models.vae import SDXL_VAE, AutoencoderKL

    cache.mkdir(parents=True, exist_ok=True)

    def text_encoders():
        return torch.nn.ModuleDict(dict(clip_l=CLIPTextEncoder(CLIP_L), bigg=OpenCLIPTextEncoder(OPENCLIP_BIGG)))

    def text_to_hf(sd):  # -> {"clip_l.<hf name>", "bigg.<hf name>"}
        clip_l = {k: v for k, v in sd.items() if k.startswith("clip_l.")}
        bigg = openclip_to_hf({k.removeprefix("bigg."): v for k, v in sd.items() if k.startswith("bigg.")})
        return {**clip_l, **{f"bigg.{k}": v for k, v in bigg.items()}}

    parts = [
        ("unet", lambda: UNet(SDXL_BASE), lambda sd: unet_to_diffusers(sd, SDXL_BASE.num_res_blocks),
         lambda: unet_config_to_diffusers(SDXL_BASE)),
        ("vae", lambda: AutoencoderKL(SDXL_VAE), vae_to_diffusers, lambda: vae_config_to_diffusers(SDXL_VAE)),
        ("text", text_encoders, text_to_hf, lambda: {"clip_l": text_config_to_hf(CLIP_L, torch.float32),
                                                      "bigg": text_config_to_hf(OPENCLIP_BIGG, torch.float32)}),
    ]
    for name, build, to_diffusers, config in parts:
        if (cache / f"{name}_diffusers.json").exists():
            continue
        print(f"writing random full-size {name} weights to {cache} (once)", flush=True)
        with torch.device("meta"):
            module = build()
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in random_weights(module).items()}
        save_file(sd, cache / f"{name}_ours.safetensors")
        save_file({k: v.contiguous() for k, v in to_diffusers(sd).items()}, cache / f"{name}_diffusers.safetensors")
        (cache / f"{name}_diffusers.json").write_text(json.dumps(config()))
    if not (cache / "mid").exists():
        torch.manual_seed(0)
        model = SDXL(mid_config())
        with torch.no_grad():  # images that are not saturated, as tests/test_pipeline_parity.py's
            model.vae.decoder.conv_out.weight.mul_(0.3)
        save_diffusers(model, cache / "mid")
    if loading and not (cache / "sdxl_fp16.safetensors").exists():
        print(f"writing a random full-size fp16 single file to {cache} (once, 6.9 GB)", flush=True)
        write_random_checkpoint(cache / "sdxl_fp16.safetensors")
        write_config_folder(cache / "sdxl_config")


def write_random_checkpoint(path):
    """A random full-size SDXL base single file in fp16 (2515 tensors, 6.9 GB), from the official manifest."""
    from safetensors.torch import save_file

    shapes = json.loads((Path(__file__).parents[1] / "sdxl-keys" / "sd_xl_base_single_file.json").read_text())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            tensors[name] = torch.arange(shape[-1]).reshape(shape)  # int64, as in the official file
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).half()
    save_file(tensors, path)


def write_config_folder(folder):
    """The configs (no weights) diffusers needs to interpret the single file offline."""
    from models.diffusers_layout import (
        model_index,
        text_config_to_hf,
        unet_config_to_diffusers,
        vae_config_to_diffusers,
    )
    from models.sdxl import BASE, SDXL_SCHEDULER_CONFIG
    from models.tokenizer import load_tokenizers, save_tokenizers

    configs = {
        "unet": unet_config_to_diffusers(BASE.unet), "vae": vae_config_to_diffusers(BASE.vae),
        "text_encoder": text_config_to_hf(BASE.text_encoder_1, torch.float16),
        "text_encoder_2": text_config_to_hf(BASE.text_encoder_2, torch.float16),
    }
    for name, config in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps(model_index(BASE)))
    save_tokenizers(*load_tokenizers(), folder)


def assign(module, path, dtype, prefix=""):
    """Load a meta-device module's weights (those under `prefix` in the file), one tensor at a time, cast to dtype."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        sd = {k.removeprefix(prefix): f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix)}
    names = module.state_dict().keys()  # transformers 5 keeps CLIPTextModel's keys without "text_model."
    sd = {k if k in names else k.removeprefix("text_model."): v for k, v in sd.items()}
    module.load_state_dict(sd, assign=True)
    return module.eval()


def public(config):
    """A diffusers config.json's entries without its "_class_name"-style metadata: the constructor's arguments."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def diffusers_config(cache, name):
    return public(json.loads((cache / f"{name}_diffusers.json").read_text()))


def size_ids(resolution, n):
    """(n, 6) SDXL micro-conditioning for an unscaled, uncropped square image: original, crop, target."""
    return torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * n, dtype=torch.float32)


# ----------------------------------------------------------------------------- builders


def build_unet(spec, dtype):
    """One UNet forward on a CFG batch: the tiny config (random init, seed 0) or full SDXL (the cache's weights)."""
    from models.conditioning import vector_condition
    from models.diffusers_layout import unet_config_to_diffusers
    from models.keys import unet_to_diffusers
    from models.unet import SDXL_BASE, TINY, UNet

    cfg = SDXL_BASE if spec["size"] == "full" else TINY
    cache = Path(spec["cache"])
    if spec["size"] == "full":
        with torch.device("meta"):
            ours = UNet(cfg)
        state = None
    else:
        torch.manual_seed(0)
        ours = UNet(cfg)
        state = ours.state_dict()
    n, r = spec["batch"], spec["resolution"] // 8
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, 4, r, r, generator=g).to(dtype), torch.full((n,), 500.0)
    context = torch.randn(n, 77, cfg.context_dim, generator=g).to(dtype)
    pooled = torch.randn(n, cfg.adm_in_channels - 6 * cfg.micro_cond_dim, generator=g).to(dtype)
    time_ids = size_ids(spec["resolution"], n)
    if spec["impl"] == "ours":
        net = assign(ours, cache / "unet_ours.safetensors", dtype) if state is None else ours.to(dtype).eval()
        channels_last(net)  # as Pipeline.load does on the CPU
        if spec.get("compile"):
            net.compile()  # the warm-up call compiles
        y = vector_condition(pooled, time_ids, cfg.micro_cond_dim).to(dtype)
        return lambda: net(x, t, context, y)
    from diffusers import UNet2DConditionModel

    config = public(unet_config_to_diffusers(cfg))
    if state is None:
        with torch.device("meta"):
            net = UNet2DConditionModel(**config)
        net = assign(net, cache / "unet_diffusers.safetensors", dtype)
    else:
        del ours
        net = UNet2DConditionModel(**config)
        net.load_state_dict(unet_to_diffusers(state, cfg.num_res_blocks))
        net = net.to(dtype).eval()
    if spec.get("compile"):
        net.compile()
    added = {"text_embeds": pooled, "time_ids": time_ids.to(dtype)}
    return lambda: net(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def build_vae(spec, dtype):
    """The full-size VAE decoding one latent to spec["resolution"]² pixels."""
    from models.vae import SDXL_VAE, AutoencoderKL

    cache = Path(spec["cache"])
    r = spec["resolution"] // 8
    z = torch.randn(1, 4, r, r, generator=torch.Generator().manual_seed(1)).to(dtype)
    if spec["impl"] == "ours":
        with torch.device("meta"):
            vae = AutoencoderKL(SDXL_VAE)
        vae = assign(vae, cache / "vae_ours.safetensors", dtype)
        channels_last(vae)  # as Pipeline.load does on the CPU
        return lambda: vae.decode(z)
    from diffusers import AutoencoderKL as DiffusersVAE

    with torch.device("meta"):
        vae = DiffusersVAE(**diffusers_config(cache, "vae"))
    vae = assign(vae, cache / "vae_diffusers.safetensors", dtype)
    return lambda: vae.decode(z).sample


def build_text(spec, dtype):
    """Both full-size text encoders on a batch of 2 prompts (77 tokens each): what a CFG generation encodes.
    transformers' side asks for every hidden state, as diffusers' SDXL pipeline does to read the penultimate."""
    from models.text import CLIP_L, OPENCLIP_BIGG, CLIPTextEncoder, OpenCLIPTextEncoder

    cache = Path(spec["cache"])
    g = torch.Generator().manual_seed(1)
    tokens = torch.cat([torch.full((2, 1), 49406), torch.randint(256, 49406, (2, 40), generator=g),
                        torch.full((2, 36), 49407)], dim=1)  # BOS, 40 words, EOS + pads: (2, 77)
    if spec["impl"] == "ours":
        with torch.device("meta"):
            clip_l, bigg = CLIPTextEncoder(CLIP_L), OpenCLIPTextEncoder(OPENCLIP_BIGG)
        clip_l = assign(clip_l, cache / "text_ours.safetensors", dtype, "clip_l.")
        bigg = assign(bigg, cache / "text_ours.safetensors", dtype, "bigg.")
        return lambda: (clip_l(tokens), bigg(tokens))
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = diffusers_config(cache, "text")
    models = []
    for name, cls in [("clip_l", CLIPTextModel), ("bigg", CLIPTextModelWithProjection)]:
        with torch.device("meta"):
            model = cls(CLIPTextConfig(**{k: v for k, v in configs[name].items() if k != "architectures"}))
        model = assign(model, cache / "text_diffusers.safetensors", dtype, f"{name}.")
        for module in model.modules():  # a buffer the file does not hold: rebuild it off the meta device
            if "position_ids" in module._buffers:
                module.position_ids = torch.arange(module.position_ids.shape[-1])[None]
        models.append(model)
    return lambda: [m(tokens, output_hidden_states=True).hidden_states[-2] for m in models]


PROMPT = dict(prompt="1girl, solo, looking at viewer, cherry blossoms", negative_prompt="lowres, bad anatomy")


def build_pipeline(spec, dtype):
    """The whole text-to-image call: encode, spec["steps"] (default 20) Euler steps at CFG 5, decode -> an image;
    on the mid-size model (a diffusers folder) or, with size "full", the full-size fp16 single file in spec's dtype."""
    cache, steps = Path(spec["cache"]), spec.get("steps", 20)
    full = spec.get("size") == "full"
    size = dict(width=spec["resolution"], height=spec["resolution"])
    if spec["impl"] == "ours":
        from sampling.pipeline import Pipeline, Settings

        pipe = Pipeline.load(cache / ("sdxl_fp16.safetensors" if full else "mid"), dtype=spec["dtype"])
        settings = Settings(**PROMPT, **size, steps=steps, cfg=5.0, sampler="euler", seed=0)
        return lambda: pipe(settings, progress=False)
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if full:
        pipe = StableDiffusionXLPipeline.from_single_file(cache / "sdxl_fp16.safetensors", config=str(cache / "sdxl_config"),
                                                          local_files_only=True, torch_dtype=dtype, add_watermarker=False)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(cache / "mid", add_watermarker=False, torch_dtype=dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return lambda: pipe(**PROMPT, **size, num_inference_steps=steps, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(0)).images


def build_train_step(spec, dtype):
    """One DreamBooth step of a UNet (tiny or mid config; 1 instance + 1 class latent): forward, MSE to the noise,
    backward, AdamW step, gradients freed, optionally with gradient checkpointing. Same weights on both sides."""
    from models.conditioning import vector_condition
    from models.diffusers_layout import unet_config_to_diffusers
    from models.keys import unet_to_diffusers
    from models.unet import TINY, UNet

    cfg = TINY if spec["size"] == "tiny" else MID_UNET
    torch.manual_seed(0)
    ours = UNet(cfg)
    n, r = 2, spec["resolution"] // 8
    x, noise = torch.randn(n, 4, r, r), torch.randn(n, 4, r, r)
    t = torch.randint(0, 1000, (n,)).float()
    context, pooled = torch.randn(n, 77, cfg.context_dim), torch.randn(n, cfg.adm_in_channels - 6 * cfg.micro_cond_dim)
    time_ids = size_ids(spec["resolution"], n)
    if spec["impl"] == "diffusers":
        from diffusers import UNet2DConditionModel

        net = UNet2DConditionModel(**public(unet_config_to_diffusers(cfg)))
        net.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg.num_res_blocks))
        del ours
        if spec["checkpointing"]:
            net.enable_gradient_checkpointing()
        added = {"text_embeds": pooled, "time_ids": time_ids}
        forward = lambda: net(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    else:
        net = ours
        net.gradient_checkpointing = spec["checkpointing"]
        y = vector_condition(pooled, time_ids, cfg.micro_cond_dim)
        forward = lambda: net(x, t, context, y)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)

    def step():
        torch.nn.functional.mse_loss(forward(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_load(spec, dtype):
    """Loading the full-size fp16 single file as spec["dtype"] (every weight read once: safetensors maps the
    file, so untouched weights would not be resident yet). The callable returns the weights' bytes."""
    path, config = Path(spec["cache"]) / "sdxl_fp16.safetensors", Path(spec["cache"]) / "sdxl_config"

    def touch(params):
        return sum(float(p.float().sum()) * 0 + p.numel() * p.element_size() for p in params)

    if spec["impl"] == "ours":
        from models.loading import load

        return lambda: touch(load(path, dtype=spec["dtype"]).parameters())
    from diffusers import StableDiffusionXLPipeline

    def load_diffusers():
        pipe = StableDiffusionXLPipeline.from_single_file(path, config=str(config), local_files_only=True,
                                                          torch_dtype=dtype)
        return touch(p for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())

    return load_diffusers


BUILDERS = {"unet": build_unet, "vae": build_vae, "text": build_text, "pipeline": build_pipeline,
            "train": build_train_step, "load": build_load}
