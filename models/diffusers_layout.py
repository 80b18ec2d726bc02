"""Reading and writing diffusers-layout folders (unet/, vae/, text_encoder/, text_encoder_2/, ...).

The architecture comes from each component's config.json, translated here to our config dataclasses
(and back when saving); tensor names go through models.keys, the one name map. Whether the UNet
predicts eps or v, and on which betas, comes from scheduler/scheduler_config.json.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import keys, text, unet, vae
from models.files import DTYPES, LoadError, atomic_folder, check_destination, open_safetensors, read_tensors
from models.sdxl import SDXL, SDXLConfig, scheduler_config
from models.single_file import assign, check_finite, check_tensors, state_dicts
from models.tokenizer import load_tokenizers, save_tokenizers

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")

# ----------------------------------------------------------------------------- configs


def _uniform(values, what):
    if len(set(values)) != 1:
        raise LoadError(f"this model has {what} {list(values)}, which plainxl's SDXL config cannot express.")
    return values[0]


def unet_config_from_diffusers(d):
    channels = d["block_out_channels"]
    if not channels:
        raise ValueError("block_out_channels is empty: a UNet needs at least one level")
    levels, R = len(channels), d["layers_per_block"]
    if d.get("addition_embed_type") != "text_time" or not d.get("use_linear_projection", False):
        raise LoadError("the UNet config is not SDXL's (addition_embed_type 'text_time', linear projections).")
    per_level = d.get("transformer_layers_per_block", 1)
    per_level = [per_level] * levels if isinstance(per_level, int) else per_level
    per_level = [_uniform(x, "attention depths within a level") if isinstance(x, list) else x for x in per_level]
    attn_down = ["CrossAttn" in t for t in d["down_block_types"]]
    attn_up = ["CrossAttn" in t for t in d["up_block_types"]]
    reverse = d.get("reverse_transformer_layers_per_block") or list(reversed(per_level))
    reverse = [x if isinstance(x, list) else [x] * (R + 1) for x in reverse]
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers' misnomer: head counts
    heads = [heads] * levels if isinstance(heads, int) else heads
    if min(heads) < 1:
        raise ValueError(f"attention head counts {heads} must be positive")
    context = d["cross_attention_dim"]
    return unet.UNetConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels), num_res_blocks=R,
        transformer_depth=tuple(n if a else 0 for n, a in zip(per_level, attn_down)),
        transformer_depth_middle=per_level[-1],
        transformer_depth_output=tuple(n if a else 0 for level, a in zip(reverse, attn_up) for n in level),
        context_dim=_uniform(context, "cross-attention widths") if isinstance(context, list) else context,
        adm_in_channels=d["projection_class_embeddings_input_dim"], micro_cond_dim=d["addition_time_embed_dim"],
        head_channels=_uniform([c // h for c, h, a in zip(channels, heads, attn_down) if a], "head widths"),
        norm_groups=d.get("norm_num_groups", 32), sample_size=d.get("sample_size", 128),
        time_cond_proj_dim=d.get("time_cond_proj_dim"),
    )


def unet_config_to_diffusers(c):
    channels = [c.model_channels * m for m in c.channel_mult]
    attn = [d > 0 for d in c.transformer_depth]
    if attn[-1] and c.transformer_depth[-1] != c.transformer_depth_middle:
        raise LoadError("diffusers requires the middle block's attention depth to equal the last level's.")
    # diffusers reads the middle block's depth from the last entry; attention-free levels ignore theirs.
    depths = [d if a else 1 for d, a in zip(c.transformer_depth, attn)]
    depths[-1] = c.transformer_depth_middle
    R = c.num_res_blocks
    out = c.output_depths()
    reverse = [list(out[i * (R + 1):(i + 1) * (R + 1)]) for i in range(len(channels))]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": c.sample_size,
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": channels, "layers_per_block": R,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": depths,
        "reverse_transformer_layers_per_block": reverse if out != tuple(
            d for d in reversed(depths) for _ in range(R + 1)) else None,
        "attention_head_dim": [ch // c.head_channels for ch in channels], "num_attention_heads": None,
        "cross_attention_dim": c.context_dim, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": c.micro_cond_dim,
        "projection_class_embeddings_input_dim": c.adm_in_channels,
        "norm_num_groups": c.norm_groups, "norm_eps": 1e-5, "act_fn": "silu",
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "upcast_attention": False,
        "time_cond_proj_dim": c.time_cond_proj_dim,
    }


def vae_config_from_diffusers(d):
    channels = d["block_out_channels"]
    if not channels:
        raise ValueError("the VAE's block_out_channels is empty: it needs at least one level")
    return vae.VAEConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], ch=channels[0],
        ch_mult=tuple(c // channels[0] for c in channels), num_res_blocks=d["layers_per_block"],
        z_channels=d["latent_channels"], norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=d.get("scaling_factor", 0.13025),
    )


def vae_config_to_diffusers(c):
    levels = len(c.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "sample_size": 1024, "in_channels": c.in_channels,
        "out_channels": c.out_channels, "block_out_channels": [c.ch * m for m in c.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": c.num_res_blocks, "latent_channels": c.z_channels, "norm_num_groups": c.norm_groups,
        "act_fn": "silu", "scaling_factor": c.scaling_factor, "force_upcast": True,
    }


def text_config_from_hf(d):
    return text.TextEncoderConfig(
        vocab_size=d["vocab_size"], context_length=d["max_position_embeddings"], width=d["hidden_size"],
        layers=d["num_hidden_layers"], heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
        act=d["hidden_act"], projection_dim=d["projection_dim"] if "WithProjection" in d["architectures"][0] else None,
        eps=d.get("layer_norm_eps", 1e-5),
    )


def text_config_to_hf(c, dtype):
    return {
        "architectures": ["CLIPTextModelWithProjection" if c.projection_dim else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": c.vocab_size, "max_position_embeddings": c.context_length,
        "hidden_size": c.width, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
        "intermediate_size": c.mlp_dim, "hidden_act": c.act, "layer_norm_eps": c.eps,
        "projection_dim": c.projection_dim or c.width,
        # The ids of the original CLIP configs: with eos_token_id 2, transformers pools at argmax(ids),
        # the first <|endoftext|>, exactly as our encoders do.
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "dtype": str(dtype).removeprefix("torch."),
    }


def model_index(cfg):
    refiner, aesthetic = cfg.text_encoder_1 is None, cfg.takes_aesthetic_score
    te1 = [None, None] if refiner else ["transformers", "CLIPTextModel"]
    tok1 = [None, None] if refiner else ["transformers", "CLIPTokenizer"]
    return {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner or aesthetic else
                       "StableDiffusionXLInpaintPipeline" if cfg.unet.in_channels == 9 else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": not refiner, **({"requires_aesthetics_score": True} if aesthetic else {}),
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": te1, "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": tok1, "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }


# ----------------------------------------------------------------------------- loading


def read_json(path):
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path} cannot be read as JSON ({e}); the folder is incomplete or damaged.") from None
    if not isinstance(value, dict):
        raise LoadError(f"{path} holds a JSON {type(value).__name__}, not an object; the folder is damaged.")
    return value


def read_weights(folder, dtype):
    """All tensors of one component folder, cast to dtype; handles fp16 variants and shard indexes."""
    tensors = {}
    for file in weight_files(folder):
        with open_safetensors(file) as f:
            names = list(f.keys())
        tensors.update(read_tensors(file, names, dtype))
    return tensors


def weight_files(folder):
    """The safetensors files of one component folder. Format rule: the file names of WEIGHT_FILES, else a
    *.safetensors.index.json's shards; only .bin files: pickles, refused."""
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            files = [folder / name]
            break
    else:
        index = sorted(folder.glob("*.safetensors.index.json"))
        if index:
            weight_map = read_json(index[0]).get("weight_map")
            if not isinstance(weight_map, dict):
                raise LoadError(f"{index[0]} has no weight_map; the download is incomplete or damaged.")
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise LoadError(f"{folder} is missing the shard {missing[0].name} its index names; download it again.")
        elif any(folder.glob("*.bin")):
            raise LoadError(f"{folder} has only pickle weights (.bin), which are not loaded because pickles can run "
                            "code; get the .safetensors version of this model.")
        else:
            raise LoadError(f"{folder} has no .safetensors weights; the download is incomplete.")
    return files


def _refuse_other_models(path, index):
    kind = str(index.get("_class_name") or "")
    if kind.startswith("StableDiffusionXL"):
        return
    if kind.startswith("StableDiffusion") and (path / "unet" / "config.json").exists():
        context = read_json(path / "unet" / "config.json").get("cross_attention_dim")
        version = {768: "SD 1.x", 1024: "SD 2.x"}.get(context, kind)
        raise LoadError(f"{path} is an {version} model; this project loads SDXL (base, refiner or a fine-tune).")
    raise LoadError(f"{path} is a {kind or 'non-SDXL'} model; this project loads SDXL (base, refiner or a fine-tune).")


def read_folder_config(path):
    """A diffusers SDXL folder's configs -> (SDXLConfig, its scheduler config or None), no weights read."""
    path = Path(path)
    if not (path / "unet" / "config.json").exists():
        raise LoadError(f"{path} is a folder but not a diffusers model (no unet/config.json); pass a model folder.")
    if (path / "model_index.json").exists():
        _refuse_other_models(path, read_json(path / "model_index.json"))
    has_te1 = (path / "text_encoder" / "config.json").exists()
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_file) if scheduler_file.exists() else None
    try:
        cfg = SDXLConfig(
            unet=unet_config_from_diffusers(read_json(path / "unet" / "config.json")),
            vae=vae_config_from_diffusers(read_json(path / "vae" / "config.json")),
            text_encoder_1=text_config_from_hf(read_json(path / "text_encoder" / "config.json")) if has_te1 else None,
            text_encoder_2=text_config_from_hf(read_json(path / "text_encoder_2" / "config.json")),
            prediction_type=(scheduler or {}).get("prediction_type", "epsilon"),
            zero_terminal_snr=bool((scheduler or {}).get("rescale_betas_zero_snr", False)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError, IndexError) as e:
        raise LoadError(f"{path} has configs plainxl cannot read as SDXL ({e}); is it an SDXL model?") from None
    return cfg, scheduler


def pipeline_options(path):
    """A folder's model_index.json settings that change what a pipeline computes (absent ones are left out)."""
    index = Path(path) / "model_index.json"
    settings = read_json(index) if index.exists() else {}
    return {k: bool(settings[k]) for k in ("force_zeros_for_empty_prompt", "requires_aesthetics_score") if k in settings}


def load_diffusers(path, dtype=None):
    """Read a diffusers SDXL folder into our modules (official names, via models.keys)."""
    path = Path(path)
    cfg, _ = read_folder_config(path)
    with torch.device("meta"):
        model = SDXL(cfg)

    R = cfg.unet.num_res_blocks
    to_diffusers = {
        "unet": lambda sd: keys.unet_to_diffusers(sd, R),
        "vae": keys.vae_to_diffusers,
        "text_encoder_1": lambda sd: sd,  # CLIP-L has transformers' names in both layouts
        "text_encoder_2": keys.openclip_to_hf,
    }
    from_diffusers = {
        "unet": lambda sd, names: keys.unet_from_diffusers(sd, names, R),
        "vae": keys.vae_from_diffusers,
        "text_encoder_1": lambda sd, names: {n: sd[n] for n in names},
        "text_encoder_2": keys.openclip_from_hf,
    }
    folders = {"unet": "unet", "vae": "vae", "text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2"}
    for component, folder in folders.items():
        module = getattr(model, component)
        if module is None:
            continue
        weights = read_weights(path / folder, dtype)
        if component == "text_encoder_1":
            # transformers >= 5 saves CLIPTextModel without the text_model. prefix; hub folders have it.
            weights = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in weights.items()}
        expected = {k: v.shape for k, v in to_diffusers[component](module.state_dict()).items()}
        check_tensors({k: v.shape for k, v in weights.items()}, expected, str(path / folder))
        assign(module, from_diffusers[component](weights, list(module.state_dict())), path / folder)
    return model


# ----------------------------------------------------------------------------- saving


MODEL_FOLDER_ENTRIES = {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                        "tokenizer_2", "scheduler", "README.md", ".gitattributes"}


def stored_shapes(path):
    """The header of one component (a ControlNet, an adapter, an image encoder) given as a .safetensors file or a
    diffusers folder -> ({file: {stored name: shape}}, the folder's config.json or {}), no tensor read."""
    config = read_json(path / "config.json") if path.is_dir() and (path / "config.json").exists() else {}
    shapes = {}
    for file in weight_files(path) if path.is_dir() else [path]:
        with open_safetensors(file) as f:
            shapes[file] = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    return shapes, config


def is_model_folder(path):
    """A folder save_diffusers could have written, and nothing else (so --overwrite may replace it): a
    training output_dir with checkpoints and logs beside its model_index.json is not one."""
    path = Path(path)
    return (path / "unet" / "config.json").is_file() and {p.name for p in path.iterdir()} <= MODEL_FOLDER_ENTRIES


def save_diffusers(model, dst, dtype=None, overwrite=False, tokenizers=None):
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder*/, tokenizer*/, scheduler/); tokenizers:
    the model's own (load_tokenizers(its folder)), None for the bundled ones.

    It is assembled under a temporary name beside dst and renamed into place at the end.
    """
    dst = check_destination(dst, overwrite, "folder", is_model_folder)
    dtype = DTYPES.get(dtype, dtype)
    cfg = model.config
    sds = state_dicts(model, dtype)
    stored_dtype = next(iter(sds["unet"].values())).dtype
    parts = {  # folder: (config, weights file name, tensors in diffusers names)
        "unet": (unet_config_to_diffusers(cfg.unet), "diffusion_pytorch_model.safetensors",
                 keys.unet_to_diffusers(sds["unet"], cfg.unet.num_res_blocks)),
        "vae": (vae_config_to_diffusers(cfg.vae), "diffusion_pytorch_model.safetensors",
                keys.vae_to_diffusers(sds["vae"])),
        "text_encoder_2": (text_config_to_hf(cfg.text_encoder_2, stored_dtype), "model.safetensors",
                           keys.openclip_to_hf(sds["text_encoder_2"])),
    }
    if cfg.text_encoder_1 is not None:
        parts["text_encoder"] = (text_config_to_hf(cfg.text_encoder_1, stored_dtype), "model.safetensors",
                                 sds["text_encoder_1"])
    for tensors in sds.values():
        check_finite(tensors, dst)
    try:
        with atomic_folder(dst, overwrite, is_model_folder) as tmp:
            for folder, (config, filename, tensors) in parts.items():
                (tmp / folder).mkdir()
                (tmp / folder / "config.json").write_text(json.dumps(config, indent=2))
                save_file(tensors, tmp / folder / filename, metadata={"format": "pt"})
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(cfg), indent=2))
            (tmp / "model_index.json").write_text(json.dumps(model_index(cfg), indent=2))
            tokenizer_1, tokenizer_2 = tokenizers or load_tokenizers()
            save_tokenizers(tokenizer_1 if cfg.text_encoder_1 else None, tokenizer_2, tmp)
    except FileExistsError:
        raise LoadError(f"{dst} appeared (or changed) while the model was being written; nothing was replaced, "
                        "choose another destination.") from None


def load_vae_folder(path, dtype=None):
    """A diffusers VAE folder (config.json + weights, e.g. madebyollin/sdxl-vae-fp16-fix), or a model
    folder's vae/ -> AutoencoderKL."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
        path = path / "vae"
    if not (path / "config.json").exists():
        raise LoadError(f"{path} has no config.json; pass a diffusers VAE folder or a VAE .safetensors file.")
    try:
        cfg = vae_config_from_diffusers(read_json(path / "config.json"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise LoadError(f"{path / 'config.json'} is not an SDXL VAE config ({e}).") from None
    with torch.device("meta"):
        module = vae.AutoencoderKL(cfg)
    weights = read_weights(path, dtype)
    expected = {k: v.shape for k, v in keys.vae_to_diffusers(module.state_dict()).items()}
    check_tensors({k: v.shape for k, v in weights.items()}, expected, str(path))
    assign(module, keys.vae_from_diffusers(weights, list(module.state_dict())), path)
    return module
