"""SDXL's conditioning: the cross-attention context and the "vector" fed to the UNet's label_emb.

Base:    context = [CLIP-L penultimate | bigG penultimate]            (B, 77, 768 + 1280 = 2048)
         vector  = [bigG pooled | emb(orig h, orig w, crop top, crop left, target h, target w)]
                                                                      (B, 1280 + 6 * 256 = 2816)
Refiner: context = bigG penultimate                                    (B, 77, 1280)
         vector  = [bigG pooled | emb(orig h, orig w, crop top, crop left, aesthetic score)]
                                                                      (B, 1280 + 5 * 256 = 2560)
Each number becomes its own sinusoid of width micro_cond_dim (sgm's ConcatTimestepEmbedderND;
diffusers' add_time_proj). Follows sgm/modules/encoders/modules.py and diffusers' encode_prompt.
"""

import torch

from models.layers import timestep_embedding


def encode_text(text_encoder_1, text_encoder_2, tokens_1, tokens_2, clip_skip=0):
    """Token ids (B, 77) from each tokenizer -> (context (B, 77, C), pooled (B, P)); clip_skip: diffusers'
    (the context from k layers fewer in both encoders).

    text_encoder_1 is None for the refiner, which conditions on bigG alone.
    """
    context_2, pooled = text_encoder_2(tokens_2, clip_skip)
    if text_encoder_1 is None:
        return context_2, pooled
    context_1 = text_encoder_1(tokens_1, clip_skip)
    return torch.cat([context_1, context_2], dim=-1), pooled


def size_numbers(original_size, crop_top_left, target_size=None, aesthetic_score=None):
    """The micro-conditioning numbers in SDXL's order: sizes are (height, width), crop is (top, left).

    Base models take a target size, the refiner an aesthetic score instead.
    """
    last = list(target_size) if aesthetic_score is None else [aesthetic_score]
    return [*original_size, *crop_top_left, *last]


def vector_condition(pooled, numbers, micro_cond_dim):
    """pooled (B, P) and numbers (B, n) -> (B, P + n * micro_cond_dim): the UNet's `y` input."""
    numbers = torch.as_tensor(numbers, dtype=torch.float32, device=pooled.device)
    numbers = numbers.expand(pooled.shape[0], -1)  # one row of numbers may serve the whole batch
    emb = timestep_embedding(numbers.flatten(), micro_cond_dim)  # (B * n, micro_cond_dim)
    emb = emb.reshape(pooled.shape[0], -1)  # (B, n * micro_cond_dim), number-major
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)


def guidance_embedding(scale, dim):
    """An LCM-distilled UNet's guidance-scale input (Luo et al. 2023, https://arxiv.org/abs/2310.04378): sinusoids
    of 1000 w for w = scale - 1, sin then cos, as diffusers' get_guidance_scale_embedding -> (1, dim) float32."""
    w = torch.tensor([scale - 1.0]) * 1000.0
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]  # (1, half)
    return torch.nn.functional.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))
