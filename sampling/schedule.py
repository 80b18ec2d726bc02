"""Sampling schedules in sigma space: diffusers' five schedulers' `set_timesteps` reproduced exactly (the
"default" schedule), and ComfyUI's named schedules (sampling/sigmas.py) with a timestep for every level.

Two words, one meaning each: the *noise schedule* is the model's, alpha_bar_t over the training timesteps
(`alphas_cumprod`, fixed by training); a *sampling schedule* (`Schedule`, made by `make_schedule`) is the
sigmas and timesteps one run steps through, picked from the noise schedule.

Everything here lives in sigma space (k-diffusion's convention): x = x0 + sigma * eps, with
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t). A VP-space latent (what diffusers' DDIM, DDPM and
DPM-Solver step on) is x / sqrt(sigma^2 + 1). A sampling schedule is a few tensors handed to a pure sampler
(sampling/samplers.py); `make_schedule` builds them the way each diffusers scheduler does (spec section 5),
down to its float32/float64 choices, so sigmas and timesteps match diffusers to float32 rounding.

Per scheduler (the differences that change images):
  euler, euler_a  EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: sigmas linearly interpolated
                  at (possibly fractional) timesteps; Karras range = the spaced sigmas' ends, timesteps fractional.
  dpmpp_2m        DPMSolverMultistepScheduler: its own "leading" (N+1 points, last dropped); Karras range = the
                  full training table, timesteps rounded to integers.
  ddim            DDIMScheduler: integer timesteps; each step goes to t - T // N (`sigmas_to`), and the final
                  level is alpha_bar[0] unless set_alpha_to_one, so sigmas[-1] may be > 0.
  ddpm            DDPMScheduler: integer timesteps, each step to the next one, final sigma 0.
Named schedules (named_schedule) pair each level with its timestep interpolated in log sigma on the model's
table, as the denoiser does for levels between steps; the first latent is noise * sqrt(1 + sigmas[0]^2).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from models.sdxl import SDXL_SCHEDULER_CONFIG  # re-exported: the schedule's defaults
from sampling.names import ALIASES, SAMPLER_NAMES, SPACED_SAMPLERS, canonical_sampler
from sampling.sigmas import SCHEDULES, sigma_at

SPACINGS = ("leading", "trailing", "linspace")

# Config values that would change outputs in ways not implemented here, per sampler that reads them:
# {key: the only value we implement}. Keys a scheduler does not read are ignored, as diffusers ignores them.
_COMMON = {"trained_betas": None}
_EULER = {"interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
          "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None}
_ONLY = {
    "euler": {**_COMMON, **_EULER},
    "euler_a": _COMMON,
    "dpmpp_2m": {**_COMMON, "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                 "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
                 "thresholding": False, "variance_type": None, "lambda_min_clipped": -math.inf,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                 "use_flow_sigmas": False, "use_dynamic_shifting": False},
    # clip_sample clamps x0 to [-1, 1]: meant for pixel-space models, wrong for SDXL latents (spec 5.7).
    "ddim": {**_COMMON, "clip_sample": False, "thresholding": False},
    "ddpm": {**_COMMON, "clip_sample": False, "thresholding": False, "variance_type": "fixed_small"},
}


def alphas_cumprod(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   zero_terminal_snr=False):
    """alpha_bar_t for t = 0..T-1, (T,) float32, computed in float32 exactly as diffusers does.

    zero_terminal_snr: Lin et al. 2024, Algorithm 1 (diffusers' rescale_betas_zero_snr): shift and scale
    sqrt(alpha_bar) so that it is 0 at t = T-1 and unchanged at t = 0, then alpha_bar[-1] = 0 exactly."""
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not implemented; use 'scaled_linear' or 'linear'.")
    if zero_terminal_snr:
        root = torch.cumprod(1.0 - betas, dim=0).sqrt()  # sqrt(alpha_bar), (T,)
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * (first / (first - last))
        alpha_bar = root**2
        betas = 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # back to betas, as diffusers
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_from_alpha_bar(alpha_bar):
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): noise level of x = x0 + sigma * eps (float32 as given)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. 2022 eq. (5): n levels from sigma_max to sigma_min, even in sigma^(1/rho); (n,) float64."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigmas, log_table):
    """Fractional timesteps of sigmas by piecewise-linear interpolation in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (n,) float64
    dists = log_sigma - log_table[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_table) - 2)  # last table entry <= sigma
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _spaced_timesteps(spacing, n, cfg, dpm):
    """The training timesteps set_timesteps picks (spec 5.2), float64, highest first, before any rounding."""
    T, offset = cfg["num_train_timesteps"], cfg["steps_offset"]
    m = n + 1 if dpm else n  # DPMSolverMultistep spaces N+1 points and drops the last one
    if spacing == "leading":
        t = (np.arange(0, m) * (T // m)).round()[::-1][:n] + offset
        if t[0] > T - 1:  # diffusers clamps sigma (Euler, DPM) or fails (DDIM, DDPM), and feeds t = T to the UNet
            raise ValueError(f"'leading' spacing with {n} steps and steps_offset {offset} starts at timestep "
                             f"{int(t[0])}, past the last training timestep {T - 1}; use fewer steps.")
        return t
    if spacing == "linspace":
        return np.linspace(0, T - 1, m)[::-1][:n]
    if spacing == "trailing":
        t = np.arange(T, 0, -T / n).round() - 1
        if len(t) != n:  # np.arange overshoots by one point for some N (61, 103, ...): diffusers then adds t = -1
            raise ValueError(f"'trailing' spacing with {n} steps hits a diffusers bug (an extra timestep -1); "
                             f"use {n - 1} or {n + 1} steps, or another spacing.")
        return t
    raise ValueError(f"timestep spacing {spacing!r} is unknown; use one of {SPACINGS}.")


@dataclass(frozen=True)
class Schedule:
    """What a sampler needs: noise levels, the UNet timestep paired with each, and the initial noise scale.

    Start from x = N(0, I) * init_noise_sigma (sigma space). The sampler returns x at sigmas[-1]; the latent
    the VAE decodes is x / sqrt(sigmas[-1]**2 + 1), which is x itself unless the final level is not 0 (DDIM).
    """
    sigmas: torch.Tensor  # (N+1,) float32: the level before each step, then the final one
    timesteps: torch.Tensor  # (N,) float32: the UNet timestep at sigmas[i] (fractional for Euler with Karras/linspace)
    init_noise_sigma: float  # std of the initial noise in sigma space
    sigmas_to: torch.Tensor | None = None  # (N,) DDIM only: the level each step lands on (see make_schedule)
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction": how the denoiser reads the UNet output
    table: torch.Tensor | None = None  # (T,) float32: the model's sigma per training timestep (sigma_table)

    def timestep(self, sigma):
        """The UNet timestep for sigma: the one paired with it if sigma is a level of self.sigmas[:-1] (diffusers'
        own timesteps, for the default schedules), else interpolated in log sigma on the table (the levels
        between steps that second-order samplers visit)."""
        hits = (self.sigmas[:-1] == float(sigma)).nonzero()
        if len(hits) > 0:
            return self.timesteps[hits[0, 0]]  # make_schedule's sigmas[:-1] never repeat
        if self.table is None:
            raise ValueError(f"sigma {float(sigma)} is not a step of this schedule; pass a value of sigmas[:-1].")
        return torch.tensor(_sigma_to_t(np.array([float(sigma)]), np.log(self.table.double().numpy()))[0],
                            dtype=torch.float32)


def sigma_table(config=None):
    """The model's noise schedule -> (alpha_bar, sigma), each (T,) float32 over the training timesteps.

    Zero terminal SNR makes the last timestep pure noise, sigma = inf; as diffusers' Euler and DPM-Solver,
    its alpha_bar moves from 0 to 2**-24 (sigma ~ 4096) so that every level is finite."""
    cfg = {**SDXL_SCHEDULER_CONFIG, **(config or {})}
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    ac = alphas_cumprod(cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"], zero_snr)
    if zero_snr:
        ac[-1] = 2**-24
    return ac, sigma_from_alpha_bar(ac)


def make_schedule(sampler, steps, *, schedule="default", spacing=None, karras=None, config=None):
    """The sampling schedule of `steps` steps for `sampler`, in sigma space.

    Args:
        sampler: a name of sampling.samplers.SAMPLERS (or "euler_a").
        steps: number of steps, 1..num_train_timesteps.
        schedule: "default", or a name of sampling.sigmas.SCHEDULES (ComfyUI's schedules). "default" is the
            schedule of diffusers' scheduler for euler, euler_a / euler_ancestral, dpmpp_2m, ddim and ddpm
            (below), and "normal" for the other samplers.
        spacing: "leading", "trailing" or "linspace"; None takes config["timestep_spacing"] (default only).
        karras: Karras sigmas (euler, euler_a, dpmpp_2m); None takes config["use_karras_sigmas"] (default only).
            diffusers 0.42.1's EulerAncestral has no Karras option (and ignores the config key): for
            euler_a we use Euler's Karras table.
        config: a diffusers scheduler_config.json dict; missing keys take SDXL's values
            (SDXL_SCHEDULER_CONFIG), not the per-class defaults of diffusers.
    """
    cfg = {**SDXL_SCHEDULER_CONFIG, **(config or {})}
    if sampler not in (*SAMPLER_NAMES, *ALIASES):
        raise ValueError(f"sampler {sampler!r} is unknown; use one of {', '.join(SAMPLER_NAMES)}.")
    sampler = "euler_a" if sampler == "euler_ancestral" else sampler
    T = cfg["num_train_timesteps"]
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and num_train_timesteps ({T}); got {steps}.")
    if cfg.get("trained_betas") is not None:
        raise ValueError("config sets trained_betas, which is not implemented here; use trained_betas=None.")
    if karras and (schedule != "default" or sampler not in ("euler", "euler_a", "dpmpp_2m")):
        raise ValueError("karras=True is diffusers' Karras schedule, for euler, euler_a and dpmpp_2m; "
                         "use schedule='karras' with other samplers or schedules.")
    if schedule == "default" and sampler in ("lcm", "tcd"):
        return consistency_schedule(sampler, steps, cfg)
    if schedule != "default" or canonical_sampler(sampler) not in SPACED_SAMPLERS:
        return named_schedule(sampler, steps, "normal" if schedule == "default" else schedule, cfg)
    return diffusers_schedule(sampler, steps, spacing, karras, cfg)


def diffusers_schedule(sampler, steps, spacing, karras, cfg):
    """The schedule diffusers' scheduler for `sampler` (euler, euler_a, dpmpp_2m, ddim, ddpm) sets, exactly."""
    T = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"] if spacing is None else spacing
    karras = bool(cfg.get("use_karras_sigmas", False)) if karras is None else karras
    # diffusers' DDIM and DDPM step on alpha_bar[-1] = 0 itself under zero terminal SNR: sigma = inf.
    if cfg.get("rescale_betas_zero_snr") and sampler in ("ddim", "ddpm"):
        raise ValueError(f"this model has zero terminal SNR (rescale_betas_zero_snr), which {sampler} here cannot "
                         "sample (its first step is at sigma = inf); use euler, euler_a or dpmpp_2m.")
    for key, value in _ONLY[sampler].items():
        if cfg.get(key, value) != value:
            raise ValueError(f"config sets {key}={cfg[key]!r}, which {sampler} here does not implement; "
                             f"use {key}={value!r}.")

    ac, table = sigma_table(cfg)  # (T,) float32 each: alpha_bar and sigma of each training timestep
    table = table.numpy()
    log_table = np.log(table)
    sigmas_to = None

    if sampler in ("euler", "euler_a"):
        # Euler keeps "linspace" timesteps fractional and interpolates sigma at the float32 timesteps.
        t = _spaced_timesteps(spacing, steps, cfg, dpm=False).astype(np.float32)
        sigmas = np.interp(t, np.arange(T), table)  # float64
        if karras:  # range = the spaced sigmas' ends (spec 5.5); timesteps stay fractional
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
            t = _sigma_to_t(sigmas, log_table)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        sigma_max = sigmas.max()
        # diffusers quirk: "leading" scales the noise by sqrt(sigma_max^2 + 1), trailing/linspace by sigma_max.
        init = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    elif sampler == "dpmpp_2m":
        if karras:  # range = the full training table (spec 5.5), spacing unused; timesteps rounded to integers
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), steps)
            t = _sigma_to_t(sigmas, log_table).round()
        else:
            t = _spaced_timesteps(spacing, steps, cfg, dpm=True).round()
            sigmas = np.interp(t, np.arange(T), table)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    else:  # ddim, ddpm: integer timesteps, levels read straight off alpha_bar
        t = torch.from_numpy(_spaced_timesteps(spacing, steps, cfg, dpm=False).round().astype(np.int64))
        # After the last step: DDPM reaches alpha_bar = 1 (sigma 0), DDIM alpha_bar[0] unless set_alpha_to_one.
        final = ac[0] if sampler == "ddim" and not cfg["set_alpha_to_one"] else torch.tensor(1.0)
        sigmas = sigma_from_alpha_bar(torch.cat([ac[t], final[None]]))  # (N+1,)
        if sampler == "ddim":  # DDIM steps from t to t - T // N: for trailing/linspace not the next timestep
            prev = t - T // steps
            sigmas_to = sigma_from_alpha_bar(torch.where(prev >= 0, ac[prev.clamp(min=0)], final))
    if sampler not in ("euler", "euler_a"):  # VP noise of std 1: diffusers' init_noise_sigma = 1
        init = (sigmas[0] ** 2 + 1) ** 0.5
    if not (sigmas[1:-1] < sigmas[:-2]).all():  # too many steps for the spacing: diffusers repeats timesteps
        raise ValueError(f"{steps} steps with {spacing!r} spacing repeat a noise level; use fewer steps.")
    return Schedule(sigmas=sigmas, timesteps=torch.as_tensor(t, dtype=torch.float32),
                    init_noise_sigma=float(init), sigmas_to=sigmas_to,
                    prediction_type=cfg["prediction_type"], table=torch.from_numpy(table))


# ComfyUI makes these samplers' schedules for steps + 1 and drops the second-to-last level: their last step,
# to 0, is a first-order one, and this keeps the step before it second order (comfy/samplers.py).
DISCARD_PENULTIMATE = ("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2")


def consistency_timesteps(steps, T=1000, original_steps=50):
    """LCM's and TCD's timesteps (diffusers' LCMScheduler / TCDScheduler): `steps` of the `original_steps` evenly
    spaced training timesteps the model was distilled on (T/50 - 1, 2T/50 - 1, ..., T - 1), highest first."""
    if steps > original_steps:
        raise ValueError(f"{steps} steps is more than the {original_steps} timesteps LCM and TCD models are "
                         "distilled on; use at most that, or another schedule")
    distilled = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    return distilled[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]


def consistency_schedule(sampler, steps, config):
    """The default schedule of lcm and tcd: diffusers' LCMScheduler's and TCDScheduler's timesteps, their levels
    read off the table. TCD's last step lands on sigma(t = 0), not 0 (its final alpha_bar is alpha_bar[0])."""
    _, table = sigma_table(config)
    t = torch.from_numpy(consistency_timesteps(steps, config["num_train_timesteps"]).copy())
    final = table[:1] if sampler == "tcd" else torch.zeros(1)
    sigmas = torch.cat([table[t], final])
    return Schedule(sigmas=sigmas, timesteps=t.float(), init_noise_sigma=float((sigmas[0] ** 2 + 1) ** 0.5),
                    prediction_type=config["prediction_type"], table=table)


def consistency_boundary(denoiser, timestep_of, sigma_data=0.5, timestep_scaling=10.0):
    """LCM's boundary condition, as diffusers' LCMScheduler applies it: c_out(t) x0_hat + c_skip(t) x_vp, with
    t scaled by 10, so the model is the identity at t = 0 (c_skip is ~1e-7 at the timesteps LCM samples)."""
    def denoise(x, sigma):
        t = float(timestep_of(sigma)) * timestep_scaling
        c_skip, c_out = sigma_data**2 / (t**2 + sigma_data**2), t / (t**2 + sigma_data**2) ** 0.5
        return c_out * denoiser(x, sigma) + c_skip * x / (sigma**2 + 1) ** 0.5
    return denoise


def tcd_levels(schedule, gamma):
    """(N,) the level each TCD step jumps to before it renoises: sigma at timestep floor((1 - gamma) t_next), as
    diffusers' TCDScheduler (t_next = 0 after the last step), unfloored and interpolated where the schedule's
    timesteps are fractional (named schedules); gamma 0 is the next level itself (deterministic); the last step
    ends where the schedule does."""
    if gamma == 0:
        return schedule.sigmas[1:].clone()
    t_next = torch.cat([schedule.timesteps[1:], torch.zeros(1)])
    whole = bool((schedule.timesteps == schedule.timesteps.floor()).all())
    t_s = torch.floor((1 - gamma) * t_next) if whole else (1 - gamma) * t_next
    levels = sigma_at(schedule.table, t_s)
    levels[-1] = schedule.sigmas[-1]
    return torch.minimum(levels, schedule.sigmas[1:])


def named_schedule(sampler, steps, name, config):
    """One of ComfyUI's schedules (sampling.sigmas.SCHEDULES) for `sampler`: the levels, each level's timestep
    interpolated in log sigma on the model's table, and the first latent's scale sqrt(1 + sigmas[0]^2) (noise
    of std 1 in the VP space the UNet sees)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is unknown; use default or one of {', '.join(SCHEDULES)}.")
    _, table = sigma_table(config)
    discard = sampler in DISCARD_PENULTIMATE
    sigmas = SCHEDULES[name](table, steps + 1 if discard else steps)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    if not (sigmas[1:-1] < sigmas[:-2]).all():
        raise ValueError(f"the {name} schedule repeats a noise level at {steps} steps; use fewer steps.")
    timesteps = _sigma_to_t(sigmas[:-1].double().numpy(), np.log(table.double().numpy()))
    return Schedule(sigmas=sigmas, timesteps=torch.tensor(timesteps, dtype=torch.float32),
                    init_noise_sigma=float((sigmas[0] ** 2 + 1) ** 0.5), prediction_type=config["prediction_type"],
                    table=table)
