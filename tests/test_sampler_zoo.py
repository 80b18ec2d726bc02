"""Every sampler on every schedule against the reference implementations (imported only here):

1. Sampler level: each sampler, run on the pipeline's denoiser around a smooth stand-in for the UNet, equals
   k-diffusion's function of the same name on the same denoiser, sigmas and noise (image i's generator, or
   k-diffusion's own BrownianTreeNoiseSampler with image i's seed); uni_pc equals diffusers' UniPC
   multistep scheduler (order 3, bh1/bh2) stepped on the same levels (lcm and tcd: tests/test_distilled.py).
2. Image level (slow): the pipeline on a small random model, with the reference sampler swapped in for ours,
   gives the same images within mean 0.5 / max 4 of 255, for every sampler x schedule pair.
"""

import numpy as np
import pytest
import torch
from k_diffusion_oracle import k_diffusion_sampling

from sampling.names import CFG_PP
from sampling.noise import brownian_noise, generator_noise
from sampling.pipeline import denoiser
from sampling.samplers import SAMPLERS, SDE, WITH_ETA
from sampling.schedule import make_schedule
from sampling.sigmas import SCHEDULES

SEEDS = (10, 11)  # a batch of two images, image i seeded SEEDS[i]
KD = {  # our sampler -> k-diffusion's function and arguments (DDIM is an Euler step, DDPM Euler ancestral's)
    "euler": ("sample_euler", {}), "euler_ancestral": ("sample_euler_ancestral", {}), "heun": ("sample_heun", {}),
    "dpm_2": ("sample_dpm_2", {}), "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}), "lms": ("sample_lms", {}),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}), "dpmpp_sde": ("sample_dpmpp_sde", {}),
    "dpmpp_2m": ("sample_dpmpp_2m", {}), "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}), "ddim": ("sample_euler", {}), "ddpm": ("sample_euler_ancestral", {}),
}
NEEDS_NOISE = {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "ddpm", "lcm"}
ALL_SCHEDULES = ("default", *SCHEDULES)
SCHEDULE_NAMES_CYCLE = tuple(SCHEDULES)


def fake_net(x_in, t, sigma=None):
    """A smooth stand-in for the guided UNet's eps: depends on the input and (through t) on the timestep."""
    return 0.3 * torch.tanh(x_in) + 0.0005 * t.view(-1, 1, 1, 1) * torch.ones_like(x_in)


def generators():
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def ours_noise(name, x, sigmas):
    if name in SDE:
        return brownian_noise(x, sigmas, SEEDS)
    return generator_noise(x, generators()) if name in NEEDS_NOISE else None


def reference_noise(name, x, sigmas):
    """The oracle's noise: the same generators' draws in call order, or k-diffusion's own Brownian trees."""
    if name in SDE:
        kd = k_diffusion_sampling()
        return kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=list(SEEDS))
    return generator_noise(x, generators()) if name in NEEDS_NOISE else None


def run_reference(name, denoise, x, sigmas, noise, eta=1.0, s_noise=1.0):
    """The reference sampler for `name` on our denoiser: k-diffusion's, or diffusers' scheduler for uni_pc/lcm."""
    if name.startswith("uni_pc"):
        return run_diffusers_unipc(denoise, x, sigmas, "bh2" if name == "uni_pc_bh2" else "bh1")
    function, kwargs = KD[name]
    if name in WITH_ETA:
        kwargs = {**kwargs, "eta": eta, "s_noise": s_noise}
    if noise is not None:
        kwargs = {**kwargs, "noise_sampler": noise}
    model = lambda x, sigma: denoise(x, sigma[0])  # noqa: E731 (k-diffusion passes sigma per image)
    return getattr(k_diffusion_sampling(), function)(model, x, sigmas, disable=True, **kwargs)


def run_diffusers_unipc(denoise, x, sigmas, variant):
    """diffusers' UniPCMultistepScheduler (order 3, data prediction, lower_order_final) stepped on our levels,
    the last 0 replaced by 0.001 as ComfyUI does; VP latents in, sigma-space x out."""
    from diffusers import UniPCMultistepScheduler

    levels = sigmas.clone()
    levels[-1] = 0.001 if levels[-1] == 0 else levels[-1]
    n = len(levels) - 1
    scheduler = UniPCMultistepScheduler(solver_order=max(1, min(3, n - 1)), solver_type=variant, predict_x0=True)
    scheduler.set_timesteps(n)
    scheduler.sigmas, scheduler.timesteps = levels, torch.arange(n, 0, -1)  # our levels; unique stand-in timesteps
    sample = x / (levels[0] ** 2 + 1) ** 0.5  # VP
    for i, t in enumerate(scheduler.timesteps):
        sigma = levels[i]
        eps = (sample * (sigma**2 + 1) ** 0.5 - denoise(sample * (sigma**2 + 1) ** 0.5, sigma)) / sigma
        sample = scheduler.step(eps, t, sample).prev_sample
    return sample * (levels[-1] ** 2 + 1) ** 0.5


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


CASES = [(name, schedule) for name in [*KD, "uni_pc", "uni_pc_bh2"] for schedule in ALL_SCHEDULES
         if not (schedule == "default" and name in ("ddim", "ddpm"))]  # those are diffusers' (test_samplers.py)


@pytest.mark.parametrize("name,schedule", CASES)
def test_sampler_equals_reference(name, schedule):
    # k-diffusion's 2M/3M SDE fail at 1 step (h unbound on the step to 0); ours return x0_hat there.
    for steps in (2, 7) if name in ("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde") else (1, 2, 7):
        where = f"{name} on {schedule}, {steps} steps"
        plan = make_schedule(name, steps, schedule=schedule)
        denoise = denoiser(fake_net, plan)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * plan.init_noise_sigma
        kwargs = {"noise": ours_noise(name, x, plan.sigmas)} if name in NEEDS_NOISE | SDE else {}
        ours = SAMPLERS[name](denoise, x, plan.sigmas, **kwargs)
        reference = run_reference(name, denoise, x, plan.sigmas, reference_noise(name, x, plan.sigmas))
        assert relative_error(ours, reference) < 1e-5, f"{where}: {relative_error(ours, reference):.2e}"


@pytest.mark.parametrize("name", sorted(WITH_ETA - CFG_PP))  # CFG++: no k-diffusion function (test_guidance.py)
def test_eta_and_s_noise_equal_reference(name):
    plan = make_schedule(name, 6, schedule="karras")
    denoise = denoiser(fake_net, plan)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * plan.init_noise_sigma
    for eta, s_noise in [(0.0, 1.0), (0.5, 1.0), (1.0, 0.7)]:
        ours = SAMPLERS[name](denoise, x, plan.sigmas, noise=ours_noise(name, x, plan.sigmas), eta=eta,
                              s_noise=s_noise)
        reference = run_reference(name, denoise, x, plan.sigmas, reference_noise(name, x, plan.sigmas), eta, s_noise)
        assert relative_error(ours, reference) < 1e-5, f"{name} eta={eta} s_noise={s_noise}"
    plain = SAMPLERS[name](denoise, x, plan.sigmas, noise=ours_noise(name, x, plan.sigmas))
    assert relative_error(ours, plain) > 1e-3, f"{name}: s_noise changed nothing"


def test_schedules_against_k_diffusion_and_scipy():
    """karras and exponential equal k-diffusion's get_sigmas_*; beta's quantiles equal scipy.stats.beta.ppf."""
    import scipy.stats

    from sampling.schedule import sigma_table
    from sampling.sigmas import beta_quantile

    kd, (_, table) = k_diffusion_sampling(), sigma_table()
    for steps in (1, 4, 28):
        sigma_min, sigma_max = float(table[0]), float(table[-1])
        torch.testing.assert_close(SCHEDULES["karras"](table, steps), kd.get_sigmas_karras(steps, sigma_min, sigma_max))
        torch.testing.assert_close(SCHEDULES["exponential"](table, steps),
                                   kd.get_sigmas_exponential(steps, sigma_min, sigma_max))
    q = np.linspace(0, 1, 401)
    np.testing.assert_allclose(beta_quantile(q, 0.6, 0.6), scipy.stats.beta.ppf(q, 0.6, 0.6), atol=1e-12)


# lcm, tcd: no k-diffusion function (tests/test_distilled.py); ddim and ddpm on default: diffusers' (test_samplers.py);
# the other samplers' default is normal itself, run once.
IMAGE_CASES = [(name, schedule) for name in [*KD, "uni_pc", "uni_pc_bh2"] for schedule in ALL_SCHEDULES
               if schedule != "default" or name in ("euler", "euler_ancestral", "dpmpp_2m")]


@pytest.fixture(scope="module")
def tiny_pipeline():
    from test_pipeline_parity import tiny_model

    from sampling.pipeline import Pipeline

    return Pipeline(tiny_model())


def reference_sampler(name, seeds):
    """The reference sampler for `name`, called as the pipeline calls ours."""
    def run(denoise, x, sigmas, *, noise=None, eta=1.0, s_noise=1.0, callback=None, after_step=None):
        assert after_step is None, "text-to-image only"
        if name in SDE:  # k-diffusion's own trees, one per image seeded with its seed
            noise = k_diffusion_sampling().BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                    seed=list(seeds))
        return run_reference(name, denoise, x, sigmas, noise, eta, s_noise)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name,schedule", IMAGE_CASES)
def test_images_equal_reference_sampler(tiny_pipeline, monkeypatch, name, schedule):
    """The whole pipeline (guidance, the UNet as denoiser, the VAE), with the reference sampler in place of ours:
    per image mean |diff| <= 0.5 and max <= 4 of 255, batch of 2 (each image its own seed)."""
    from test_pipeline_parity import assert_close_images

    import sampling.pipeline
    from sampling.settings import Settings

    eta = 0.7 if name in WITH_ETA else 1.0
    s = Settings(prompt="1girl, green hair", negative_prompt="lowres", width=64, height=64, steps=4, cfg=5.0,
                 sampler=name, schedule=schedule, eta=eta, seed=21, num_images=2)
    ours = tiny_pipeline(s, progress=False)
    monkeypatch.setitem(sampling.pipeline.SAMPLERS, name, reference_sampler(name, (21, 22)))
    theirs = tiny_pipeline(s, progress=False)
    assert_close_images(ours, [np.asarray(image) for image in theirs], f"{name} on {schedule}")


@pytest.mark.slow
def test_every_sampler_and_schedule_runs_from_the_cli_as_from_python(tmp_path, tiny_pipeline):
    """Every sampler from the command line (the bundled model), the schedules taken in turn so that each appears
    twice: the PNG records the pair, and its pixels equal the Python API's for the same settings. (Every pair
    runs through the pipeline in test_images_equal_reference_sampler; a command line costs a second a run.)"""
    from PIL import Image

    from sampling.generate import main
    from sampling.names import SAMPLER_NAMES
    from sampling.pnginfo import parse_parameters
    from sampling.settings import Settings

    pipe = tiny_pipeline.load("plainxl-tiny")
    for i, name in enumerate(SAMPLER_NAMES):
        schedule = ALL_SCHEDULES[i % len(ALL_SCHEDULES)]
        out = tmp_path / f"{name}-{schedule}"
        flags = ["--prompt", "1girl", "--steps", "3", "--seed", "4", "--sampler", name, "--schedule", schedule]
        assert main([*flags, "--out", str(out)]) == 0, f"{name} on {schedule}"
        image = next(out.iterdir())
        settings, _ = parse_parameters(Image.open(image).info["parameters"])
        assert (settings.sampler, settings.schedule) in [(name, schedule), (name, "normal")], f"{name} {schedule}"
        python = pipe(Settings(prompt="1girl", steps=3, seed=4, sampler=name, schedule=schedule), progress=False)
        assert np.array_equal(np.asarray(Image.open(image)), np.asarray(python[0])), f"{name} on {schedule}"


@pytest.mark.slow
def test_every_sampler_draws_each_images_noise_from_its_own_seed(tiny_pipeline):
    """Every sampler from Python, on its default schedule and a named one: image 1 of a batch seeded 4 equals a lone
    image seeded 5 (its initial, ancestral and Brownian noise are its own), to one level of 255 (the batch size may
    round apart). Where the noise comes from depends on the sampler, not on the schedule."""
    from sampling.names import SAMPLER_NAMES
    from sampling.settings import Settings

    pipe = tiny_pipeline.load("plainxl-tiny")
    for i, name in enumerate(SAMPLER_NAMES):
        for schedule in ("default", SCHEDULE_NAMES_CYCLE[i % len(SCHEDULE_NAMES_CYCLE)]):
            s = Settings(prompt="1girl", negative_prompt="lowres", steps=2, seed=4, sampler=name, schedule=schedule,
                         num_images=2)
            batch = pipe(s, progress=False)
            alone = pipe(Settings(**{**s.__dict__, "seed": 5, "num_images": 1}), progress=False)[0]
            difference = np.abs(np.asarray(batch[1], dtype=int) - np.asarray(alone, dtype=int))
            assert difference.max() <= 1, f"{name} on {schedule}: {difference.max()}"
            assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1])), f"{name} on {schedule}"
