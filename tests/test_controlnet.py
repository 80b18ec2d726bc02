"""ControlNet equals diffusers on the same random weights: the module equals ControlNetModel (float32, <= 1e-5)
from every layout it comes in, and the images equal StableDiffusionXLControlNetPipeline's (per image mean |diff|
<= 0.5, max <= 4 of 255) for one and two ControlNets, guess mode and start/end fractions."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_pipeline_parity import SCHEDULERS, assert_close_images, files  # noqa: F401 (files: a fixture)

from models.conditioning import vector_condition
from models.controlnet import PREFIX, controlnet_to_diffusers, load_controlnet
from models.files import LoadError
from models.unet import TINY
from sampling.pipeline import Pipeline, Settings

TOL = 1e-5


def diffusers_controlnet(files, seed):
    """diffusers' ControlNetModel copied from the tiny UNet, every weight perturbed (the zero convs included, so
    the control image changes the image)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(files / "tiny" / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():  # the zero convs more, for a visible effect
            p.add_((1.5 if name.startswith("controlnet_") else 0.05) * torch.randn_like(p))
    return controlnet


@pytest.fixture(scope="module")
def controlnets(files):
    """Two diffusers ControlNets, saved as diffusers folders under files/."""
    nets = []
    for seed in (1, 2):
        net = diffusers_controlnet(files, seed)
        net.save_pretrained(files / f"controlnet{seed}")
        nets.append(net)
    return nets


def control_image(seed, size=64):
    """An edge-like picture: a few white rectangles and a circle on black."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        image[y0:y0 + size // 3, x0:x0 + 2] = image[y0:y0 + 2, x0:x0 + size // 3] = 255
    yy, xx = np.mgrid[:size, :size]
    image[np.abs(np.hypot(yy - size * 0.6, xx - size * 0.5) - size / 5) < 1.2] = (255, 200, 100)
    return Image.fromarray(image)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_module_equals_controlnetmodel_in_every_layout(files, controlnets, tmp_path, guess_mode):
    """diffusers folder, diffusers names in one file, official names with and without control_model."""
    theirs = controlnets[0]
    ours = load_controlnet(files / "controlnet1", TINY)
    official = {n: t.contiguous() for n, t in ours.state_dict().items()}
    diffusers_names, config = controlnet_to_diffusers(ours)
    assert set(diffusers_names) == set(theirs.state_dict()), "our export's names differ from ControlNetModel's"
    assert config["conditioning_embedding_out_channels"] == list(theirs.config.conditioning_embedding_out_channels)
    save_file(official, tmp_path / "plain.safetensors")
    save_file({PREFIX + n: t for n, t in official.items()}, tmp_path / "cldm.safetensors")
    save_file({n: t.contiguous() for n, t in diffusers_names.items()}, tmp_path / "diffusers_names.safetensors")

    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 9, 7), torch.tensor([999.0, 10.0])
    context, pooled = torch.randn(2, 77, TINY.context_dim), torch.randn(2, 48)
    time_ids = torch.tensor([[72.0, 56, 0, 0, 72, 56], [64, 64, 8, 4, 64, 64]])
    hint = torch.rand(2, 3, 72, 56)
    with torch.no_grad():
        down, mid = theirs(x, t, context, hint, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        expected = [*down, mid]
        for name in ("plain", "cldm", "diffusers_names"):
            model = load_controlnet(tmp_path / f"{name}.safetensors", TINY)
            got = model(x, t, context, vector_condition(pooled, time_ids, TINY.micro_cond_dim), hint, 0.7, guess_mode)
            assert len(got) == len(expected)
            for i, (a, b) in enumerate(zip(got, expected)):
                assert (a - b).abs().max() <= TOL * max(1.0, b.abs().max()), f"{name}: residual {i} differs"


def reference_images(files, nets, s: Settings, images, scales):
    import diffusers
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False)
    pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in base.components.items()},
                                               controlnet=nets if len(nets) > 1 else nets[0], add_watermarker=False)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[s.sampler]).from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=images if len(nets) > 1 else images[0],
               num_inference_steps=s.steps, guidance_scale=s.cfg, num_images_per_prompt=s.num_images,
               width=s.width, height=s.height, controlnet_conditioning_scale=scales if len(nets) > 1 else scales[0], guess_mode=s.guess_mode,
               control_guidance_start=s.control_start, control_guidance_end=s.control_end,
               generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)])
    return [np.asarray(im) for im in out.images]


CASES = [  # (id, controlnets used, sampler, scales, guess mode, start, end, control image side)
    ("one", [1], "euler", [0.8], False, 0.0, 1.0, 64),
    ("one-resized", [1], "dpmpp_2m", [1.0], False, 0.0, 1.0, 96),
    ("two", [1, 2], "euler_a", [0.6, 0.9], False, 0.0, 1.0, 64),
    ("guess-mode", [1], "dpmpp_2m", [1.0], True, 0.0, 1.0, 64),
    ("guess-mode-two", [1, 2], "euler", [0.7, 0.5], True, 0.0, 1.0, 64),
    ("start-end", [2], "euler", [1.0], False, 0.1, 0.5, 64),
]


@pytest.mark.parametrize("case, which, sampler, scales, guess, start, end, side", CASES, ids=[c[0] for c in CASES])
def test_images_equal_diffusers_controlnet_pipeline(files, controlnets, case, which, sampler, scales, guess, start,
                                                    end, side):
    images = [control_image(i, side) for i in which]
    s = Settings(prompt="1girl, solo, blue hair", negative_prompt="blurry", steps=8, cfg=5.0, sampler=sampler,
                 seed=7, num_images=2, control_images=images, control_scales=scales, guess_mode=guess,
                 control_start=start, control_end=end, width=64, height=64)
    pipe = Pipeline.load(files / "tiny.safetensors", controlnets=[files / f"controlnet{i}" for i in which])
    ours = pipe(s, progress=False)
    assert_close_images(ours, reference_images(files, [controlnets[i - 1] for i in which], s, images, scales),
                        f"ControlNet {case}")
    plain = Pipeline.load(files / "tiny.safetensors")(Settings(**{**s.__dict__, "control_images": (),
                                                                   "control_scales": ()}), progress=False)
    change = np.abs(np.asarray(ours[0], np.int16) - np.asarray(plain[0], np.int16)).mean()
    assert change > 2, f"the ControlNet changed the image by only {change:.2f} of 255: the test would not see it"


def test_split_cfg_and_guess_mode_agree_with_the_batch(files, controlnets):
    """The unconditional pass of its own (cfg_mode split) gets no control in guess mode, as the batch's half."""
    s = Settings(prompt="1girl", negative_prompt="", steps=4, sampler="euler", seed=3, control_images=[control_image(1)],
                 guess_mode=True, width=64, height=64)
    pipe = Pipeline.load(files / "tiny.safetensors", controlnets=[files / "controlnet1"])
    batch = np.asarray(pipe(s, progress=False)[0], np.int16)
    pipe.cfg_mode = "split"
    split = np.asarray(pipe(s, progress=False)[0], np.int16)
    assert np.abs(batch - split).max() <= 1


def test_refused_controlnets(files, tmp_path):
    from diffusers import ControlNetModel

    sd15 = ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           cross_attention_dim=768, layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
                           conditioning_embedding_out_channels=(16, 32))
    sd15.save_pretrained(tmp_path / "sd15")
    with pytest.raises(LoadError, match="for SD 1.5, not SDXL"):
        load_controlnet(tmp_path / "sd15", TINY)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(LoadError, match="is not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors", TINY)


def control_lora_file(trained, base_unet, path):
    """Stability's control-LoRA format of `trained` (control_lora_create.py's rule): each weight of 2+ dimensions
    the base UNet has as the factors of its difference (full rank here: up = U S, down = Vh), the rest whole."""
    base = base_unet.state_dict()
    tensors = {"lora_controlnet": torch.zeros(0)}
    for name, t in trained.state_dict().items():
        if name in base and t.ndim >= 2:
            U, S, Vh = torch.linalg.svd((t - base[name]).double().flatten(1), full_matrices=False)
            stem, rank = name.removesuffix(".weight"), len(S)
            tensors[stem + ".up"] = (U * S).float().reshape(t.shape[0], rank, *[1] * (t.ndim - 2)).contiguous()
            tensors[stem + ".down"] = Vh.float().reshape(rank, *t.shape[1:]).contiguous()
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, path)


def test_control_lora_equals_the_controlnet_it_describes(files, tmp_path):
    from models.controlnet import controlnet_from_unet
    from models.loading import load

    unet = load(files / "tiny.safetensors").unet
    torch.manual_seed(5)
    trained = controlnet_from_unet(unet)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    control_lora_file(trained, unet, tmp_path / "control-lora-rank32.safetensors")
    ours = load_controlnet(tmp_path / "control-lora-rank32.safetensors", unet)
    want = trained.state_dict()
    for name, t in ours.state_dict().items():
        assert (t - want[name]).abs().max() <= 1e-5 * max(1.0, want[name].abs().max()), f"{name} differs"
    with pytest.raises(LoadError, match="changes the base UNet's weights"):
        load_controlnet(tmp_path / "control-lora-rank32.safetensors", TINY)
    from models.unet import TINY_REFINER

    with pytest.raises(LoadError, match="control-LoRA for another UNet"):
        load_controlnet(tmp_path / "control-lora-rank32.safetensors", TINY_REFINER)
