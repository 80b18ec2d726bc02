"""The CPU's own inference paths (docs/speed.md): blocked attention for bf16, torch's bf16 GroupNorm in place of
the float32 round trip, and channels-last weights from Pipeline.load. Each is the same maths as the path it
replaces: exact in float64, as close as the reference in bf16, and the images unchanged in float32."""

import pytest
import torch
import torch.nn.functional as F
from test_unet_parity import make_pair
from test_vae_parity import diffusers_vae, ours_from

from models.conditioning import vector_condition
from models.layers import GroupNorm32, attention, blocked_attention, channels_last
from models.unet import TINY
from models.vae import VAEConfig
from sampling.pipeline import Pipeline, Settings

WIDE_VAE = VAEConfig(ch=64, ch_mult=(1, 2, 4, 8))  # SDXL's 512-wide mid-block at an eighth of its cost


def sdpa(q, k, v, heads, causal=False):
    """The reference: PyTorch's scaled_dot_product_attention on (B, heads, N, d)."""
    B, N, C = q.shape
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, N, C)


def qkv(B, N, M, C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, C, generator=g, dtype=torch.float64).to(dtype) for n in (N, M, M))


# (B, N, M, C, heads, block): all heads at once; chunks of heads; one head in chunks of 256 queries (600 = 256 +
# 256 + 88); text-length keys (77, off the 16-wide softmax path); the VAE's single 512-wide head.
SHAPES = [(2, 64, 64, 128, 2, 2**21), (2, 256, 256, 320, 5, 2**18), (1, 600, 100, 64, 4, 1000),
          (2, 300, 77, 160, 10, 2**21), (1, 400, 400, 512, 1, 2**16)]


@pytest.mark.parametrize("B, N, M, C, heads, block", SHAPES)
def test_blocked_attention_is_attention_in_float64(B, N, M, C, heads, block):
    q, k, v = qkv(B, N, M, C)
    diff = (blocked_attention(q, k, v, heads, block) - sdpa(q, k, v, heads)).abs().max()
    assert diff <= 1e-12, f"blocked attention differs from SDPA by {diff:.2e}"


@pytest.mark.parametrize("B, N, M, C, heads", [(2, 1024, 1024, 640, 10), (2, 256, 77, 1280, 20)])
def test_bf16_attention_on_the_cpu_is_blocked_and_about_as_close_as_sdpa(B, N, M, C, heads):
    """It rounds the scores to bf16 where SDPA keeps them in float32: on its own about 2x SDPA's error (both far
    below bf16's own rounding once a UNet or a VAE is around them: the tests below)."""
    q, k, v = qkv(B, N, M, C, torch.bfloat16)
    exact = sdpa(q.double(), k.double(), v.double(), heads)
    with torch.inference_mode():
        ours, reference = attention(q, k, v, heads), sdpa(q, k, v, heads)
        assert torch.equal(ours, blocked_attention(q, k, v, heads))
    error = [(out.double() - exact).norm() / exact.norm() for out in (ours, reference)]
    print(f"relative L2 to float64: blocked {error[0]:.2e}, SDPA {error[1]:.2e}")
    assert error[0] <= 5 * error[1] and error[0] <= 2**-7


def test_attention_with_gradients_or_causal_stays_sdpa():
    q, k, v = (t.requires_grad_() for t in qkv(2, 64, 64, 128, torch.bfloat16))
    assert torch.equal(attention(q, k, v, 2), sdpa(q, k, v, 2))
    q, k, v = (t.detach() for t in (q, k, v))
    with torch.inference_mode():
        assert torch.equal(attention(q, k, v, 2, causal=True), sdpa(q, k, v, 2, causal=True))


def test_the_bf16_unet_is_as_close_to_float32_as_diffusers_bf16():
    """The tiny UNet with the CPU's bf16 paths (blocked attention, bf16 GroupNorm) against diffusers' in bf16 (SDPA,
    its GroupNorm), each to our float32 output: the same error, within a quarter."""
    ours, theirs = make_pair(TINY)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([999.0, 10.0])
    context, pooled = torch.randn(2, 77, TINY.context_dim, generator=g), torch.randn(2, 48, generator=g)
    time_ids = torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)
    with torch.inference_mode():
        exact = ours(x, t, context, vector_condition(pooled, time_ids, TINY.micro_cond_dim)).double()
        y = vector_condition(pooled, time_ids, TINY.micro_cond_dim)
        bf16 = ours.bfloat16()(x.bfloat16(), t, context.bfloat16(), y.bfloat16())  # t stays float32, as in diffusers
        added = {"text_embeds": pooled.bfloat16(), "time_ids": time_ids.bfloat16()}
        reference = theirs.bfloat16()(x.bfloat16(), t, encoder_hidden_states=context.bfloat16(),
                                      added_cond_kwargs=added).sample
    error = [(out.double() - exact).norm() / exact.norm() for out in (bf16, reference)]
    print(f"relative L2 to float32: plainxl bf16 {error[0]:.2e}, diffusers bf16 {error[1]:.2e}")
    assert error[0] <= 1.25 * error[1]


def test_the_bf16_vae_decode_is_as_close_to_float32_as_diffusers_bf16():
    """The worst case for bf16 scores: the VAE's one 512-wide head (SDXL's mid-block width), decoding in bf16 with
    blocked attention and channels-last weights, against diffusers' bf16 decode, each to our float32 decode."""
    ref = diffusers_vae(WIDE_VAE)
    ours = ours_from(ref, WIDE_VAE)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        exact = ours.decode(z).double()
        channels_last(ours)
        bf16, reference = ours.bfloat16().decode(z.bfloat16()), ref.bfloat16().decode(z.bfloat16()).sample
    error = [(out.double() - exact).norm() / exact.norm() for out in (bf16, reference)]
    print(f"relative L2 to float32: plainxl bf16 {error[0]:.2e}, diffusers bf16 {error[1]:.2e}")
    assert error[0] <= 1.25 * error[1]


@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 960, 32, 32), (1, 1280, 16, 16)])
def test_bf16_groupnorm_on_the_cpu_is_the_float32_round_trip_to_one_ulp(shape):
    """torch's bf16 kernel keeps its statistics and affine in float32 and rounds once, as the round trip does;
    the order of its sums differs, so an output in ~10^5 can land one bf16 step away."""
    norm = GroupNorm32(32, shape[1]).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[1]) + 0.5)
        norm.bias.copy_(torch.randn(shape[1]))
    x = (3 * torch.randn(shape) + 1).bfloat16()
    round_trip = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps).bfloat16()
    out = norm(x)
    ulp = 2.0 ** (torch.frexp(round_trip.float())[1] - 8)  # bf16's step at each value (8 significant bits)
    assert ((out.float() - round_trip.float()).abs() <= ulp).all()
    assert (out != round_trip).float().mean() <= 1e-3


def test_pipeline_load_puts_convolutions_in_channels_last_and_leaves_the_image():
    """Pipeline.load on the CPU: every 4-d weight channels-last, the latents as the contiguous model's (float32)."""
    loaded, plain = Pipeline.load("plainxl-tiny"), Pipeline.load("plainxl-tiny")
    for name in ("unet", "vae"):
        weights = [p for p in getattr(loaded.model, name).parameters() if p.ndim == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
        getattr(plain.model, name).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in plain.model.parameters())
    s = Settings(prompt="1girl, smile", negative_prompt="lowres", width=64, height=64, steps=4, cfg=5.0, seed=1)
    a, b = loaded.latents(s, progress=False), plain.latents(s, progress=False)
    print(f"channels-last vs contiguous latents: max |diff| {(a - b).abs().max():.2e}")
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
