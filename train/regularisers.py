"""The regularisers of a training step, each a config field that is off by default (train/config.py, kohya's names;
docs/train.md gives each its paper and says where plainxl differs from kohya):

    sample_noise      the noise the target is made of, and the noise the input is made of: Gaussian noise, plus
                      per-channel offset noise, multi-resolution (pyramid) noise, and input perturbation
    loss_weights      per-sample weights: Min-SNR-gamma, debiased estimation
    huber_thresholds  per-sample c of the scheduled pseudo-Huber loss (loss_type huber or smooth_l1)
    elementwise_loss  l2, pseudo-Huber or smooth-L1 of prediction - target

Every random draw comes from the sample's own generators (train/batches.py), so a sample is the same whatever its
batch and however many processes run.
"""

import math

import torch
import torch.nn.functional as F

from sampling.schedule import alphas_cumprod


def pyramid_noise(noise, iterations, discount, generator):
    """noise (C, H, W) plus coarser noise at `iterations` levels (Whitaker 2023, "multi-resolution noise"; kohya's
    pyramid_noise_like): level i is Gaussian noise of size (H, W) / r^i, r drawn from [2, 4) for each level,
    upsampled bilinearly and weighted discount^i (level 0 is full size); it stops at a side of 1. Scaled back to
    unit standard deviation per sample (kohya: over the whole batch)."""
    C, H, W = noise.shape
    for i in range(iterations):
        r = 2 + 2 * torch.rand(1, generator=generator).item()
        h, w = max(1, int(H / r**i)), max(1, int(W / r**i))
        level = torch.randn(1, C, h, w, generator=generator)
        noise = noise + F.interpolate(level, size=(H, W), mode="bilinear")[0] * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def sample_noise(config, shape, gens, streams):
    """-> (noise (n, *shape), input noise): the target's noise, and what the latents are noised with. Input
    perturbation (Ning et al. 2023) adds ip_noise_gamma * fresh noise to the input only."""
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens(streams["noise"])])
    if config.noise_offset:  # per-channel offset noise (Guttenberg 2023): helps very dark / bright images
        offset = torch.stack([torch.randn(shape[0], 1, 1, generator=g) for g in gens(streams["offset"])])
        noise = noise + config.noise_offset * offset
    if config.multires_noise_iterations:
        noise = torch.stack([pyramid_noise(x, config.multires_noise_iterations, config.multires_noise_discount, g)
                             for x, g in zip(noise, gens(streams["multires"]))])
    if not config.ip_noise_gamma:
        return noise, noise
    fresh = torch.stack([torch.randn(shape, generator=g) for g in gens(streams["perturbation"])])
    return noise, noise + config.ip_noise_gamma * fresh


def loss_weights(config, a, v_pred, t):
    """Per-sample weights (n,) from alpha_bar_t (n, 1, 1, 1): Min-SNR-gamma (Hang et al. 2023), times debiased
    estimation (Yu et al. 2024): 1 / sqrt(SNR), or 1 / (SNR + 1) for v, with SNR at most 1000 and taken from the
    schedule before any zero-terminal-SNR rescale (as kohya: the rescaled SNR is 0 at the last step)."""
    weight = torch.ones(len(a), device=a.device)
    if config.snr_gamma is not None:
        snr = (a / (1 - a)).flatten().clamp(min=1e-8)  # zero terminal SNR: 0 at t = T-1, and eps weights divide by it
        weight = torch.minimum(snr, torch.full_like(snr, config.snr_gamma)) / (snr + 1 if v_pred else snr)
    if config.debiased_estimation_loss:
        a0 = alphas_cumprod().to(a.device)[t]
        snr = (a0 / (1 - a0)).clamp(max=1000)
        weight = weight / (snr + 1 if v_pred else snr.sqrt())
    return weight


def huber_thresholds(config, t, alpha_bars):
    """The pseudo-Huber c of each sample (Khrapov et al. 2024, as kohya schedules it), or None for l2: constant
    huber_c; exponential huber_c^(t / T); snr (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - a) / a)."""
    if config.loss_type == "l2":
        return None
    c = config.huber_c
    if config.huber_schedule == "constant":
        return torch.full(t.shape, c, device=t.device)
    if config.huber_schedule == "exponential":
        return torch.exp(math.log(c) * t.float() / len(alpha_bars))
    a = alpha_bars.to(t.device)[t]
    sigma = ((1 - a) / a).sqrt()  # inf at a zero-terminal-SNR last step: c = huber_c there
    return (1 - c) / (1 + sigma) ** 2 + c


def elementwise_loss(difference, loss_type, c):
    """difference (N, C, h, w) -> the loss of each element: d^2, or the pseudo-Huber 2 c (sqrt(d^2 + c^2) - c),
    or its smooth-L1 form 2 (sqrt(d^2 + c^2) - c), c (N,) per sample."""
    if loss_type == "l2":
        return difference**2
    c = c.float()[:, None, None, None]
    scaled = torch.sqrt(difference**2 + c**2) - c
    return 2 * c * scaled if loss_type == "huber" else 2 * scaled
