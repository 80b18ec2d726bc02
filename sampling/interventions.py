"""Interventions, each a few lines over sampling/instruments.py, to use as they are or to copy:

    with freeu(pipe.model):                                      # FreeU, SDXL's published factors
    with skipped(pipe.model, "unet.output_blocks.4.1.transformer_blocks.0"):   # one transformer block off
    with classic_attention(pipe.model):                          # softmax(q k^T / sqrt(d)) v, not SDPA
    with zero_micro_conditioning(pipe.model):                    # no size / crop / aesthetic information
        images = pipe(settings)
"""

import torch

from models.layers import softmax_attention
from sampling.instruments import attention_function, intervene, skipped  # noqa: F401 (skipped: re-exported)


def freeu(model, b1=1.3, b2=1.4, s1=0.9, s2=0.2):
    """FreeU (Si et al. 2023), defaults its published SDXL factors: in the output blocks of the two lowest-resolution
    levels (b1, s1 at the lowest), the first half of the backbone features' channels times b, and the skip's lowest
    frequencies times s (a constant b, as diffusers' enable_freeu; FreeU's later code scales b by the features'
    mean). A forward pre-hook on each of those blocks, which get backbone and skip apart."""
    per_level = model.unet.config.num_res_blocks + 1  # output blocks per level
    factors = {f"unet.output_blocks.{level * per_level + i}": bs
               for level, bs in enumerate([(b1, s1), (b2, s2)]) for i in range(per_level)}

    def rescale(name, step, args):
        h, emb, context, size, skip = args
        b, s = factors[name]
        half = h.shape[1] // 2
        return torch.cat([h[:, :half] * b, h[:, half:]], dim=1), emb, context, size, fourier_filter(skip, 1, s)

    return intervene(model, list(factors), rescale, inputs=True)


def fourier_filter(x, threshold, scale):
    """x (B, C, H, W) with the (2 threshold)^2 lowest spatial frequencies times `scale` (FreeU's skip filter);
    the FFT in float32, as it takes no bf16 and its fp16 needs power-of-two sizes."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))  # zero frequency at the centre
    H, W = x.shape[-2:]
    mask = torch.ones(H, W, device=x.device)
    mask[H // 2 - threshold:H // 2 + threshold, W // 2 - threshold:W // 2 + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def classic_attention(model, patterns="unet.*"):
    """The matching attention modules compute softmax(q k^T / sqrt(d)) v written out (models.layers.softmax_attention)
    instead of SDPA's fused kernels: equal within float noise, and the place to start changing the attention."""
    return attention_function(model, patterns, lambda name: softmax_attention)


def zero_micro_conditioning(model):
    """The UNet's vector input y keeps the pooled text embedding and has its size, crop (and a refiner's aesthetic
    score) embeddings zeroed: SDXL's micro-conditioning carries no information (Podell et al. 2023, section 2.2)."""
    pooled = model.config.text_encoder_2.projection_dim  # y = [pooled (P) | one embedding per number]

    def zeroed(name, step, args):
        y = args[0].clone()
        y[:, pooled:] = 0
        return (y,)

    return intervene(model, "unet.label_emb", zeroed, inputs=True)


NAMED = {"freeu": freeu, "classic-attention": classic_attention, "zero-micro-conditioning": zero_micro_conditioning}


def check_name(text):
    """ValueError unless `text` is a name named() takes (sampling.generate --intervention, a PNG's record)."""
    if text not in NAMED and not (text.startswith("skip=") and text.removeprefix("skip=")):
        raise ValueError(f"{text!r} is not an intervention; use {', '.join(NAMED)} or skip=PATTERN "
                         "(e.g. skip=unet.output_blocks.4.1.transformer_blocks.0)")


def named(model, text):
    """The intervention a command line names: one of NAMED, or skip=PATTERN (see check_name)."""
    return skipped(model, text.removeprefix("skip=")) if text.startswith("skip=") else NAMED[text](model)
