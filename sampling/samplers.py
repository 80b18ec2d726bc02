"""Samplers: pure functions over a denoiser, in sigma space (after k-diffusion's sampling.py).

x = x0 + sigma * eps. Every sampler is `sample_x(denoiser, x, sigmas, *, ...) -> x at sigmas[-1]`:
    denoiser    (x, sigma) -> x0_hat, sigma a 0-dim float32 tensor (sampling.pipeline.denoiser wraps the UNet);
                CFG++ samplers call denoiser(x, sigma, with_uncond=True) -> (x0_hat, the unconditional x0_hat)
    x, sigmas   (B, ...) the first latent, N(0, I) * schedule.init_noise_sigma; (N+1,) the level before each
                step, then the final one (sampling.schedule.make_schedule)
    noise       stochastic samplers: (sigma, sigma_next) -> N(0, I) like x (sampling/noise.py)
    eta, s_noise  ancestral and SDE samplers: the share of each step's noise that is fresh (0: the ODE), and a
                scale on it
    callback    called after each step with {"i", "x" (after the step), "sigma", "denoised"}
    after_step  (i, x) -> x after each step, before the callback (inpainting puts the known region back there)
The VAE's latent is x / sqrt(sigmas[-1]^2 + 1): x itself unless the final level is not 0 (DDIM, TCD).
Step math runs in at least float32: fp16/bf16 latents are upcast on entry; the result is float32.

Each sampler with a reference equals it on the same denoiser, sigmas and noise: k-diffusion's function of the
same name (tests/test_sampler_zoo.py), diffusers' LCM and TCD schedulers (tests/test_distilled.py); euler,
euler_ancestral, dpmpp_2m, ddim and ddpm also step as diffusers' schedulers on their own schedules
(tests/test_samplers.py). uni_pc is in sampling/unipc.py.
"""

from functools import partial

import numpy as np
import torch

from sampling.names import ALIASES, NOISY, SAMPLER_NAMES, SDE, SECOND_ORDER, WITH_ETA  # noqa: F401 (re-exported)
from sampling.unipc import sample_uni_pc


def _upcast(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _finish(i, x, sigma, denoised, after_step, callback):
    """The end of every step: after_step's change to x, then the callback."""
    if after_step is not None:
        x = after_step(i, x)
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    return x


def ancestral_step(sigma, sigma_next, eta=1.0):
    """(sigma_down, sigma_up): down to sigma_down, then noise of std sigma_up, sigma_down^2 + sigma_up^2 =
    sigma_next^2; with eta = 1 DDPM's posterior q(x_next | x, x0_hat)."""
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler(denoiser, x, sigmas, *, callback=None, after_step=None):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma, no churn.
    Karras et al. 2022, Algorithm 2: https://arxiv.org/abs/2206.00364"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        d = (x - denoised) / sigmas[i]  # dx/dsigma, the predicted eps
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = _finish(i, x, sigmas[i], denoised, after_step, callback)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, callback=None, after_step=None):
    """Euler down to sigma_down, then fresh noise up to sigma_next: Ho et al. 2020's ancestral sampling in
    sigma form. https://arxiv.org/abs/2006.11239"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:  # nothing to add at the end; the images are those of diffusers, which draws there too
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_euler_cfg_pp(denoiser, x, sigmas, *, callback=None, after_step=None):
    """CFG++ Euler: the guided x0_hat, renoised along the unconditional eps estimate, x0 + sigma_next (x - x0_uncond)
    / sigma (ComfyUI's euler_cfg_pp). Chung et al. 2024: https://arxiv.org/abs/2406.08070"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoiser(x, sigmas[i], with_uncond=True)
        x = denoised + sigmas[i + 1] * (x - uncond) / sigmas[i]
        x = _finish(i, x, sigmas[i], denoised, after_step, callback)
    return x


def sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, callback=None,
                                  after_step=None):
    """CFG++ Euler ancestral: as sample_euler_cfg_pp down to sigma_down, then fresh noise up to sigma_next.
    Chung et al. 2024: https://arxiv.org/abs/2406.08070"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = denoiser(x, sigma, with_uncond=True)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * (x - uncond) / sigma
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_heun(denoiser, x, sigmas, *, callback=None, after_step=None):
    """Heun's second-order steps (an Euler step, then the mean of both slopes); Euler for the step to 0.
    Karras et al. 2022, Algorithm 1: https://arxiv.org/abs/2206.00364"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_2 = x + d * (sigma_next - sigma)
            d_2 = (x_2 - denoiser(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * (sigma_next - sigma)
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def _dpm_2_step(denoiser, x, sigma, sigma_to, d):
    """DPM-Solver-2's midpoint step from sigma to sigma_to, the midpoint taken in log sigma."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - denoiser(x_2, sigma_mid)) / sigma_mid
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(denoiser, x, sigmas, *, callback=None, after_step=None):
    """DPM-Solver-2 steps in Karras et al.'s form (k-diffusion), Euler for the step to 0.
    Lu et al. 2022: https://arxiv.org/abs/2206.00927"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma) if sigma_next == 0 else _dpm_2_step(denoiser, x, sigma, sigma_next, d)
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_dpm_2_ancestral(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, callback=None, after_step=None):
    """DPM-Solver-2 down to sigma_down, then fresh noise up to sigma_next.
    Lu et al. 2022: https://arxiv.org/abs/2206.00927"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            x = _dpm_2_step(denoiser, x, sigma, sigma_down, d)
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def lms_coefficient(order, sigmas, i, j):
    """The weight of the slope from step i - j in a linear multistep step from sigmas[i] to sigmas[i + 1]: the
    integral of the Lagrange basis polynomial through the last `order` levels (exact, in float64)."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    basis = basis / np.prod([sigmas[i - j] - s for s in others])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


def sample_lms(denoiser, x, sigmas, *, order=4, callback=None, after_step=None):
    """Linear multistep: the slope extrapolated from the last `order` steps' slopes, integrated exactly.
    Karras et al. 2022 (k-diffusion): https://arxiv.org/abs/2206.00364"""
    x = _upcast(x)
    levels = sigmas.double().cpu().numpy()
    slopes = []  # the last `order` slopes, oldest first
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        slopes = [*slopes, (x - denoised) / sigmas[i]][-order:]
        current = min(i + 1, order)
        weights = [lms_coefficient(current, levels, i, j) for j in range(current)]  # j = 0 is this step's
        x = x + sum(w * d for w, d in zip(weights, reversed(slopes)))
        x = _finish(i, x, sigmas[i], denoised, after_step, callback)
    return x


def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, callback=None, after_step=None):
    """DPM-Solver++(2S), single-step second order in lambda = -log sigma, down to sigma_down, then fresh noise.
    Lu et al. 2022: https://arxiv.org/abs/2211.01095"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            h = sigma.log() - sigma_down.log()  # the step in lambda
            sigma_mid = (-(-sigma.log() + h / 2)).exp()  # halfway in lambda
            x_2 = (sigma_mid / sigma) * x - torch.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - torch.expm1(-h) * denoiser(x_2, sigma_mid)
        if sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_dpmpp_sde(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, r=0.5, callback=None, after_step=None):
    """DPM-Solver++ SDE: two stochastic first-order substeps (to lambda + r h, then to lambda + h), the second
    with the midpoint's x0_hat mixed in. Lu et al. 2022: https://arxiv.org/abs/2211.01095"""
    x = _upcast(x)
    # Steps in t = -log sigma, mapped back as k-diffusion does: Brownian noise is rough, so its levels must be these floats.
    t_of, sigma_of = (lambda sigma: -sigma.log()), (lambda t: (-t).exp())  # noqa: E731
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_next = t_of(sigma), t_of(sigma_next)
            s = t + r * (t_next - t)  # the substep's level, in t
            down, up = ancestral_step(sigma_of(t), sigma_of(s), eta)
            x_2 = (down / sigma_of(t)) * x - (t - t_of(down)).expm1() * denoised
            x_2 = x_2 + noise(sigma_of(t), sigma_of(s)) * s_noise * up
            mixed = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoiser(x_2, sigma_of(s))
            down, up = ancestral_step(sigma_of(t), sigma_of(t_next), eta)
            x = (down / sigma_of(t)) * x - (t - t_of(down)).expm1() * mixed
            x = x + noise(sigma_of(t), sigma_of(t_next)) * s_noise * up
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, callback=None, after_step=None):
    """DPM-Solver++(2M), second-order multistep in lambda = -log sigma; the first step and the step to 0 are
    first order (diffusers' lower_order_final). Lu et al. 2022, Algorithm 2: https://arxiv.org/abs/2211.01095"""
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
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, solver="midpoint", callback=None,
                        after_step=None):
    """DPM-Solver++(2M) SDE: the multistep update of the SDE, the second-order term as `solver` ("midpoint" or
    "heun"); the step to 0 returns x0_hat. Lu et al. 2022: https://arxiv.org/abs/2211.01095"""
    x = _upcast(x)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()  # the step in lambda
            decay = (-h - eta * h).expm1().neg()  # 1 - exp(-(1 + eta) h)
            x = sigma_next / sigma * (-eta * h).exp() * x + decay * denoised
            if old_denoised is not None:
                slope = (denoised - old_denoised) * (h / h_last)  # (1 / r) * the x0_hat difference
                x = x + (decay / (-h - eta * h) + 1 if solver == "heun" else 0.5 * decay) * slope
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-2 * eta * h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, noise, eta=1.0, s_noise=1.0, callback=None, after_step=None):
    """DPM-Solver++(3M) SDE: third-order multistep from the last three x0_hat (lower order at the start); the
    step to 0 returns x0_hat. Lu et al. 2022: https://arxiv.org/abs/2211.01095"""
    x = _upcast(x)
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None  # the last two steps' x0_hat and step sizes
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_lcm(denoiser, x, sigmas, *, noise, callback=None, after_step=None):
    """Latent consistency sampling: jump to x0_hat, then noise it afresh to the next level.
    Luo et al. 2023, Algorithm 1: https://arxiv.org/abs/2310.04378"""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
        x = _finish(i, x, sigmas[i], denoised, after_step, callback)
    return x


def sample_tcd(denoiser, x, sigmas, *, noise, sigmas_s, callback=None, after_step=None):
    """Trajectory consistency: along the predicted eps down to sigmas_s[i] <= sigma_next, then fresh noise up to
    sigma_next (sampling.schedule.tcd_levels: gamma 0 is deterministic). Zheng et al. 2024,
    https://arxiv.org/abs/2402.19159; as diffusers' TCDScheduler."""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, sigma_s = sigmas[i], sigmas[i + 1], sigmas_s[i]
        denoised = denoiser(x, sigma)
        x = denoised + sigma_s * (x - denoised) / sigma
        if sigma_s < sigma_next:
            x = x + noise(sigma, sigma_next) * (sigma_next**2 - sigma_s**2) ** 0.5
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_ddim(denoiser, x, sigmas, *, sigmas_to=None, callback=None, after_step=None):
    """Deterministic DDIM (eta 0): in sigma space exactly an Euler step, x0_hat + sigma_to * eps.
    Song et al. 2021: https://arxiv.org/abs/2010.02502. sigmas_to: (N,) the level each step lands on
    (Schedule.sigmas_to, diffusers' DDIM schedule); None means sigmas[1:]."""
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
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


def sample_ddpm(denoiser, x, sigmas, *, noise, callback=None, after_step=None):
    """DDPM ancestral sampling (fixed_small variance), Ho et al. 2020, eq. 7: https://arxiv.org/abs/2006.11239.
    In sigma space the posterior has mean x0_hat + (sigma_next^2 / sigma^2)(x - x0_hat) and variance
    sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2: Euler ancestral's step, in the form diffusers computes it."""
    x = _upcast(x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5  # posterior std
        x = denoised + (x - denoised) * (sigma_next**2 / sigma**2)  # posterior mean
        if sigma_next > 0:  # diffusers also draws at t = 0, with std 1e-10: the same images
            x = x + noise(sigma, sigma_next) * sigma_up
        x = _finish(i, x, sigma, denoised, after_step, callback)
    return x


# ComfyUI's sampler names -> functions. What each takes beyond (denoiser, x, sigmas, callback, after_step):
SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,  # noise, eta, s_noise
    "euler_cfg_pp": sample_euler_cfg_pp,  # a denoiser that also gives the unconditional x0
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,  # the same; noise, eta, s_noise
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,  # noise, eta, s_noise
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,  # noise, eta, s_noise
    "dpmpp_sde": sample_dpmpp_sde,  # Brownian noise, eta, s_noise
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,  # Brownian noise, eta, s_noise
    "dpmpp_2m_sde_heun": partial(sample_dpmpp_2m_sde, solver="heun"),  # Brownian noise, eta, s_noise
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,  # Brownian noise, eta, s_noise
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": partial(sample_uni_pc, variant="bh2"),
    "lcm": sample_lcm,  # noise (on its default schedule, sampling.schedule.consistency_boundary on the denoiser)
    "tcd": sample_tcd,  # noise, sigmas_s (sampling.schedule.tcd_levels)
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,  # noise
}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "sampling/names.py lists the samplers for the command line"
