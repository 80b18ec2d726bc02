"""T2I-Adapter equals diffusers on the same random weights: the module equals T2IAdapter (float32, <= 1e-5) for
colour and grey adapters, diffusers' and ComfyUI's names, and the images equal StableDiffusionXLAdapterPipeline's
(per image mean |diff| <= 0.5, max <= 4 of 255) for one and two adapters and adapter_conditioning_factor."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_controlnet import control_image
from test_pipeline_parity import SCHEDULERS, assert_close_images, files  # noqa: F401 (files: a fixture)

from models.files import LoadError
from models.t2i_adapter import load_adapter, positions
from models.unet import SDXL_BASE, TINY
from sampling.pipeline import Pipeline, Settings

TINY_CHANNELS = [32, 64, 64, 64]  # TINY's level widths, and its middle block's


def diffusers_adapter(seed, in_channels=3):
    from diffusers import T2IAdapter

    adapter = T2IAdapter(in_channels=in_channels, channels=TINY_CHANNELS, num_res_blocks=2, downscale_factor=16,
                         adapter_type="full_adapter_xl").eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return adapter


@pytest.fixture(scope="module")
def adapters(files):
    nets = {}
    for seed, channels in ((1, 3), (2, 1)):
        nets[seed] = diffusers_adapter(seed, channels)
        nets[seed].save_pretrained(files / f"adapter{seed}")
    return nets


def test_positions_are_diffusers_for_sdxl():
    """f0 after the first level's Downsample, f1 and f2 after the last ResBlock + attention of levels 2 and 3."""
    assert positions(SDXL_BASE) == ["input_blocks.3", "input_blocks.5", "input_blocks.8", "middle_block"]


@pytest.mark.parametrize("seed", [1, 2], ids=["colour", "grey"])
def test_module_equals_t2iadapter(files, adapters, tmp_path, seed):
    theirs = adapters[seed]
    comfy = {}  # ComfyUI's flattened names: body.{2i + j}.block1, body.{2i}.in_conv, conv_in
    for name, t in theirs.state_dict().items():
        parts = name.split(".")
        if len(parts) > 3 and parts[3] == "resnets":  # adapter.body.i.resnets.j.block1.weight
            name = f"body.{2 * int(parts[2]) + int(parts[4])}.{'.'.join(parts[5:])}"
        elif parts[1] == "body":
            name = f"body.{2 * int(parts[2])}.{'.'.join(parts[3:])}"
        else:
            name = ".".join(parts[1:])
        comfy[name] = t.contiguous()
    save_file(comfy, tmp_path / "comfy.safetensors")
    x = torch.rand(2, theirs.config.in_channels, 80, 112)
    with torch.no_grad():
        expected = theirs(x)
        for source in (files / f"adapter{seed}", tmp_path / "comfy.safetensors"):
            got = load_adapter(source, TINY)(x)
            assert len(got) == len(expected) == 4
            for a, b in zip(got, expected):
                assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())


def reference_images(files, nets, s: Settings, images, scales):
    import diffusers
    from diffusers import MultiAdapter, StableDiffusionXLAdapterPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False)
    adapter = MultiAdapter(nets) if len(nets) > 1 else nets[0]
    components = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLAdapterPipeline(**components, adapter=adapter)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[s.sampler]).from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=images if len(nets) > 1 else images[0],
               num_inference_steps=s.steps, guidance_scale=s.cfg, num_images_per_prompt=s.num_images,
               width=s.width, height=s.height, adapter_conditioning_scale=scales if len(nets) > 1 else scales[0],
               adapter_conditioning_factor=s.adapter_factor,
               generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)])
    return [np.asarray(im) for im in out.images]


CASES = [  # (id, adapters, sampler, scales, factor, size)
    ("one", [1], "euler", [0.8], 1.0, 64),
    ("grey", [2], "dpmpp_2m", [1.0], 1.0, 80),
    ("two", [1, 2], "euler_a", [0.6, 0.9], 1.0, 64),
    ("factor", [1], "euler", [1.0], 0.5, 64),
]


@pytest.mark.parametrize("case, which, sampler, scales, factor, size", CASES, ids=[c[0] for c in CASES])
def test_images_equal_diffusers_adapter_pipeline(files, adapters, case, which, sampler, scales, factor, size):
    # diffusers reads a grey ("L") image as one channel, which the grey adapter (2) takes
    images = [control_image(i, size).convert("L" if i == 2 else "RGB") for i in which]
    s = Settings(prompt="1girl, solo, blue hair", negative_prompt="blurry", steps=8, cfg=5.0, sampler=sampler,
                 seed=11, num_images=2, adapter_images=images, adapter_scales=scales, adapter_factor=factor,
                 width=size, height=size)
    ours = Pipeline.load(files / "tiny.safetensors", adapters=[files / f"adapter{i}" for i in which])(s, progress=False)
    assert_close_images(ours, reference_images(files, [adapters[i] for i in which], s, images, scales),
                        f"T2I-Adapter {case}")
    plain = Pipeline.load(files / "tiny.safetensors")(Settings(**{**s.__dict__, "adapter_images": (),
                                                                   "adapter_scales": ()}), progress=False)
    change = np.abs(np.asarray(ours[0], np.int16) - np.asarray(plain[0], np.int16)).mean()
    assert change > 2, f"the adapter changed the image by only {change:.2f} of 255: the test would not see it"


def test_refused_adapters(files, tmp_path):
    from diffusers import T2IAdapter

    T2IAdapter(channels=[32, 64, 64, 64], adapter_type="full_adapter").save_pretrained(tmp_path / "sd15")
    with pytest.raises(LoadError, match="for SD 1.x"):
        load_adapter(tmp_path / "sd15", TINY)
    T2IAdapter(channels=[32, 64, 64], adapter_type="light_adapter").save_pretrained(tmp_path / "light")
    with pytest.raises(LoadError, match="light T2I-Adapter"):
        load_adapter(tmp_path / "light", TINY)
    T2IAdapter(channels=[320, 640, 1280, 1280], downscale_factor=16,
               adapter_type="full_adapter_xl").save_pretrained(tmp_path / "xl")
    with pytest.raises(LoadError, match="made for this model family"):
        load_adapter(tmp_path / "xl", TINY)
