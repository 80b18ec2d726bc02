"""Samplers: pure functions over a denoiser, in sigma space (after k-diffusion's sampling.py).

x = x0 + sigma * eps. A denoiser is `denoiser(x, sigma) -> x0_hat`, with sigma a 0-dim tensor taken from
`sigmas`; the pipeline builds it around the UNet (input x / sqrt(sigma^2 + 1), the schedule's timestep for
sigma, eps or v turned into x0). `sigmas` (N+1,) comes from sampling.schedule.make_schedule: the level before
each step, then the final one. Start from x = N(0, I) * schedule.init_noise_sigma; each sampler returns x at
sigmas[-1] (the VAE's latent is x / sqrt(sigmas[-1]^2 + 1), i.e. x unless the final level is not 0: DDIM).

How diffusers' schedulers map here (checked step by step against diffusers in tests/test_samplers.py):
  EulerDiscreteScheduler          sample_euler
  EulerAncestralDiscreteScheduler sample_euler_ancestral
  DPMSolverMultistepScheduler     sample_dpmpp_2m  (dpmsolver++, order 2, midpoint, final sigma 0)
  DDIMScheduler (eta 0)           sample_ddim      (an Euler step, plus diffusers' reinterpretation quirk)
  DDPMScheduler (fixed_small)     sample_ddpm      (exactly Euler ancestral in sigma space)
Step math runs in at least float32: fp16/bf16 latents are upcast on entry (diffusers upcasts each step)
and the result is returned in float32.

Noise (`generator`): one torch.Generator, or a list of B generators, one per image: image b's noise is drawn
on its generator's device as a (1, ...) float32 tensor, exactly as diffusers' randn_tensor does with a list,
so an image's noise depends only on its own seed. Each ancestral step draws once per image.

`callback`, if given, is called after each step with {"i", "x" (after the step), "sigma", "denoised"}.
`after_step`, if given, maps (i, x) -> x after each step, before the callback: inpainting puts the known
region back there, as diffusers' inpainting pipeline blends the latents after each scheduler step.
"""

import torch


def _upcast(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def noise_like(x, generator):
    """N(0, I) shaped like x, drawn in float32 as diffusers' randn_tensor draws it, then moved to x."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per image.")
        draws = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.cat(draws).to(x)  # (B, ...)
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)


def sample_euler(denoiser, x, sigmas, *, callback=None, after_step=None):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma (Karras et al. 2022, Alg. 1).

    No churn (s_churn = 0), as diffusers' pipelines call EulerDiscreteScheduler.

    Args:
        denoiser: callable (x, sigma) -> x0_hat.
        x: (B, ...) initial latents in sigma space, noise * init_noise_sigma.
        sigmas: (N+1,) noise levels, the last usually 0.
        callback, after_step: optional, see the module docstring.
    """
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        d = (x - denoised) / sigmas[i]  # dx/dsigma, the predicted eps
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, after_step=None):
    """Euler ancestral (k-diffusion): Ho et al. 2020's ancestral step in Karras et al. 2022's sigma form.

    Each step goes deterministically down to sigma_down, then adds fresh noise of std sigma_up, so that
    sigma_down^2 + sigma_up^2 = sigma_next^2 and the step is DDPM's posterior q(x_next | x, x0_hat).

    Args:
        denoiser: callable (x, sigma) -> x0_hat.
        x: (B, ...) initial latents in sigma space, noise * init_noise_sigma.
        sigmas: (N+1,) noise levels, the last 0.
        generator: None, a torch.Generator, or a list of B generators (one per image).
        callback, after_step: optional, see the module docstring.
    """
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        # diffusers draws on every step, the last too (where sigma_up = 0): keep the same draws per image.
        x = x + noise_like(x, generator) * sigma_up
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, callback=None, after_step=None):
    """DPM-Solver++(2M), second-order multistep in lambda = -log(sigma) (Lu et al. 2022, Algorithm 2).

    As diffusers' DPMSolverMultistepScheduler with its defaults: the first step is first order (no history),
    so is the step to sigma = 0 (lower_order_final), whose result is x0_hat itself.

    Args:
        denoiser: callable (x, sigma) -> x0_hat.
        x: (B, ...) initial latents in sigma space, noise * init_noise_sigma.
        sigmas: (N+1,) noise levels, the last usually 0.
        callback, after_step: optional, see the module docstring.
    """
    x = _upcast(x)
    old_denoised = None  # x0_hat of the previous step: the multistep history
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised  # the h -> inf limit of the first-order step (diffusers computes 0 * x + x0_hat)
        else:
            h = torch.log(sigma / sigma_next)  # step size in lambda
            if old_denoised is None:
                D = denoised  # first order: DPM-Solver++(1) = DDIM
            else:
                r = torch.log(sigmas[i - 1] / sigma) / h  # previous step size over this one
                D = denoised + (denoised - old_denoised) / (2 * r)  # midpoint correction
            x = (sigma_next / sigma) * x - torch.expm1(-h) * D
        old_denoised = denoised
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


def sample_ddim(denoiser, x, sigmas, *, sigmas_to=None, callback=None, after_step=None):
    """Deterministic DDIM, eta = 0 (Song et al. 2021): in sigma space exactly an Euler step x0_hat + sigma_to * eps.

    Args:
        denoiser: callable (x, sigma) -> x0_hat.
        x: (B, ...) initial latents in sigma space, noise * init_noise_sigma.
        sigmas: (N+1,) noise levels; the last is sigma(alpha_bar[0]) > 0 unless set_alpha_to_one.
        sigmas_to: (N,) the level each step lands on (Schedule.sigmas_to); None means sigmas[1:].
        callback, after_step: optional, see the module docstring.
    """
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_to = sigma_next if sigmas_to is None else sigmas_to[i]
        denoised = denoiser(x, sigma)
        eps = (x - denoised) / sigma
        x = denoised + eps * sigma_to  # = x + eps * (sigma_to - sigma), without cancellation on big steps
        # diffusers quirk, reproduced for image parity: DDIM steps from t to t - T // N, which for "trailing" and
        # "linspace" spacing is not the next timestep, then feeds that VP latent x / sqrt(sigma_to^2 + 1)
        # unchanged to the next timestep, i.e. reads it as being at sigma_next. A no-op when sigma_to = sigma_next.
        x = x * ((sigma_next**2 + 1) / (sigma_to**2 + 1)) ** 0.5
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, after_step=None):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7), fixed_small variance, written in sigma space.

    With x_vp = x / sqrt(sigma^2 + 1), DDPM's posterior q(x_next | x, x0_hat) divided by sqrt(alpha_bar_next)
    has mean x0_hat + (sigma_next^2 / sigma^2)(x - x0_hat) and variance sigma_next^2 (sigma^2 - sigma_next^2)
    / sigma^2: exactly Euler ancestral's sigma_down / sigma and sigma_up^2, in the form diffusers computes it.

    Args:
        denoiser: callable (x, sigma) -> x0_hat.
        x: (B, ...) initial latents in sigma space, noise * init_noise_sigma.
        sigmas: (N+1,) noise levels from make_schedule("ddpm", ...), the last 0.
        generator: None, a torch.Generator, or a list of B generators (one per image).
        callback, after_step: optional, see the module docstring.
    """
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5  # posterior std
        x = denoised + (x - denoised) * (sigma_next**2 / sigma**2)  # posterior mean
        # diffusers draws on each step with timestep t > 0, the last one too (with std 1e-10, its variance
        # clamp); we draw on every step, with std exactly 0 on the last. Only the draw at t = 0 differs, and
        # it can only be the last draw: the same images, only the generators' final state differs.
        x = x + noise_like(x, generator) * sigma_up
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


SAMPLERS = {  # name (as in make_schedule) -> sampler function
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
}
