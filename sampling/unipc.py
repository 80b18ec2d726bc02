"""UniPC: a multistep predictor (UniP) and corrector (UniC) of any order, here order 3 with data prediction, as
ComfyUI runs it (uni_pc = variant bh1, uni_pc_bh2 = bh2). Zhao et al. 2023: https://arxiv.org/abs/2302.04867

Written in sigma space, where UniPC's exponential integrator is x_t = (sigma_t / sigma_s) x_s - expm1(-h) x0_s
+ corrections, with h = lambda_t - lambda_s and lambda = -log sigma (the VP form's alpha_t factors cancel).
Each step predicts x_t from the last `order` x0_hat, evaluates the denoiser there, and corrects x_t with that
value, which then serves the next step too: one denoiser call per step. The last step is first order and
uncorrected (lower_order_final), and ends at sigma = 0.001 when the last level is 0, as ComfyUI's does (its
log-SNR parameterisation cannot reach 0); x there differs from x0_hat by 0.001 * eps.
"""

import math

import torch


def unipc_coefficients(rks, h, variant):
    """UniPC's linear system for a step of order k = len(rks): R (k, k) with R[i, j] = rks[j]^i, and b (k,) from
    the phi functions of -h, each divided by B(h) (h for bh1, e^h - 1 for bh2); rks[-1] = 1. float64."""
    hh = -h  # data prediction integrates in -lambda
    h_phi_1 = math.expm1(hh)  # h phi_1(h)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    B_h = hh if variant == "bh1" else math.expm1(hh)
    R, b = [], []
    for i in range(1, len(rks) + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, B_h


def _unipc_step(x, history, sigma_t, order, variant, denoiser):
    """One step from the latest level of `history` (a list of (sigma, x0_hat), newest last) to sigma_t with the
    last `order` entries -> (x_t, x0_hat at the predicted x_t, or None without the corrector)."""
    sigma_s, model_s = history[-1]
    h = math.log(sigma_s / sigma_t)
    rks = [math.log(sigma_s / sigma) / h for sigma, _ in history[-order:-1][::-1]]  # (lambda_i - lambda_s) / h, < 0
    D1s = [(model - model_s) / r for (_, model), r in zip(history[-order:-1][::-1], rks)]  # divided differences
    R, b, h_phi_1, B_h = unipc_coefficients([*rks, 1.0], h, variant)
    x_base = (sigma_t / sigma_s) * x - h_phi_1 * model_s  # the first-order (DDIM) step
    x_t = x_base
    if D1s:  # predictor, UniP-k
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_t = x_base - B_h * sum(rho * d for rho, d in zip(rhos_p, D1s))
    if denoiser is None:
        return x_t, None
    model_t = denoiser(x_t, torch.tensor(sigma_t, dtype=torch.float32))  # corrector, UniC-k
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    correction = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s)) + rhos_c[-1] * (model_t - model_s)
    return x_base - B_h * correction, model_t


def sample_uni_pc(denoiser, x, sigmas, *, variant="bh1", order=3, callback=None, after_step=None):
    """UniPC-3 with data prediction (variant "bh1" or "bh2"); orders ramp up over the first steps and down to 1 for
    the last. Zhao et al. 2023: https://arxiv.org/abs/2302.04867"""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    levels = [float(s) for s in sigmas]
    if levels[-1] == 0:
        levels[-1] = 0.001  # ComfyUI's end (see the module docstring)
    n = len(levels) - 1
    order = max(1, min(order, n - 1))  # ComfyUI: min(3, steps - 1)
    history = [(levels[0], denoiser(x, sigmas[0]))]
    for i in range(n):
        denoised = history[-1][1]
        step_order = min(order, i + 1, n - i)  # warm-up, then lower order at the end
        last = i == n - 1
        x, model_t = _unipc_step(x, history, levels[i + 1], step_order, variant, None if last else denoiser)
        history = [*history, (levels[i + 1], model_t)][-order:]
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x
