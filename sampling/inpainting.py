"""Inpainting as diffusers' StableDiffusionXLInpaintPipeline: a stage's first x, its net and its per-step blend.

A 4-channel UNet repaints inside the mask while the known region is put back after every step; a 9-channel
(inpainting) UNet sees the mask and the masked image's latents as extra input channels instead.
"""

import torch

from sampling.images import latent_mask, mask_pixels
from sampling.noise import noise_like


def inpainting(pipe, s, pixel_batch, generators, schedule, sigmas, net):
    """Inpainting as diffusers' StableDiffusionXLInpaintPipeline -> (initial x, net, after_step).

    Each image's generator draws the image's posterior sample (not for a 9-channel UNet at strength 1),
    then the noise, then the masked image's posterior sample; diffusers draws both posterior samples
    from the first generator for the whole batch, so image i here equals diffusers' single-image run
    with seed + i. A 4-channel UNet's latents are blended with the noised image latents outside the
    mask after every step; a 9-channel UNet sees the mask and the masked image's latents instead."""
    mask = mask_pixels(s.mask, s.width, s.height).to(pipe.device)  # (1, 1, H, W): 1 = repaint
    keep_image = not pipe.is_inpainting or s.strength < 1
    image_latents = pipe.encode(pixel_batch, generators) if keep_image else None
    f = pipe.model.config.vae.pixels_per_latent
    noise = noise_like(torch.empty(len(generators), pipe.model.config.vae.z_channels, s.height // f,
                                   s.width // f, device=pipe.device), generators)
    if s.strength == 1:  # pure noise, as diffusers' is_strength_max, where img2img would noise the image
        x = noise * schedule.init_noise_sigma
    else:
        x = image_latents + noise * sigmas[0].to(pipe.device)
    masked_latents = pipe.encode(pixel_batch * (mask < 0.5), generators)  # drawn by a 4-channel run too
    small_mask = latent_mask(mask, x.shape[-2:])  # (1, 1, h, w)

    if pipe.is_inpainting:
        def net_9(x_in, t, context, y):
            n = x_in.shape[0] // len(generators)  # 2 under classifier-free guidance
            extra = [small_mask.expand(len(x_in), -1, -1, -1), masked_latents.repeat(n, 1, 1, 1)]
            return net(torch.cat([x_in, *(e.to(x_in) for e in extra)], dim=1), t, context, y)
        return x, net_9, None

    last = len(sigmas) - 2

    def keep_known(i, x):  # outside the mask, the image's latents noised to the level just reached
        level = sigmas[i + 1].to(x.device)
        known = image_latents * (level**2 + 1) ** 0.5 if i == last else image_latents + noise * level
        return (1 - small_mask) * known + small_mask * x
    return x, net, keep_known
