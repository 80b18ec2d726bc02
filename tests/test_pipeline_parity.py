"""Whole-pipeline parity with diffusers' StableDiffusionXLPipeline on a small random model:
PNG pixels within mean 0.5 / max 4 (of 255) for every sampler, both layouts, odd latent sizes,
batch 2, with and without negative prompt, with guidance rescale."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.diffusers_layout import save_diffusers
from models.loading import save_single_file
from models.sdxl import SDXL, TINY
from sampling.pipeline import Pipeline, Settings

SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}


def tiny_model(seed=0):
    """Random tiny SDXL whose images are not saturated: the decoder's last conv is scaled down."""
    torch.manual_seed(seed)
    model = SDXL(TINY).eval()
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model = tiny_model()
    save_single_file(model, root / "tiny.safetensors")
    save_diffusers(model, root / "tiny")
    return root


@pytest.fixture(scope="module")
def reference(files):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False).to(torch.float32)
    pipe.scheduler_config_as_saved = dict(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, s: Settings):
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[s.sampler])
    config = pipe.scheduler_config_as_saved  # not the previous test's scheduler, which may carry Karras
    pipe.scheduler = cls.from_config(config, **({"use_karras_sigmas": True} if s.karras else {}))
    out = pipe(
        prompt=s.prompt, negative_prompt=s.negative_prompt, width=s.width, height=s.height,
        num_inference_steps=s.steps, guidance_scale=s.cfg, guidance_rescale=s.guidance_rescale,
        num_images_per_prompt=s.num_images, output_type="pil",
        generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)],
    )
    return [np.asarray(im) for im in out.images]


def assert_close_images(ours, theirs, what):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = np.asarray(a).astype(np.int16), b.astype(np.int16)
        assert a.shape == b.shape, f"{what}, image {i}: shape {a.shape} vs diffusers {b.shape}"
        diff = np.abs(a - b)
        if os.environ.get("PLAINXL_PARITY_LOG"):  # the per-case numbers for a report: PLAINXL_PARITY_LOG=FILE
            with open(os.environ["PLAINXL_PARITY_LOG"], "a") as log:
                log.write(f"{what}, image {i}: mean {diff.mean():.4f} max {diff.max()}\n")
        assert diff.mean() <= 0.5 and diff.max() <= 4, \
            f"{what}, image {i}: mean |diff| {diff.mean():.3f}, max {diff.max()} (of 255) vs diffusers"
        # The comparison means something only if the image is not flat or saturated.
        assert b.std() > 10 and ((b > 0) & (b < 255)).mean() > 0.5, f"{what}: degenerate reference image"


CASES = [  # (sampler, karras, width, height, negative prompt, guidance rescale)
    ("euler", False, 64, 64, None, 0.0),
    ("euler", True, 72, 56, "blurry", 0.7),
    ("euler_a", False, 72, 56, None, 0.0),
    ("euler_a", False, 64, 64, "lowres, bad anatomy", 0.5),
    ("dpmpp_2m", False, 56, 72, None, 0.0),
    ("dpmpp_2m", True, 64, 64, "", 0.7),
    ("ddim", False, 72, 56, "blurry", 0.0),
    ("ddpm", False, 64, 64, None, 0.7),
]


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
@pytest.mark.parametrize("sampler, karras, width, height, negative, rescale", CASES,
                         ids=[f"{c[0]}{'-karras' if c[1] else ''}-{c[2]}x{c[3]}" for c in CASES])
def test_images_equal_diffusers(files, reference, layout, sampler, karras, width, height, negative, rescale):
    source = files / ("tiny.safetensors" if layout == "single file" else "tiny")
    s = Settings(prompt="1girl, solo, blue hair, red eyes, smile", negative_prompt=negative, width=width,
                 height=height, steps=8, cfg=5.0, sampler=sampler, karras=karras, guidance_rescale=rescale,
                 seed=1234, num_images=2)
    ours = Pipeline.load(source)(s, progress=False)
    assert_close_images(ours, diffusers_images(reference, s), f"{sampler} karras={karras} {width}x{height} {layout}")


def test_image_i_of_a_batch_equals_a_single_run_with_seed_plus_i(files):
    pipe = Pipeline.load(files / "tiny.safetensors")
    s = Settings(prompt="1girl, green hair", width=64, height=64, steps=5, sampler="euler_a", seed=10, num_images=3)
    batch = pipe(s, progress=False)
    single = pipe(Settings(**{**s.__dict__, "seed": 12, "num_images": 1}), progress=False)[0]
    assert np.array_equal(np.asarray(batch[2]), np.asarray(single))
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_cfg_1_equals_conditional_only_and_matches_diffusers(files, reference):
    s = Settings(prompt="1girl", width=64, height=64, steps=5, cfg=1.0, sampler="euler", seed=3, num_images=1)
    assert_close_images(Pipeline.load(files / "tiny.safetensors")(s, progress=False),
                        diffusers_images(reference, s), "cfg 1")


def test_truncated_long_prompt_equals_diffusers(files, reference):
    prompt = ", ".join(["1girl", "solo", "long hair", "blue eyes", "smile"] * 12)  # about 120 tokens
    s = Settings(prompt=prompt, width=64, height=64, steps=5, sampler="euler", seed=5, truncate_prompt=True)
    assert_close_images(Pipeline.load(files / "tiny.safetensors")(s, progress=False),
                        diffusers_images(reference, s), "truncated long prompt")


def test_no_prompt_weights_reads_brackets_literally_as_diffusers(files, reference):
    s = Settings(prompt="1girl, (red eyes:1.4), [smile]", width=64, height=64, steps=5, sampler="euler", seed=6,
                 prompt_weights=False)
    pipe = Pipeline.load(files / "tiny.safetensors")
    want = diffusers_images(reference, s)
    assert_close_images(pipe(s, progress=False), want, "literal brackets")
    weighted = np.asarray(pipe(replace(s, prompt_weights=True), progress=False)[0])
    assert not np.array_equal(weighted, np.asarray(pipe(s, progress=False)[0]))  # A1111's reading differs


def test_fp16_decode_is_upcast_so_overflow_cannot_blacken_images(files):
    """The SDXL VAE overflows fp16 (NaN / black images). Make a tiny VAE that overflows too, and check
    that an fp16 pipeline still decodes finite images equal to the float32 pipeline's."""
    settings = Settings(prompt="1girl", width=64, height=64, steps=4, sampler="euler", seed=1)
    pipes = {dtype: Pipeline.load(files / "tiny.safetensors", dtype=dtype) for dtype in ("fp32", "fp16")}
    for pipe in pipes.values():
        with torch.no_grad():  # activations ~1e5 inside the decoder: beyond fp16's 65504
            pipe.model.vae.decoder.conv_in.weight.mul_(3e4)
            pipe.model.vae.decoder.conv_in.bias.mul_(3e4)
    latents = torch.randn(1, 4, 8, 8)
    conv_in = pipes["fp16"].model.vae.decoder.conv_in
    with torch.no_grad():  # the same first layer run in fp16, as an fp16 VAE would
        raw = torch.nn.functional.conv2d(latents.half(), conv_in.weight.half(), conv_in.bias.half(), padding=1)
    assert not torch.isfinite(raw).all(), "the test VAE does not overflow fp16; it checks nothing"
    assert pipes["fp16"].dtype == torch.float16  # the UNet and text encoders do run in fp16
    half, full = pipes["fp16"](settings, progress=False)[0], pipes["fp32"](settings, progress=False)[0]
    diff = np.abs(np.asarray(half).astype(int) - np.asarray(full).astype(int))
    assert np.asarray(half).std() > 10 and diff.mean() < 2, f"fp16 pipeline image differs: mean {diff.mean():.2f}"


@pytest.mark.slow
def test_a_folders_scheduler_config_is_used(files, tmp_path):
    """A diffusers folder whose scheduler config differs from SDXL's (trailing spacing, no offset):
    our pipeline reads it, and still equals diffusers reading the same folder."""
    import json
    import shutil

    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "trailing"
    shutil.copytree(files / "tiny", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(timestep_spacing="trailing", steps_offset=0)
    config_file.write_text(json.dumps(config))
    reference = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    reference.scheduler_config_as_saved = dict(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    s = Settings(prompt="1girl, smile", width=64, height=64, steps=6, sampler="euler", seed=2)
    ours = Pipeline.load(folder)
    assert ours.scheduler_config["timestep_spacing"] == "trailing"
    assert_close_images(ours(s, progress=False), diffusers_images(reference, s), "trailing scheduler config")
    default = Pipeline.load(files / "tiny.safetensors")(s, progress=False)
    assert not np.array_equal(np.asarray(default[0]), np.asarray(ours(s, progress=False)[0]))


# ----------------------------------------------------------------------------- v-prediction, zero terminal SNR


@pytest.fixture(scope="module")
def vpred_files(tmp_path_factory):
    """The tiny model as a v-prediction + zero-terminal-SNR model (NoobAI-XL v-pred's kind): a single file
    with the v_pred and ztsnr marker keys, and a diffusers folder whose scheduler config says the same."""
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("vpred")
    model = tiny_model(seed=1)
    model.config = replace(model.config, prediction_type="v_prediction", zero_terminal_snr=True)
    save_single_file(model, root / "vpred.safetensors")
    save_diffusers(model, root / "vpred")
    with safe_open(root / "vpred.safetensors", "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())  # the markers ComfyUI and AUTOMATIC1111 read
    return root


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m"])
def test_v_prediction_zero_snr_images_equal_diffusers(vpred_files, sampler):
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline.from_pretrained(vpred_files / "vpred", add_watermarker=False)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler_config_as_saved = dict(reference.scheduler.config)
    assert reference.scheduler.config.prediction_type == "v_prediction"
    assert reference.scheduler.config.rescale_betas_zero_snr and reference.scheduler.config.timestep_spacing == "trailing"
    s = Settings(prompt="1girl, solo, blue hair", negative_prompt="lowres", width=64, height=56, steps=8, cfg=5.0,
                 sampler=sampler, seed=7, num_images=2)
    theirs = diffusers_images(reference, s)
    for source in ("vpred.safetensors", "vpred"):  # the markers, or the folder's scheduler config
        ours = Pipeline.load(vpred_files / source)(s, progress=False)
        assert_close_images(ours, theirs, f"v-pred zsnr {sampler} from {source}")


def test_a_folders_force_zeros_for_empty_prompt_is_read(files, tmp_path):
    """A folder whose model_index.json sets force_zeros_for_empty_prompt false encodes "" for a missing negative
    prompt, as diffusers reads the same folder; the default (SDXL base's true) gives zeros, another image."""
    import json
    import shutil

    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "no-zeros"
    shutil.copytree(files / "tiny", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    reference = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False).to(torch.float32)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler_config_as_saved = dict(reference.scheduler.config)
    s = Settings(prompt="1girl, green hair", width=64, height=64, steps=5, sampler="euler", seed=8)
    ours = Pipeline.load(folder)(s, progress=False)
    assert_close_images(ours, diffusers_images(reference, s), "force_zeros_for_empty_prompt false")
    zeros = Pipeline.load(files / "tiny")(s, progress=False)
    assert np.abs(np.asarray(zeros[0], dtype=int) - np.asarray(ours[0], dtype=int)).mean() > 1
