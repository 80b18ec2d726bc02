"""The SDXL UNet (base, refiner and smaller members of the family) with the official tensor names.

Attribute paths equal the official single-file keys after stripping `model.diffusion_model.`,
so an official file loads with `load_state_dict(strict=True)` and no renames.

Index map for SDXL base (latent 128x128 for a 1024x1024 image; R = 2 ResBlocks per level):

    block               content                                  channels  latent   attention depth
    input_blocks.0      conv 4 -> 320                            320       128x128  -
    input_blocks.1, 2   ResBlock                                 320       128x128  none
    input_blocks.3      Downsample (.0.op)                       320       64x64    -
    input_blocks.4, 5   ResBlock + SpatialTransformer            640       64x64    2
    input_blocks.6      Downsample                               640       32x32    -
    input_blocks.7, 8   ResBlock + SpatialTransformer            1280      32x32    10
    middle_block        ResBlock, SpatialTransformer, ResBlock   1280      32x32    10
    output_blocks.0-2   ResBlock + SpatialTransformer (+ .2.2 Upsample)  1280  32x32 -> 64x64   10
    output_blocks.3-5   ResBlock + SpatialTransformer (+ .5.2 Upsample)  640   64x64 -> 128x128 2
    output_blocks.6-8   ResBlock                                 320       128x128  none
    out                 GroupNorm, SiLU, conv 320 -> 4

Each output block concatenates [h, skip] (skips popped in reverse) before its ResBlock. The refiner
has four levels (384, 768, 1536, 1536; attention depth 4 at the middle two) and, in its attention-free
output_blocks.2, the Upsample sits at index .1 instead of .2 — which falls out of the loop below.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from models.layers import GroupNorm32, attention, timestep_embedding


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in (9 for an inpainting UNet: latents, mask, masked-image latents)
    out_channels: int = 4
    model_channels: int = 320  # channels of the first level
    channel_mult: tuple = (1, 2, 4)  # channels of level i = model_channels * channel_mult[i]; 2x down between
    num_res_blocks: int = 2  # ResBlocks per input level (the output side has one more per level)
    transformer_depth: tuple = (0, 2, 10)  # per level, for the input blocks; 0 = no attention
    transformer_depth_middle: int = 10
    # Per output block (len(channel_mult) * (num_res_blocks + 1), in execution order). None means
    # each output block has the depth of its level, as in SDXL; distilled models prune them unevenly.
    transformer_depth_output: tuple | None = None
    context_dim: int = 2048  # cross-attention context: [CLIP-L | bigG] penultimate states
    adm_in_channels: int = 2816  # the "vector" condition: pooled text + size embeddings
    micro_cond_dim: int = 256  # sinusoid width of each size/crop/aesthetic number inside that vector
    head_channels: int = 64  # channels per attention head (SDXL's convention; shapes do not store it)
    norm_groups: int = 32
    sample_size: int = 128  # latent side it was trained at (x 8 = 1024 px): the default output size
    # LCM-distilled UNets (latent-consistency/lcm-sdxl): the width of the guidance-scale embedding added to the
    # timestep's (diffusers' time_embedding.cond_proj; the sgm layout has no name for it: time_cond_proj here).
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        # Keep explicit output depths only where they differ from the per-level default, so that
        # equal architectures compare equal however they were described (file shapes, config.json).
        default = tuple(d for d in reversed(self.transformer_depth) for _ in range(self.num_res_blocks + 1))
        if self.transformer_depth_output is not None and tuple(self.transformer_depth_output) == default:
            object.__setattr__(self, "transformer_depth_output", None)  # the dataclass is frozen
        self.validate()

    def validate(self):
        """ValueError naming the first field that cannot make a UNet (a config.json can say anything)."""
        levels = len(self.channel_mult)
        sizes = dict(in_channels=self.in_channels, out_channels=self.out_channels, model_channels=self.model_channels,
                     num_res_blocks=self.num_res_blocks, context_dim=self.context_dim, head_channels=self.head_channels,
                     micro_cond_dim=self.micro_cond_dim, norm_groups=self.norm_groups, sample_size=self.sample_size)
        if levels == 0 or min(self.channel_mult) < 1 or min(sizes.values()) < 1:
            raise ValueError(f"a UNet needs at least one level and positive sizes (got channel_mult="
                             f"{self.channel_mult}, {sizes})")
        if len(self.transformer_depth) != levels or len(self.output_depths()) != levels * (self.num_res_blocks + 1):
            raise ValueError(f"the UNet's attention depths {self.transformer_depth} do not match its {levels} levels")
        if min(*self.transformer_depth, self.transformer_depth_middle, *self.output_depths()) < 0:
            raise ValueError("the UNet's attention depths must not be negative")
        for mult, depth in zip(self.channel_mult, self.transformer_depth):
            channels = self.model_channels * mult
            if channels % self.norm_groups or (depth and channels % self.head_channels):
                raise ValueError(f"{channels} UNet channels are not divisible into {self.norm_groups} GroupNorm "
                                 f"groups and {self.head_channels}-channel attention heads")

    def output_depths(self):
        if self.transformer_depth_output is not None:
            return tuple(self.transformer_depth_output)
        return tuple(d for d in reversed(self.transformer_depth) for _ in range(self.num_res_blocks + 1))


SDXL_BASE = UNetConfig()
SDXL_REFINER = UNetConfig(
    model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
    context_dim=1280, adm_in_channels=2560,
)
# For tests and the bundled model: every block kind, a few channels. Context and vector widths
# match models.text's tiny encoders (32 + 64 context; 48 pooled + 6 numbers x 16).
TINY = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2), transformer_depth_middle=2,
    context_dim=96, adm_in_channels=48 + 6 * 16, micro_cond_dim=16, head_channels=16, norm_groups=8, sample_size=8,
)
TINY_REFINER = UNetConfig(  # the refiner layout at TINY's scale: four levels, attention at the middle two
    model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0), transformer_depth_middle=1,
    context_dim=64, adm_in_channels=48 + 5 * 16, micro_cond_dim=16, head_channels=16, norm_groups=8, sample_size=8,
)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected (time + vector) embedding, GroupNorm-SiLU-conv, residual."""

    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        # Index 2 is the dropout slot of the checkpoint (out_layers.3 is the conv).
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, cout) broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, C) over context (B, M, context_dim), or over itself."""

    def __init__(self, channels, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.to_out = nn.Sequential(nn.Linear(channels, channels), nn.Dropout(0.0))  # .1: dropout slot
        self.attend = attention  # swappable: see models.layers.attention
        # IP-Adapters' (models/ip_adapter.py, while attached): (keys and values, scale, n) for each adapter whose
        # n image tokens ride at the end of the context, in order. A list, so the UNet's weights stay its own.
        self.image_prompts = []

    def forward(self, x, context=None):
        context = x if context is None else context
        q = self.to_q(x)
        end = context.shape[1] - sum(n for _, _, n in self.image_prompts)  # the text tokens: context[:, :end]
        text = context[:, :end] if self.image_prompts else context  # (no slice in the graph without IP-Adapters)
        out = self.attend(q, self.to_k(text), self.to_v(text), self.heads)
        for image, scale, n in self.image_prompts:
            tokens = context[:, end:end + n]
            out = out + scale * image.attend(q, image.to_k_ip(tokens), image.to_v_ip(tokens), self.heads)
            end += n
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear C -> 2 * inner, split into (value, gate), value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, channels, inner):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, channels, mult=4):
        super().__init__()
        # .1 is the dropout slot of the checkpoint (ff.net.2 is the output Linear).
        self.net = nn.Sequential(GEGLU(channels, mult * channels), nn.Dropout(0.0), nn.Linear(mult * channels, channels))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, channels, context_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = CrossAttention(channels, channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = CrossAttention(channels, context_dim, heads)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, Linear in, `depth` transformer blocks over the H*W tokens, Linear out, residual."""

    def __init__(self, channels, depth, cfg):
        super().__init__()
        heads = channels // cfg.head_channels
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.context_dim, heads) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        H, W = x.shape[-2:]
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (the next skip's size, so odd latents work), then conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Sequential):
    """One input, middle or output block: its layers in order, each given what it needs. An output block gets
    its skip apart from the backbone features h and joins them first, so a forward pre-hook (FreeU, in
    sampling/instruments.py) sees the two separately."""

    def forward(self, h, emb, context, size=None, skip=None):
        if skip is not None:
            h = torch.cat([h, skip], dim=1)  # (B, C_h + C_skip, h, w)
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h


class Encoder(nn.Module):
    """The UNet's first half, which a ControlNet copies (models/controlnet.py): the time and vector embeddings,
    the input blocks and the middle block, under the official names."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False  # training: recompute each block in backward to save memory
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.time_cond_proj_dim:
            self.time_cond_proj = nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )

        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        self.skip_channels = [mc]  # channels of every input block's output, in order
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(Block(*self.res_and_attention(ch, mult * mc, cfg.transformer_depth[level])))
                ch = mult * mc
                self.skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                self.skip_channels.append(ch)

        self.middle_block = Block(
            ResBlock(ch, ch, emb_dim, groups),
            SpatialTransformer(ch, cfg.transformer_depth_middle, cfg),
            ResBlock(ch, ch, emb_dim, groups),
        )

    def res_and_attention(self, cin, cout, depth):
        layers = [ResBlock(cin, cout, 4 * self.config.model_channels, self.config.norm_groups)]
        if depth > 0:
            layers.append(SpatialTransformer(cout, depth, self.config))
        return layers

    def embedding(self, t, y, dtype, timestep_cond=None):
        """(B, 4 * model_channels), fed to every ResBlock: the timestep's embedding plus the vector condition's."""
        t_emb = timestep_embedding(t, self.config.model_channels).to(dtype)
        if timestep_cond is not None:
            t_emb = t_emb + self.time_cond_proj(timestep_cond.to(dtype))
        return self.time_embed(t_emb) + self.label_emb(y)

    def run(self, block, *args):
        """block(*args), recomputed in the backward pass under gradient checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


class UNet(Encoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        mc, ch, skip_channels = cfg.model_channels, cfg.model_channels * cfg.channel_mult[-1], list(self.skip_channels)
        depths = iter(cfg.output_depths())
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = self.res_and_attention(ch + skip_channels.pop(), mult * mc, next(depths))
                ch = mult * mc
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(GroupNorm32(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context, y, timestep_cond=None, control=None, adapter=None):
        """Noise (or v) prediction. x (B, 4, h, w) latents, t (B,) timesteps, context (B, 77, context_dim),
        y (B, adm_in_channels) pooled text + size embeddings (models.conditioning builds it); timestep_cond
        (B, time_cond_proj_dim): an LCM UNet's guidance-scale embedding.

        control: a ControlNet's residuals (models/controlnet.py), one per input block then one for the middle
        block, added to the skips and to the middle block's output; adapter: a T2I-Adapter's features as
        {official block name: (B, C, h', w')} (models/t2i_adapter.py), each added to that input block's output
        before it is kept as a skip, or to the middle block's."""
        emb = self.embedding(t, y, x.dtype, timestep_cond)
        skips = []
        h = x
        for i, block in enumerate(self.input_blocks):
            h = self.run(block, h, emb, context)
            if adapter and f"input_blocks.{i}" in adapter:
                h = h + adapter[f"input_blocks.{i}"]
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context)
        if adapter and "middle_block" in adapter:
            h = h + adapter["middle_block"]
        if control is not None:
            skips = [skip + residual for skip, residual in zip(skips, control[:-1], strict=True)]
            h = h + control[-1]
        for block in self.output_blocks:
            skip = skips.pop()
            next_size = skips[-1].shape[-2:] if skips else None  # where an Upsample must land
            h = self.run(block, h, emb, context, next_size, skip)
        return self.out(h)
