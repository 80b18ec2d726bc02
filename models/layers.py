"""Pieces shared by the UNet, the VAE and the text encoders: the one attention function,
a float32 GroupNorm, and the sinusoidal embedding of timesteps and size conditions."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention(q, k, v, heads, causal=False):
    """Multi-head scaled dot-product attention: q (B, N, C), k and v (B, M, C) -> (B, N, C).

    Every attention module of the project calls this through its `attend` attribute, so swapping that
    attribute (sampling/instruments.py does) changes or records one module's attention without a file edit.
    """
    B, N, C = q.shape
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # scale 1/sqrt(d)
    return out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * d)


def softmax_attention(q, k, v, heads, causal=False, record=None, chunk=1024):
    """attention() written out, softmax(q k^T / sqrt(d)) v, for `chunk` queries at a time so that the (B, heads,
    chunk, M) probabilities bound the memory. The fast kernels never form the probabilities; this does, and
    hands each chunk of them, averaged over the heads, to record(probs (B, chunk, M), first query index)."""
    B, N, C = q.shape
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    scale, M = q.shape[-1] ** -0.5, k.shape[2]
    keys = k.float().transpose(-1, -2)  # (B, heads, d, M); float32, so fp16/bf16 logits cannot overflow
    out = []
    for start in range(0, N, chunk):
        scores = q[:, :, start:start + chunk].float() @ keys * scale  # (B, heads, n, M)
        if causal:  # query i sees keys 0..i
            rows = torch.arange(start, start + scores.shape[2], device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(M, device=q.device) > rows, float("-inf"))
        probs = scores.softmax(dim=-1)
        if record is not None:
            record(probs.mean(dim=1), start)
        out.append(probs.to(v.dtype) @ v)  # (B, heads, n, d)
    return torch.cat(out, dim=2).transpose(1, 2).reshape(B, N, C)  # (B, N, heads * d)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in (at least) float32 and cast back, as sgm does, so fp16/bf16 stay stable."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32; fp32/fp64 unchanged
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim) laid out [cos | sin], frequencies 10000^(-k/(dim/2)).

    Used for the diffusion timestep (dim = model channels) and for each SDXL size condition
    (dim 256). This is sgm's layout; diffusers gets the same with flip_sin_to_cos=True, shift 0.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
