"""Pieces shared by the UNet, the VAE and the text encoders: the one attention function, a float32
GroupNorm, the sinusoidal embedding of timesteps and size conditions, and the channels-last layout for
the CPU."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def bf16_inference_on_cpu(x):
    """Where the CPU's own paths apply (docs/speed.md): bf16 on the CPU, no gradients being recorded."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()


def attention(q, k, v, heads, causal=False):
    """Multi-head scaled dot-product attention: q (B, N, C), k and v (B, M, C) -> (B, N, C).

    Every attention module of the project calls this through its `attend` attribute, so swapping that
    attribute (sampling/instruments.py does) changes or records one module's attention without a file edit.
    PyTorch's SDPA does the work, except for bf16 inference on the CPU: there its flash kernel runs at a
    fifth of the matmul peak, and blocked_attention() is twice as fast.
    """
    if bf16_inference_on_cpu(q) and not causal:
        return blocked_attention(q, k, v, heads)
    B, N, C = q.shape
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # scale 1/sqrt(d)
    return out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads * d)


def blocked_attention(q, k, v, heads, block=2**21):
    """attention() as three plain ops, softmax(q k^T / sqrt(d)) v, in the inputs' dtype, on as many heads
    at a time (or, past one head, queries) as make `block` scores: 4 MiB in bf16, small enough to stay in
    the cache and to reuse freed memory instead of faulting in fresh pages, with at least 256 queries so
    that each product still runs at the matmul peak. (softmax_attention, below, is the float32 one that
    hands out the probabilities: slower, for the instruments.)

    The scores are rounded to q's dtype before the softmax, where SDPA's kernels keep them in float32. On
    the full SDXL UNet in bf16 that moves nothing measurable: relative L2 to float32 2.24e-2, diffusers'
    bf16 with SDPA 2.28e-2 (docs/speed.md)."""
    B, N, C = q.shape
    M = k.shape[1]
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    q = q * q.shape[-1] ** -0.5
    out = q.new_empty(B, N, heads, q.shape[-1])
    n_heads = max(1, min(heads, block // max(1, B * N * M)))
    n_queries = N if n_heads > 1 else max(256, block // max(1, B * M))
    # bf16's softmax keeps float32 inside and rounds once, as float32-out-then-cast does; it is the faster
    # of the two unless M is off its 16-wide vector path (the text's 77 tokens).
    in_dtype, wide = M % 16 == 0, torch.promote_types(q.dtype, torch.float32)
    for h in range(0, heads, n_heads):
        keys, values = k[:, h:h + n_heads].transpose(-1, -2), v[:, h:h + n_heads]
        for start in range(0, N, n_queries):
            scores = q[:, h:h + n_heads, start:start + n_queries] @ keys  # (B, n_heads, n_queries, M)
            probs = scores.softmax(-1) if in_dtype else scores.softmax(-1, dtype=wide).to(q.dtype)
            out[:, start:start + n_queries, h:h + n_heads] = (probs @ values).transpose(1, 2)
    return out.reshape(B, N, C)  # (B, N, heads * d)


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
    """GroupNorm computed in (at least) float32 and cast back, as sgm does, so fp16/bf16 stay stable. On
    the CPU torch's bf16 kernel already works that way (float32 statistics and affine, one rounding;
    tests/test_cpu_paths.py), so bf16 inference goes straight to it there and skips two float32 copies of
    the activations."""

    def forward(self, x):
        if bf16_inference_on_cpu(x) and self.weight.dtype == torch.bfloat16:
            return super().forward(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32; fp32/fp64 unchanged
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


def channels_last(*modules):
    """Put the modules' convolution weights in channels-last order, for inference on the CPU: oneDNN
    convolves NHWC natively, so every activation after the first convolution stays channels-last, and a
    SpatialTransformer's (B, C, H, W) -> (B, H*W, C) turns into a view instead of a copy. The full SDXL
    UNet in bf16 runs 3-6 % faster and the VAE decode 25 % faster (docs/speed.md). The weights are then
    not contiguous: whoever saves them with safetensors makes them contiguous first."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim) laid out [cos | sin], frequencies 10000^(-k/(dim/2)).

    Used for the diffusion timestep (dim = model channels) and for each SDXL size condition
    (dim 256). This is sgm's layout; diffusers gets the same with flip_sin_to_cos=True, shift 0.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
