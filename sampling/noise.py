"""Where a sampler's fresh noise comes from: one generator per image, or one Brownian tree per image.

A stochastic sampler calls `noise(sigma, sigma_next)` -> a (B, ...) standard normal tensor shaped like its x
(k-diffusion's noise_sampler). Image i of a batch draws all its noise from its own source seeded seed + i, so
an image does not depend on the batch it was made in (AUTOMATIC1111's convention; diffusers with a list of
generators):
    generator_noise   ancestral and LCM steps: image i's torch.Generator, continued from its initial noise
    brownian_noise    SDE samplers: the increments of one Brownian motion per image (torchsde's BrownianTree),
                      so the noise between two levels is the same whatever steps the run takes between them
"""

import warnings

import torch


def noise_like(x, generator):
    """N(0, I) shaped like x, drawn in float32 as diffusers' randn_tensor draws it, then moved to x.

    generator: None, one torch.Generator, or a list of B generators: image b's noise is then a (1, ...)
    draw on its own generator's device, so an image's noise depends only on its own seed."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per image.")
        draws = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.cat(draws).to(x)  # (B, ...)
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)


def generator_noise(x, generators):
    """noise(sigma, sigma_next) drawing a fresh N(0, I) like x from each image's generator, in call order."""
    return lambda sigma, sigma_next: noise_like(x, generators)


def brownian_noise(x, sigmas, seeds):
    """noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt|sigma - sigma_next| for one Brownian motion
    W per image, seeded with that image's seed (k-diffusion's BrownianTreeNoiseSampler with a list of seeds).

    The trees span the run's levels, [min of sigmas > 0, max of sigmas], and are built on float32 zeros of
    one image's shape on the CPU: torchsde draws other numbers for other dtypes, so the latents' dtype and
    device do not change the noise. Each increment is moved to x's device and dtype."""
    import torchsde  # only the SDE samplers need it

    low, high = sigmas[sigmas > 0].min().cpu(), sigmas.max().cpu()  # 0-dim float32, as k-diffusion passes them
    start = torch.zeros(x.shape[1:], dtype=torch.float32)  # W(low) = 0, one image's shape
    trees = [torchsde.BrownianTree(low, start, high, entropy=seed) for seed in seeds]

    def noise(sigma, sigma_next):
        sigma, sigma_next = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        # torchsde wants t0 < t1; sampling runs downwards, so W(sigma_next) - W(sigma) = -tree(sigma_next, sigma)
        lower, upper, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with warnings.catch_warnings():  # a level computed as exp(-log sigma) may pass the span's end by a float32
            warnings.filterwarnings("ignore", "Should have", UserWarning)  # ulp; torchsde warns, and answers as for
            increment = torch.stack([tree(lower, upper) for tree in trees]) * sign  # k-diffusion's: (B, ...)
        return (increment / (sigma_next - sigma).abs().sqrt()).to(x)

    return noise
