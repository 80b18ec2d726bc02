"""T2I-Adapter (Mou et al. 2023) for SDXL: a small convolutional network that turns a control image into four
feature maps, computed once per generation and added inside the UNet's encoder at every step.

    image (B, 1 or 3, H, W) in [0, 1] -> PixelUnshuffle(16): (B, 256 c, H/16, W/16) -> conv_in 3x3 -> 320
      body.0  2 x ResBlock(320)                      -> f0 (320, H/16)   added after input_blocks.3 (the Downsample)
      body.1  1x1 conv 320 -> 640, 2 x ResBlock(640)  -> f1 (640, H/16)   added after input_blocks.5
      body.2  avg-pool 2x, 1x1 conv -> 1280, 2 x ...  -> f2 (1280, H/32)  added after input_blocks.8
      body.3  2 x ResBlock(1280)                     -> f3 (1280, H/32)  added after middle_block
    ResBlock(c): x + conv1x1(ReLU(conv3x3(x)))

Where each map goes is diffusers' UNet2DConditionModel's rule (`positions`), the one the adapters were trained
under: after the last ResBlock (+ attention) of a level with attention, after the Downsample of a level without.
The names are diffusers' (TencentARC's SDXL adapters are published in that layout: `adapter.body.1.in_conv.weight`);
ComfyUI's flattened names (`body.{2i + j}.block1.weight`) load too. Light adapters exist for SD 1.x only.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from models.diffusers_layout import stored_shapes
from models.files import LoadError
from models.loading import resolve
from models.single_file import built, read_renamed


@dataclass(frozen=True)
class AdapterConfig:
    in_channels: int = 3  # 1 for the sketch and lineart adapters (a grey image), 3 for the rest
    channels: tuple = (320, 640, 1280, 1280)  # of f0 .. f3: the UNet's level widths where they are added
    num_res_blocks: int = 2
    downscale_factor: int = 16  # PixelUnshuffle's: f0 is at latent / 2 for SDXL's 8 pixels per latent


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.block2(F.relu(self.block1(x)))


class Block(nn.Module):
    """[2x average pool] -> [1x1 conv to the new width] -> ResBlocks."""

    def __init__(self, cin, cout, num_res_blocks, down=False):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.resnets = nn.Sequential(*(ResBlock(cout) for _ in range(num_res_blocks)))

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class Features(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        c, R = cfg.channels, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.downscale_factor**2, c[0], 3, padding=1)
        # SDXL's adapter halves the size once, at the third block.
        self.body = nn.ModuleList(Block(c[max(i - 1, 0)], c[i], R, down=i == 2) for i in range(len(c)))


class T2IAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.config = cfg
        self.adapter = Features(cfg)  # diffusers' T2IAdapter keeps its network under `adapter.`

    def forward(self, image):
        """image (B, in_channels, H, W) in [0, 1], H and W multiples of 16 -> [f0, f1, f2, f3]."""
        x = self.adapter.conv_in(F.pixel_unshuffle(image, self.config.downscale_factor))
        features = []
        for block in self.adapter.body:
            x = block(x)
            features.append(x)
        return features


def positions(unet_config):
    """The official block names after which diffusers adds f0, f1, ... for a UNet of this config: per level, after
    its last ResBlock (+ attention) where the level has attention, else after its Downsample (or its last
    ResBlock, at the last level); the map left over goes after the middle block."""
    names, block = [], 0
    levels = len(unet_config.channel_mult)
    for level, depth in enumerate(unet_config.transformer_depth):
        block += unet_config.num_res_blocks
        downsample = level < levels - 1
        names.append(f"input_blocks.{block + (1 if downsample and not depth else 0)}")
        block += downsample
    return names + ["middle_block"]


# ----------------------------------------------------------------------------- loading


def diffusers_name(name):
    """ComfyUI's flattened names -> diffusers': body.{2i + j}.block1 -> adapter.body.i.resnets.j.block1 (R = 2),
    body.{2i}.in_conv -> adapter.body.i.in_conv, conv_in -> adapter.conv_in."""
    if m := re.fullmatch(r"body\.(\d+)\.(block1|block2)\.(weight|bias)", name):
        i, j = divmod(int(m[1]), 2)
        return f"adapter.body.{i}.resnets.{j}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"body\.(\d+)\.in_conv\.(weight|bias)", name):
        return f"adapter.body.{int(m[1]) // 2}.in_conv.{m[2]}"
    return "adapter." + name if name.startswith("conv_in.") else name


def adapter_config(shapes, where):
    """AdapterConfig from {diffusers name: shape}, or LoadError for a light adapter, an SD 1.x one, or no adapter."""
    if "adapter.conv_in.weight" not in shapes:
        if any(n.endswith("out_conv.weight") for n in shapes):
            raise LoadError(f"{where} is a light T2I-Adapter, which exists for SD 1.x only; use an SDXL adapter "
                            "(e.g. TencentARC/t2i-adapter-canny-sdxl-1.0).")
        raise LoadError(f"{where} is not a T2I-Adapter (no adapter.conv_in; it has e.g. {', '.join(list(shapes)[:3])}).")
    width, unshuffled = shapes["adapter.conv_in.weight"][:2]
    if unshuffled not in (256, 768):
        raise LoadError(f"{where} is a T2I-Adapter for SD 1.x (its input is {unshuffled} unshuffled channels, SDXL's "
                        "are 256 or 768); use an SDXL adapter.")
    blocks = sorted({int(m[1]) for n in shapes if (m := re.match(r"adapter\.body\.(\d+)\.", n))})
    channels = [shapes.get(f"adapter.body.{i}.resnets.0.block1.weight", (width,))[0] for i in blocks]
    res_blocks = {m[1] for n in shapes if (m := re.match(r"adapter\.body\.0\.resnets\.(\d+)\.", n))}
    return AdapterConfig(in_channels=unshuffled // 256, channels=tuple(channels), num_res_blocks=len(res_blocks))


def inspect_adapter(source, unet_config):
    """The header of a T2I-Adapter (diffusers folder or file, ComfyUI names, repo id) for the UNet of config
    `unet_config`, no tensor read -> (path, AdapterConfig, {file: {diffusers name: stored name}}). LoadError for
    anything that is not one, or whose maps do not fit that UNet."""
    path = Path(resolve(source))
    stored, _ = stored_shapes(path)
    names = {file: {diffusers_name(n): n for n in shapes} for file, shapes in stored.items()}
    cfg = adapter_config({d: stored[file][n] for file in stored for d, n in names[file].items()}, path)
    wanted = [unet_config.model_channels * m for m in (*unet_config.channel_mult, unet_config.channel_mult[-1])]
    if list(cfg.channels) != wanted or len(wanted) != len(positions(unet_config)):
        raise LoadError(f"{path} makes feature maps {list(cfg.channels)} wide; this model's UNet takes "
                        f"{wanted}: use an adapter made for this model family.")
    return path, cfg, names


def load_adapter(source, unet_config, dtype=None):
    """inspect_adapter's T2I-Adapter with its weights (cast to dtype), on the CPU."""
    path, cfg, names = inspect_adapter(source, unet_config)
    return built(lambda: T2IAdapter(cfg), read_renamed(names, dtype), f"{path} (a T2I-Adapter)")
