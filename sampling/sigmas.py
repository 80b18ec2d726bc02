"""The named sampling schedules of ComfyUI (and AUTOMATIC1111's "Schedule type"): which noise levels a run of
`steps` steps passes through, as a (steps + 1,) float32 tensor ending in 0 (ddim_uniform and beta may give a
step more or fewer, as in ComfyUI).

Each function takes `table`, the model's noise schedule as sigmas: (T,) float32, sigma of training timestep
t = 0 .. T-1 (sampling.schedule.sigma_table); its ends are sigma_min = table[0] and sigma_max = table[-1].
They follow ComfyUI's comfy/samplers.py definitions (and k-diffusion's get_sigmas_karras/_exponential),
down to their float32 arithmetic; sampling.schedule.make_schedule pairs each level with a timestep.

    normal          even in timestep from T-1 to 0 (sigma interpolated in log sigma between timesteps)
    karras          even in sigma^(1/7), Karras et al. 2022 eq. 5 (unrounded; see docs/samplers.md for --karras)
    exponential     even in log sigma
    sgm_uniform     even in timestep over steps + 1 points, the last (t = 0) dropped: the SGM/Lightning spacing
    simple          every (T / steps)-th training sigma, from the top
    ddim_uniform    every (T // steps)-th training sigma from t = 1 up (the DDIM paper's uniform spacing)
    beta            timesteps at the quantiles of a Beta(0.6, 0.6) distribution, Lee et al. 2024
    kl_optimal      even in arctan(sigma), Sabour et al. 2024 ("Align Your Steps"), appendix
    align_your_steps  SDXL's published 10-step levels, log-linearly interpolated for other step counts
"""

import math

import numpy as np
import torch


def sigma_at(table, t):
    """sigma at fractional timesteps t (float32), interpolated linearly in log sigma (ComfyUI's sigma(t))."""
    log_table = table.log()
    t = t.float().clamp(0, len(table) - 1)
    low, high = t.floor().long(), t.ceil().long()
    w = t.frac()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def _zero_end(sigmas):
    return torch.cat([torch.as_tensor(sigmas, dtype=torch.float32), torch.zeros(1)])


def normal(table, steps):
    """Timesteps spaced evenly from the last to the first, both included."""
    return _zero_end(sigma_at(table, torch.linspace(len(table) - 1, 0, steps)))


def sgm_uniform(table, steps):
    """Timesteps spaced evenly over steps + 1 points from the last to the first, the first (t = 0) dropped."""
    return _zero_end(sigma_at(table, torch.linspace(len(table) - 1, 0, steps + 1)[:-1]))


def karras(table, steps, rho=7.0):
    """Even in sigma^(1/rho) from sigma_max to sigma_min. Karras et al. 2022, eq. 5: https://arxiv.org/abs/2206.00364"""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = float(table[0]) ** (1 / rho), float(table[-1]) ** (1 / rho)
    return _zero_end((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(table, steps):
    """Even in log sigma from sigma_max to sigma_min."""
    return _zero_end(torch.linspace(math.log(table[-1]), math.log(table[0]), steps).exp())


def simple(table, steps):
    """table[-1 - int(i * T / steps)] for i = 0 .. steps-1: every (T / steps)-th training level, from the top."""
    stride = len(table) / steps
    return _zero_end(torch.stack([table[-(1 + int(i * stride))] for i in range(steps)]))


def ddim_uniform(table, steps):
    """table[1], table[1 + k], table[1 + 2k] ... (k = T // steps) up to the top, highest first. As ComfyUI's, this
    is one step more than asked when T mod steps >= 2 (28 steps give 29)."""
    stride = max(len(table) // steps, 1)
    return _zero_end(table[1::stride].flip(0))


def _incomplete_beta(x, a, b, terms=100):
    """B_x(a, b), the integral of t^(a-1) (1-t)^(b-1) from 0 to x, for x in [0, 1/2] (numpy float64): the series
    x^a sum_n (1-b)_n / n! x^n / (a + n), whose terms shrink at least as fast as 2^-n there."""
    n = np.arange(terms)
    coefficients = np.cumprod(np.concatenate([[1.0], (n[1:] - b) / n[1:]]))  # (1-b)_n / n!
    return x**a * np.polyval((coefficients / (a + n))[::-1], x)


def beta_quantile(q, a, b):
    """The inverse CDF of Beta(a, b) at q (numpy float64), as scipy.stats.beta.ppf: bisection on the CDF."""
    total = math.gamma(a) * math.gamma(b) / math.gamma(a + b)  # B(a, b)

    def cdf(x):  # above 1/2 through the symmetry I_x(a, b) = 1 - I_(1-x)(b, a), where the series converges
        below_half = _incomplete_beta(np.minimum(x, 0.5), a, b)
        above_half = total - _incomplete_beta(np.minimum(1 - x, 0.5), b, a)
        return np.where(x <= 0.5, below_half, above_half) / total

    low, high = np.zeros_like(q), np.ones_like(q)
    for _ in range(60):  # 2^-60: below float64's spacing near 1
        middle = (low + high) / 2
        below = cdf(middle) < q
        low, high = np.where(below, middle, low), np.where(below, high, middle)
    return (low + high) / 2


def beta(table, steps, alpha=0.6, beta=0.6):
    """Timesteps at the quantiles 1, 1 - 1/steps, ... of Beta(alpha, beta), rounded; a timestep equal to the
    one before is dropped. Lee et al. 2024, "Beta Sampling is All You Need": https://arxiv.org/abs/2407.12173"""
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(beta_quantile(quantiles, alpha, beta) * (len(table) - 1)).astype(int)
    kept = [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    return _zero_end(table[kept])


def kl_optimal(table, steps):
    """Even in arctan(sigma) from sigma_max to sigma_min. Sabour et al. 2024, appendix:
    https://arxiv.org/abs/2404.14507"""
    fraction = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)  # ComfyUI's divides by 0 at 1 step
    return _zero_end((fraction * math.atan(table[0]) + (1 - fraction) * math.atan(table[-1])).tan())


SDXL_AYS = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
            0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]  # Sabour et al. 2024's SDXL levels (10 steps)


def align_your_steps(table, steps):
    """SDXL's optimised 10-step levels (Sabour et al. 2024, https://arxiv.org/abs/2404.14507), interpolated
    linearly in log sigma to steps + 1 points for other counts; the last level is replaced by 0."""
    levels = np.array(SDXL_AYS)
    if steps + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, np.log(levels[::-1])))[::-1]
    return torch.cat([torch.tensor(levels[:-1].copy(), dtype=torch.float32), torch.zeros(1)])


SCHEDULES = {"normal": normal, "karras": karras, "exponential": exponential, "sgm_uniform": sgm_uniform,
             "simple": simple, "ddim_uniform": ddim_uniform, "beta": beta, "kl_optimal": kl_optimal,
             "align_your_steps": align_your_steps}
