"""Distilled SDXL models with their published settings (docs/samplers.md#distilled-models), against the reference
implementations (diffusers' schedulers and pipelines, imported only here), on small random models:

- LCM (sampler lcm) and TCD (sampler tcd): their default schedules' timesteps equal LCMScheduler's and
  TCDScheduler's, their steps equal those schedulers' step by step, and whole images equal diffusers' pipeline
  with them; an LCM UNet (its guidance-scale embedding, time_cond_proj_dim) loads and equals diffusers' LCM UNet.
- Lightning, Hyper-SD, Turbo: trailing timesteps (--spacing trailing) equal diffusers' Euler, Euler ancestral
  and DDIM schedulers', and images equal diffusers' at cfg 1 (no guidance, as those models are run).
"""

import dataclasses

import numpy as np
import pytest
import torch
from test_pipeline_parity import assert_close_images, files, reference, tiny_model  # noqa: F401 (fixtures)

from models.diffusers_layout import save_diffusers
from models.sdxl import SDXL, TINY
from sampling.noise import generator_noise
from sampling.pipeline import Pipeline, Settings, denoiser
from sampling.samplers import SAMPLERS
from sampling.schedule import consistency_boundary, make_schedule, sigma_table, tcd_levels


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 50])
def test_consistency_timesteps_equal_diffusers(steps):
    from diffusers import LCMScheduler, TCDScheduler

    for sampler, cls in (("lcm", LCMScheduler), ("tcd", TCDScheduler)):
        scheduler = cls()
        scheduler.set_timesteps(steps)
        schedule = make_schedule(sampler, steps)
        assert schedule.timesteps.tolist() == scheduler.timesteps.float().tolist(), (sampler, steps)
        _, table = sigma_table()
        assert torch.equal(schedule.sigmas[:-1], table[scheduler.timesteps]), (sampler, steps)


@pytest.mark.parametrize("sampler, cls, steps", [("euler", "EulerDiscreteScheduler", 2), ("euler", "EulerDiscreteScheduler", 4),
                                                 ("euler", "EulerDiscreteScheduler", 8),
                                                 ("euler_ancestral", "EulerAncestralDiscreteScheduler", 1),
                                                 ("euler_ancestral", "EulerAncestralDiscreteScheduler", 4),
                                                 ("ddim", "DDIMScheduler", 8)])
def test_trailing_timesteps_equal_diffusers(sampler, cls, steps):
    """Lightning (Euler), Turbo (Euler ancestral) and Hyper-SD (DDIM) run on trailing timesteps."""
    import diffusers

    scheduler = getattr(diffusers, cls).from_config({"timestep_spacing": "trailing", "beta_schedule": "scaled_linear",
                                                     "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1})
    scheduler.set_timesteps(steps)
    ours = make_schedule(sampler, steps, spacing="trailing")
    assert ours.timesteps.tolist() == scheduler.timesteps.float().tolist()


def fake_model(x_in, t):
    return 0.3 * torch.tanh(x_in) + 0.0005 * t * torch.ones_like(x_in)


def generators():
    return [torch.Generator().manual_seed(seed) for seed in (10, 11)]


@pytest.mark.parametrize("sampler, gamma", [("lcm", None), ("tcd", 0.3), ("tcd", 0.0), ("tcd", 0.9)])
def test_steps_equal_diffusers_schedulers(sampler, gamma):
    """Our sampler on our default schedule vs the diffusers scheduler's loop, 4 steps, a batch of 2 generators."""
    from diffusers import LCMScheduler, TCDScheduler

    scheduler = (LCMScheduler if sampler == "lcm" else TCDScheduler)()
    scheduler.set_timesteps(4)
    schedule = make_schedule(sampler, 4)
    denoise = denoiser(lambda x_in, t, sigma: fake_model(x_in, t[0]), schedule)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x = noise * schedule.init_noise_sigma
    if sampler == "lcm":
        ours = SAMPLERS["lcm"](consistency_boundary(denoise, schedule.timestep), x, schedule.sigmas,
                               noise=generator_noise(x, generators()))
    else:
        ours = SAMPLERS["tcd"](denoise, x, schedule.sigmas, noise=generator_noise(x, generators()),
                               sigmas_s=tcd_levels(schedule, gamma))
    ours = ours / (schedule.sigmas[-1] ** 2 + 1) ** 0.5  # VP, as diffusers returns it
    sample, gens = noise, generators()
    for t in scheduler.timesteps:
        kwargs = {"eta": gamma} if sampler == "tcd" else {}
        sample = scheduler.step(fake_model(sample, t), t, sample, generator=gens, **kwargs).prev_sample
    error = ((ours - sample).abs().max() / sample.abs().max()).item()
    assert error < 1e-5, f"{sampler} gamma={gamma}: relative error {error:.2e}"


def diffusers_run(pipe, scheduler, s, **kwargs):
    pipe.scheduler = scheduler
    out = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, width=s.width, height=s.height,
               num_inference_steps=s.steps, guidance_scale=s.cfg, num_images_per_prompt=s.num_images,
               generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)], **kwargs)
    return [np.asarray(image) for image in out.images]


CASES = [  # (what, our settings, the diffusers scheduler class, its config changes, call kwargs)
    ("LCM-LoRA", dict(sampler="lcm", steps=4, cfg=1.0), "LCMScheduler", {}, {}),
    ("TCD", dict(sampler="tcd", steps=4, cfg=1.0, gamma=0.3), "TCDScheduler", {}, {"eta": 0.3}),
    ("Lightning", dict(sampler="euler", spacing="trailing", steps=4, cfg=1.0), "EulerDiscreteScheduler",
     {"timestep_spacing": "trailing"}, {}),
    ("Hyper-SD", dict(sampler="ddim", spacing="trailing", steps=8, cfg=1.0), "DDIMScheduler",
     {"timestep_spacing": "trailing"}, {}),
    ("Turbo", dict(sampler="euler_ancestral", spacing="trailing", steps=2, cfg=0.0),
     "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {}),
]


@pytest.mark.parametrize("what, settings, cls, config, call", CASES, ids=[c[0] for c in CASES])
def test_distilled_settings_equal_diffusers(files, reference, what, settings, cls, config, call):  # noqa: F811
    import diffusers

    s = Settings(prompt="1girl, blue hair", width=64, height=64, seed=7, num_images=2, **settings)
    scheduler = getattr(diffusers, cls).from_config({**reference.scheduler_config_as_saved, **config})
    theirs = diffusers_run(reference, scheduler, s, **call)
    assert_close_images(Pipeline.load(files / "tiny")(s, progress=False), theirs, what)


def test_lcm_unet_equals_diffusers(tmp_path):
    """An LCM-distilled UNet (a guidance-scale embedding added to the timestep's; CFG off) from a diffusers folder."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    torch.manual_seed(1)
    config = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, time_cond_proj_dim=16))
    model = SDXL(config).eval()
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.mul_(0.3)  # unsaturated images, as tiny_model
        model.unet.time_cond_proj.weight.mul_(30)  # a random embedding weak enough to change nothing would test little
    save_diffusers(model, tmp_path / "lcm")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "lcm", add_watermarker=False).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 16
    s = Settings(prompt="1girl, blue hair", width=64, height=64, steps=4, cfg=8.0, sampler="lcm", seed=3, num_images=2)
    theirs = diffusers_run(pipe, LCMScheduler.from_config(pipe.scheduler.config), s)
    ours = Pipeline.load(tmp_path / "lcm")
    assert ours.model.config.unet.time_cond_proj_dim == 16
    images = ours(s, progress=False)
    assert_close_images(images, theirs, "LCM UNet, guidance 8")
    other = ours(dataclasses.replace(s, cfg=2.0), progress=False)
    assert np.abs(np.asarray(other[0], dtype=int) - np.asarray(images[0], dtype=int)).mean() > 1, \
        "the guidance embedding changed nothing"
