"""Guidance: a conditional net -> a guided one. Classifier-free guidance and what people add to it:

    guided                     CFG (Ho & Salimans 2022) with guidance rescale, and on top of it, as Settings ask:
                               PAG's perturbed pass, APG's projection, a sigma interval outside which it is off
    adaptive_projected         APG: the guidance split along the conditional prediction, its parallel part cut
    identity_self_attention    PAG's perturbation: self-attention maps replaced by the identity in chosen layers
    x0_from_output, output_from_x0   the UNet's eps or v <-> the denoised x0 it stands for

A guided net is net(x_in, t, sigma, with_uncond=False) -> the model output (eps or v) the denoiser turns into
x0 (sampling.pipeline.denoiser); with_uncond=True -> (that output, the unconditional one), for CFG++ samplers.
"""

import fnmatch
from contextlib import contextmanager

import torch


def x0_from_output(out, x, sigma, prediction_type):
    """The UNet's output at x (sigma space) -> the denoised x0: eps, or v = alpha * eps - s * x0 in VP space."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'.")


def output_from_x0(x0, x, sigma, prediction_type):
    """The inverse of x0_from_output: the eps or v whose x0 at x is x0 (guidance that combines in x0 space)."""
    if prediction_type == "epsilon":
        return (x - x0) / sigma
    return (x / (sigma**2 + 1) - x0) * ((sigma**2 + 1) ** 0.5 / sigma)


def adaptive_projected(x0_cond, x0_uncond, scale, eta, norm_threshold, momentum=None):
    """Adaptive projected guidance on denoised predictions (B, C, H, W): the difference cond - uncond, averaged with
    negative momentum over steps, its norm capped at norm_threshold, and its component parallel to x0_cond scaled
    by eta (0 drops it: the part that oversaturates). Sadat et al. 2024, Alg. 1: https://arxiv.org/abs/2410.02416
    momentum: None, or a dict {"beta", "average"} carried from step to step."""
    diff = x0_cond - x0_uncond
    if momentum is not None:
        momentum["average"] = diff + momentum["beta"] * momentum.get("average", 0)
        diff = momentum["average"]
    dims = list(range(1, diff.ndim))
    if norm_threshold > 0:
        diff = diff * torch.clamp(norm_threshold / diff.norm(p=2, dim=dims, keepdim=True), max=1.0)
    unit = torch.nn.functional.normalize(x0_cond.double(), dim=dims)  # the projection in float64, as the paper
    parallel = ((diff.double() * unit).sum(dim=dims, keepdim=True) * unit).to(diff.dtype)
    return x0_cond + (scale - 1) * ((diff - parallel) + eta * parallel)


def pag_modules(unet, patterns):
    """The self-attention modules (attn1) under the UNet modules named by `patterns`: official names with fnmatch
    wildcards ("middle_block.1", "output_blocks.[0-2].1"), or "mid", diffusers' name for the middle block."""
    patterns = ["middle_block.*" if p in ("mid", "mid_block") else p.removeprefix("unet.") for p in patterns]
    found = [module for name, module in unet.named_modules() if name.endswith(".attn1")
             and any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)]
    if not found:
        raise ValueError(f"--pag-layers {' '.join(patterns)} names no self-attention of this UNet; use mid, or an "
                         "official block name such as middle_block.1 or output_blocks.1.1")
    return found


@contextmanager
def identity_self_attention(modules):
    """Each module's attention map is the identity, so it returns to_out(v): PAG's perturbation.
    Ahn et al. 2024: https://arxiv.org/abs/2403.17377"""
    saved = [module.attend for module in modules]  # models.layers.attention, or an instrument's
    try:
        for module in modules:
            module.attend = lambda q, k, v, heads: v
        yield
    finally:
        for module, attend in zip(modules, saved):
            module.attend = attend


def guided(net, cond, uncond, s, split=False, perturbed_modules=(), to_x0=None, from_x0=None, momentum=None):
    """Guidance around net(x, t, context, y) -> model output, as Settings s asks (cfg, guidance_rescale, pag_scale,
    apg, cfg_interval). cond/uncond are (context, y) pairs; uncond is None without guidance.

    CFG batch order [uncond, cond] (diffusers'); split: two passes of batch B instead of one of 2B. A scale <= 1
    runs the conditional pass only (as diffusers), unless a caller asks for the unconditional output too.
    PAG adds pag_scale (cond - perturbed) to the guided output, the perturbed pass being the conditional one with
    perturbed_modules' self-attention replaced by the identity (diffusers' StableDiffusionXLPAGPipeline).
    APG (s.apg) combines in x0 space: to_x0 / from_x0 convert (output, x_in, sigma) <-> x0; momentum, APG's running
    average, is shared by the guided nets of one run (prompt editing makes several)."""
    # the CFG batch [uncond, cond] (diffusers' order), concatenated once rather than at every step
    both_cond = (torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]])) if uncond is not None else None

    def guided_net(x, t, sigma, with_uncond=False):
        in_interval = s.cfg_interval is None or s.cfg_interval[0] < float(sigma) <= s.cfg_interval[1]
        cfg = s.cfg if in_interval else 1.0  # Kynkäänniemi et al. 2024: guidance off outside the interval
        if cfg <= 1 and not with_uncond:
            out_cond = net(x, t, *cond)
            out_uncond = None
        elif split:
            out_uncond, out_cond = net(x, t, *uncond), net(x, t, *cond)
        else:
            out_uncond, out_cond = net(torch.cat([x, x]), torch.cat([t, t]), *both_cond).chunk(2)
        out = out_cond if cfg <= 1 else out_uncond + cfg * (out_cond - out_uncond)
        if s.apg and cfg > 1:
            x0 = adaptive_projected(to_x0(out_cond, x, sigma), to_x0(out_uncond, x, sigma), cfg, s.apg_eta,
                                    s.apg_norm_threshold, momentum)
            out = from_x0(x0, x, sigma)
        if s.pag_scale:
            with identity_self_attention(perturbed_modules):
                out = out + s.pag_scale * (out_cond - net(x, t, *cond))
        if s.guidance_rescale > 0 and cfg > 1:  # Lin et al. 2023: match the conditional output's per-sample std
            dims = list(range(1, out.ndim))
            rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = s.guidance_rescale * rescaled + (1 - s.guidance_rescale) * out
        return (out, out_uncond) if with_uncond else out

    return guided_net
