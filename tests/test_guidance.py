"""Guidance beyond CFG (sampling/guidance.py): perturbed-attention guidance against diffusers'
StableDiffusionXLPAGPipeline, adaptive projected guidance against diffusers' own implementation of the paper's
algorithm, guidance intervals and the CFG++ samplers by what they must reduce to."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_pipeline_parity import assert_close_images, files, tiny_model  # noqa: F401 (files: a fixture)

from sampling.guidance import adaptive_projected
from sampling.pipeline import Pipeline, Settings
from sampling.pnginfo import format_parameters, parse_parameters


# The random tiny model's images hardly move when only its middle block is perturbed (0.05 of 255 at scale 3), so
# the first case perturbs an up block too, at a high scale, where PAG moves the image by ~5 levels: equal to
# diffusers within 0.5 then means PAG itself is right.
@pytest.mark.parametrize("cfg, pag_scale, ours, theirs", [
    (5.0, 20.0, ("mid", "output_blocks.[3-5].1"), ["mid", "up_blocks.1"]),  # diffusers' up_blocks.1 = level 1's
    (1.0, 3.0, ("mid",), ["mid"]),  # no CFG: cond + scale (cond - perturbed)
])
def test_pag_equals_diffusers(files, cfg, pag_scale, ours, theirs):  # noqa: F811
    from diffusers import StableDiffusionXLPAGPipeline

    reference = StableDiffusionXLPAGPipeline.from_pretrained(files / "tiny", add_watermarker=False,
                                                             pag_applied_layers=theirs).to(torch.float32)
    reference.set_progress_bar_config(disable=True)
    s = Settings(prompt="1girl, green hair", negative_prompt="lowres", width=64, height=64, steps=6, cfg=cfg,
                 sampler="euler", seed=4, num_images=2, pag_scale=pag_scale, pag_layers=ours)
    images = reference(prompt=s.prompt, negative_prompt=s.negative_prompt, width=64, height=64, num_inference_steps=6,
                       guidance_scale=cfg, pag_scale=pag_scale, num_images_per_prompt=2,
                       generator=[torch.Generator().manual_seed(4 + i) for i in range(2)]).images
    pipe = Pipeline.load(files / "tiny")
    generated = pipe(s, progress=False)
    assert_close_images(generated, [np.asarray(image) for image in images], f"PAG cfg={cfg} scale={pag_scale}")
    if cfg > 1:
        plain = pipe(replace(s, pag_scale=0.0), progress=False)
        effect = np.abs(np.asarray(plain[0], dtype=int) - np.asarray(generated[0], dtype=int)).mean()
        assert effect > 2, f"PAG moved the image by {effect:.2f} of 255 only: the comparison shows little"


def test_apg_equals_the_papers_algorithm():
    """Three steps with momentum, against diffusers' normalized_guidance. The paper's code returns
    cond + (w - 1) update; diffusers' "original formulation" returns cond + w' update, so it is called with w' = w - 1
    (the update does not depend on the scale)."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(0)
    theirs_momentum, ours_momentum = MomentumBuffer(-0.75), {"beta": -0.75}
    for _ in range(3):
        cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        theirs = normalized_guidance(cond, uncond, 6.0 - 1, theirs_momentum, eta=0.2, norm_threshold=2.5,
                                     use_original_formulation=True)
        ours = adaptive_projected(cond, uncond, 6.0, 0.2, 2.5, ours_momentum)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("plainxl-tiny")


BASE = Settings(prompt="1girl, blue hair", negative_prompt="lowres", width=64, height=64, steps=6, cfg=7.0, seed=5,
                sampler="euler", schedule="karras")


def pixels(pipe, s):
    return np.asarray(pipe(s, progress=False)[0], dtype=int)


def test_apg_without_its_parts_is_cfg(pipe):
    """eta 1, no norm cap, no momentum: APG is CFG itself (combined in x0 space: up to float rounding)."""
    plain = pixels(pipe, BASE)
    apg = pixels(pipe, replace(BASE, apg=True, apg_eta=1.0, apg_norm_threshold=0.0, apg_momentum=0.0))
    assert np.abs(plain - apg).max() <= 1
    assert np.abs(plain - pixels(pipe, replace(BASE, apg=True))).mean() > 1, "APG's defaults changed nothing"


def test_cfg_interval(pipe):
    """An interval holding every level is plain CFG; one holding none is no guidance (cfg 1)."""
    assert np.array_equal(pixels(pipe, replace(BASE, cfg_interval=(0.0, 1e9))), pixels(pipe, BASE))
    assert np.array_equal(pixels(pipe, replace(BASE, cfg_interval=(1e8, 1e9))), pixels(pipe, replace(BASE, cfg=1.0)))
    middle = pixels(pipe, replace(BASE, cfg_interval=(0.28, 5.42)))
    assert not np.array_equal(middle, pixels(pipe, BASE))


def test_cfg_pp_reduces_to_euler(pipe):
    """With the negative prompt equal to the prompt the unconditional prediction is the guided one, so CFG++ Euler
    is Euler; its ancestral form with eta 0 is CFG++ Euler."""
    same = replace(BASE, negative_prompt=BASE.prompt)
    assert np.abs(pixels(pipe, same) - pixels(pipe, replace(same, sampler="euler_cfg_pp"))).max() <= 1
    cfg_pp = pixels(pipe, replace(BASE, sampler="euler_cfg_pp", cfg=1.5))
    assert np.abs(cfg_pp - pixels(pipe, replace(BASE, sampler="euler_ancestral_cfg_pp", cfg=1.5, eta=0.0))).max() <= 1
    assert np.abs(cfg_pp - pixels(pipe, replace(BASE, cfg=1.5))).mean() > 1, "CFG++ is plain Euler here"


def test_settings_round_trip_through_the_png():
    s = replace(BASE, pag_scale=3.0, pag_layers=("mid", "output_blocks.1.1"), apg=True, apg_eta=0.1,
                cfg_interval=(0.28, 5.42), sampler="euler_ancestral_cfg_pp", eta=0.5)
    assert parse_parameters(format_parameters(s, 5, "m"))[0] == s
