"""SDXL's autoencoder (AutoencoderKL): image (B, 3, H, W) in [-1, 1] <-> latent (B, 4, H/8, W/8).

Follows sgm's `sgm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock)
and `sgm/models/autoencoder.py`. Attribute paths equal the official single-file keys after
stripping `first_stage_model.`, so the official weights load with a prefix strip and
`load_state_dict(strict=True)`; a diffusers `vae/` folder goes through models/convert.py.

Level map for SDXL_VAE (ch 128, ch_mult (1, 2, 4, 4), 1024x1024 image):

    encoder.down.0   128 ch  1024 -> downsample -> 512
    encoder.down.1   256 ch   512 -> downsample -> 256
    encoder.down.2   512 ch   256 -> downsample -> 128
    encoder.down.3   512 ch   128 (no downsample)
    encoder.mid      512 ch   128   ResBlock, attention over 128*128 tokens, ResBlock
    decoder.mid      512 ch   128
    decoder.up.3     512 ch   128 -> upsample -> 256    runs first (sgm numbers levels by resolution)
    decoder.up.2     512 ch   256 -> upsample -> 512
    decoder.up.1     256 ch   512 -> upsample -> 1024
    decoder.up.0     128 ch  1024 (no upsample)          runs last

fp16: the SDXL VAE's internal activations overflow fp16 (NaN / black images), so the pipeline runs an
fp16 model's VAE in float32. Run it in float32 or bfloat16, or load madebyollin/sdxl-vae-fp16-fix,
which has the same keys and was fine-tuned to keep activations small.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import attention


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128  # channels of the full-resolution level
    ch_mult: tuple = (1, 2, 4, 4)  # channels of level i = ch * ch_mult[i]; one 2x resample between levels
    num_res_blocks: int = 2  # ResBlocks per encoder level; the decoder has one more per level
    z_channels: int = 4  # latent channels (the encoder emits 2 * z_channels: mean and logvar)
    norm_groups: int = 32
    scaling_factor: float = 0.13025  # latent * scaling_factor is what the UNet sees (SD1.x: 0.18215)

    @property
    def pixels_per_latent(self):
        """Image pixels per latent pixel along each side, one 2x resample between levels: 8 for SDXL's four
        levels (diffusers' vae_scale_factor, read the same way from the config)."""
        return 2 ** (len(self.ch_mult) - 1)

    def __post_init__(self):
        sizes = dict(in_channels=self.in_channels, out_channels=self.out_channels, ch=self.ch,
                     num_res_blocks=self.num_res_blocks, z_channels=self.z_channels, norm_groups=self.norm_groups)
        if not self.ch_mult or min(self.ch_mult) < 1 or min(sizes.values()) < 1:
            raise ValueError(f"a VAE needs at least one level and positive sizes (got ch_mult={self.ch_mult}, {sizes})")
        if any(self.ch * m % self.norm_groups for m in self.ch_mult):
            raise ValueError(f"the VAE's {self.norm_groups} GroupNorm groups do not divide its widths")
        if not 0 < self.scaling_factor < float("inf"):
            raise ValueError(f"the VAE's scaling_factor must be a positive number (got {self.scaling_factor})")


SDXL_VAE = VAEConfig()
# Same depth as SDXL (8x down-sampling, so latent sizes match a real pipeline), widths 16..128 instead of
# 128..512: the full-resolution levels cost the most on a CPU, so they are the narrowest. The bundled tiny
# model derives its own scaling_factor from its latents when it is trained (train.dreambooth, task="vae").
TINY_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 4, 8), norm_groups=8)


def norm(channels, groups):
    """sgm's Normalize(): torch's GroupNorm with eps 1e-6, everywhere in the VAE. Unlike the UNet's GroupNorm32 it
    runs in the activations' dtype, as in sgm and diffusers: a float32 round trip of every bf16 activation made the
    bf16 decode 20 % slower than diffusers' and its peak memory 1.12 GiB instead of 0.88 (512², RESULTS.md)."""
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """norm -> SiLU -> conv3x3, twice, plus a (1x1-projected if channels change) skip."""

    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)  # sgm has a dropout(0) before this
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = norm(c, groups)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)
        self.attend = attention  # swappable: see models.layers.attention

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # A 1x1 conv is a linear map over channels: apply the stored (C, C, 1, 1) weights as (C, C)
        # matrices to the tokens. Same math as calling the convs, but the same rounding as diffusers'
        # Linear layers; with conv rounding the random-weight parity test drifts to ~1e-5.
        q, k, v = (F.linear(h, m.weight.flatten(1), m.bias) for m in (self.q, self.k, self.v))  # (B, HW, C)
        h = self.attend(q, k, v, 1)  # (B, HW, C), one head: scale 1/sqrt(C)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by 1, then conv3x3 stride 2 without padding.
    (Not the UNet's padding-1 conv: the asymmetric pad is what the weights were trained with.)"""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then conv3x3."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(c, groups):
    """ResBlock -> attention -> ResBlock at the lowest resolution (encoder.mid / decoder.mid)."""
    mid = nn.Module()
    mid.block_1 = ResBlock(c, c, groups)
    mid.attn_1 = AttnBlock(c, groups)
    mid.block_2 = ResBlock(c, c, groups)
    return mid


def run_mid(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * z_channels, H / 2^(L-1), W / 2^(L-1)), L = len(ch_mult)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, levels = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        c = cfg.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()  # a plain container, as in sgm: its attributes are the key names
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResBlock(c, cfg.ch * mult, g))
                c = cfg.ch * mult
            if i < levels - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = mid_block(c, g)
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2^(L-1), w * 2^(L-1)).

    up.i has the channels of encoder level i; up.(L-1), the lowest resolution, runs first.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = mid_block(c, g)
        levels = [None] * len(cfg.ch_mult)
        for i in reversed(range(len(cfg.ch_mult))):  # build in execution order so c flows through
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResBlock(c, cfg.ch * cfg.ch_mult[i], g))
                c = cfg.ch * cfg.ch_mult[i]
            if i > 0:
                level.upsample = Upsample(c)
            levels[i] = level
        self.up = nn.ModuleList(levels)  # indexed by resolution: up.0 is full resolution
        self.norm_out = norm(c, g)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):  # lowest resolution first
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """SDXL's VAE. encode: image -> (mean, logvar) of the latent; decode: latent -> image.

    Latents here are *unscaled*: multiply by config.scaling_factor before the UNet and divide
    by it before decode. That is the caller's job, so the VAE stays usable on its own.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.z_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, z_channels, H/8, W/8), unscaled."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2z, H/8, W/8)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as sgm's DiagonalGaussianDistribution

    def decode(self, z):
        """z (B, z_channels, h, w), unscaled -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


def sample_latent(mean, logvar, generator=None):
    """Draw z ~ N(mean, exp(logvar)) with the reparameterisation trick (the training-time latent)."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise
