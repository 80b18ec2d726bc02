"""Conditioning adapters at generation time: what ControlNets (models/controlnet.py), T2I-Adapters
(models/t2i_adapter.py) and IP-Adapters (models/ip_adapter.py) add to the UNet.

    with_opened_images  a generation's control, adapter and IP-Adapter images read once
    control_pixels      a control image -> (1, C, H, W) in [0, 1] at the output size, as diffusers prepares it
    check_control       control settings that cannot run, refused in one sentence before the weights load
    Control             one stage's ControlNets and adapters: Control.unet_kwargs(x, t, context, y) at each step
    with_image_tokens   the IP-Adapters' image tokens appended to each prompt's context (the negative's: the
                        unconditional image's)

diffusers' StableDiffusionXLControlNetPipeline is the reference (tests/test_controlnet.py): several ControlNets
add up; each acts on the steps i of the stage with start <= i / n and (i + 1) / n <= end (n: the stage's steps up
to the schedule's end); guess mode runs them on the conditional half only, the unconditional half gets nothing.
"""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.clip_vision import clip_pixels
from models.controlnet import CONTROL_TYPES
from models.t2i_adapter import positions
from sampling.images import resized

# Modes PIL converts to RGB without losing the picture; 16-bit and float images (depth maps) would clip at 255.
RGB_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "La")
ASPECT_TOLERANCE = 0.02  # a control image's aspect ratio may differ this much from the output's (rounding)


def read_control_image(image):
    """A path or PIL image -> the PIL image, or ValueError for a mode that does not convert to RGB."""
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as e:
            raise ValueError(f"the control image {image} cannot be read as an image ({e}); give a PNG or JPEG") from None
    if image.mode not in RGB_MODES:
        raise ValueError(f"the control image is a {image.mode} image (16-bit or float pixels); save it as 8-bit RGB "
                         "(e.g. a depth map scaled to 0-255)")
    return image


def with_opened_images(s):
    """Settings s with its control, T2I-Adapter and IP-Adapter images read (paths become PIL images, checked)."""
    return replace(s, **{name: tuple(read_control_image(image) for image in getattr(s, name))
                         for name in ("control_images", "adapter_images", "ip_images")})


def control_pixels(image, width, height, grey=False):
    """diffusers' control image preparation: RGB (grey: one channel, for a sketch adapter), resized to width x
    height with Lanczos if it is not that size, [0, 1] (not [-1, 1]) -> (1, 3 or 1, height, width) float32."""
    image = resized(read_control_image(image).convert("L" if grey else "RGB"), width, height)
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array[..., None] if grey else array).permute(2, 0, 1)[None]


def check_control(s, num_controlnets, num_adapters=0, num_ip_adapters=0):
    """ValueError, one sentence with the fix, for control settings that cannot run with `num_controlnets`
    ControlNets, `num_adapters` T2I-Adapters and `num_ip_adapters` IP-Adapters."""
    for what, images, scales, count, flag in [
        ("ControlNet", s.control_images, s.control_scales, num_controlnets, "--control-image per --controlnet"),
        ("T2I-Adapter", s.adapter_images, s.adapter_scales, num_adapters, "--adapter-image per --adapter"),
        ("IP-Adapter", s.ip_images, s.ip_scales, num_ip_adapters, "--ip-image per --ip-adapter"),
    ]:
        if len(images) != count:
            raise ValueError(f"{count} {what}(s) and {len(images)} image(s) for them: give one {flag}, in the same "
                             "order")
        if scales and len(scales) != count:
            raise ValueError(f"{len(scales)} scales for {count} {what}(s); give one per {what}")
        if not all(math.isfinite(v) for v in scales):
            raise ValueError(f"{what} scales {list(scales)} must be finite numbers, e.g. 0.8")
    if (num_controlnets or num_adapters) and (s.width < 8 or s.height < 8):
        raise ValueError(f"the output would be {s.width}x{s.height}: give a control image of at least 16x16, or "
                         "--width and --height")
    if num_adapters and s.hires_scale:
        raise ValueError("T2I-Adapters with the hi-res fix are not supported (its second pass's size need not be a "
                         "multiple of 16); drop --hires-scale, or run the adapter at the larger size")
    if num_adapters and (s.width % 16 or s.height % 16):
        raise ValueError(f"a T2I-Adapter works on sizes that are multiples of 16; {s.width}x{s.height} is not: use "
                         f"{s.width // 16 * 16 or 16}x{s.height // 16 * 16 or 16}")
    if not (math.isfinite(s.adapter_factor) and 0 <= s.adapter_factor <= 1):
        raise ValueError(f"--adapter-factor {s.adapter_factor} is not a fraction of the steps in [0, 1]; e.g. 0.8")
    if s.control_types and len(s.control_types) != num_controlnets:
        raise ValueError(f"{len(s.control_types)} --control-type for {num_controlnets} ControlNet(s): give one per "
                         "--controlnet, in order (none for a plain ControlNet)")
    if not (0 <= s.control_start < s.control_end <= 1):
        raise ValueError(f"--control-start {s.control_start} / --control-end {s.control_end} are not fractions of "
                         "the schedule with 0 <= start < end <= 1; e.g. 0 and 0.6")
    for image in s.ip_images:
        read_control_image(image)
    for image in (*s.control_images, *s.adapter_images):
        image = read_control_image(image)
        if s.width and s.height:
            (w, h), aspect = image.size, s.width / s.height
            if abs(w / h - aspect) > ASPECT_TOLERANCE * aspect:
                raise ValueError(f"the control image is {w}x{h} but the output is {s.width}x{s.height}, another shape; "
                                 "crop the control image to the output's shape, or leave out --width/--height to "
                                 "take its size")


class Control:
    """A stage's ControlNets and T2I-Adapters with their images at the stage's size, scales and step windows.

    total: the steps from the stage's first to the schedule's end (a base cut at denoising_end counts the rest,
    as diffusers' ControlNet pipeline does); stage_steps: the steps this stage runs (what diffusers' adapter
    pipeline counts adapter_factor in); uncond_contexts: the negative prompts' context tensors, which mark a pass
    as unconditional under guess mode when CFG runs as two passes (cfg_mode "split")."""

    def __init__(self, controlnets, adapters, unet_config, s, total, stage_steps, num_images, uncond_contexts, device,
                 image_tokens=0):
        self.controlnets, self.image_tokens = controlnets, image_tokens
        self.hints = [control_pixels(image, s.width, s.height).to(device) for image in s.control_images]
        self.scales = list(s.control_scales) or [1.0] * len(controlnets)
        self.start, self.end, self.total = s.control_start, s.control_end, total
        self.guess_mode = s.guess_mode or any(c.controlnet_config.global_pool for c in controlnets)  # as diffusers
        self.num_images, self.uncond_contexts = num_images, uncond_contexts
        self.adapter_steps = int(stage_steps * s.adapter_factor)  # diffusers' adapter_conditioning_factor
        self.features = adapter_features(adapters, positions(unet_config), s, device) if adapters else None
        self.step = 0  # the stage's step now running (advanced by after_step)
        types = list(s.control_types) or [None] * len(controlnets)
        self.types = [control_type_index(c.controlnet_config, kind) for c, kind in zip(controlnets, types)]

    def after_step(self, i):
        self.step = i + 1

    def unet_kwargs(self, x, t, context, y):
        """What the UNet takes for a pass over x (B or 2B rows) at the current step: {"control": the ControlNets'
        summed residuals, "adapter": the T2I-Adapters' summed maps}, each only inside its window."""
        kwargs = {}
        if self.controlnets and not (self.step / self.total < self.start or (self.step + 1) / self.total > self.end):
            kwargs["control"] = self.residuals(x, t, context, y)
        if self.features is not None and self.step < self.adapter_steps:
            kwargs["adapter"] = {name: f.expand(len(x), -1, -1, -1) for name, f in self.features.items()}
        return {k: v for k, v in kwargs.items() if v is not None}

    def residuals(self, x, t, context, y):
        rows = slice(None)
        if self.guess_mode:
            if len(x) == 2 * self.num_images:  # the CFG batch [uncond, cond]: the conditional half only
                rows = slice(self.num_images, None)
            elif any(context is u for u in self.uncond_contexts):  # an unconditional pass of its own
                return None
        total = None
        for controlnet, hint, scale, kind in zip(self.controlnets, self.hints, self.scales, self.types):
            xr = x[rows, :controlnet.config.in_channels]  # an inpainting UNet's x also holds the mask and image
            text = context[rows, :context.shape[1] - self.image_tokens]
            residuals = controlnet(xr, t[rows], text, y[rows], hint.expand(len(xr), -1, -1, -1), scale, self.guess_mode,
                                   kind)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        if rows.start is not None:  # zeros for the unconditional half, as diffusers
            total = [torch.cat([torch.zeros_like(r), r]) for r in total]
        return total


def control_type_index(cfg, kind):
    """A --control-type (a name of CONTROL_TYPES, an index, or none) for a ControlNet of config `cfg` -> the index
    a ControlNet-Union takes, or None for a plain ControlNet; ValueError where they do not fit."""
    kind = None if kind in (None, "none") else CONTROL_TYPES.get(kind, kind)
    names = ", ".join(n for n, i in CONTROL_TYPES.items() if i < cfg.control_types)
    if cfg.control_types and not (isinstance(kind, int) and 0 <= kind < cfg.control_types):
        raise ValueError(f"a ControlNet-Union needs to be told what its control image is: --control-type one of {names}")
    if not cfg.control_types and kind is not None:
        raise ValueError(f"--control-type {kind} is for a ControlNet-Union; give none for a plain ControlNet")
    return kind


def adapter_features(adapters, names, s, device):
    """The T2I-Adapters' maps for Settings s, computed once: {official block name (of `names`, in order): the sum
    of scale x map} (1, C, h, w)."""
    scales = list(s.adapter_scales) or [1.0] * len(adapters)
    total = {}
    for adapter, image, scale in zip(adapters, s.adapter_images, scales):
        pixels = control_pixels(image, s.width, s.height, grey=adapter.config.in_channels == 1)
        maps = adapter(pixels.to(device, next(adapter.parameters()).dtype))
        for name, f in zip(names, maps, strict=True):
            total[name] = total[name] + f * scale if name in total else f * scale
    return total


def with_image_tokens(edits, ip_adapters, s, device):
    """edits (sampling.conditioning.edited_conditioning's (last call, cond, uncond)) with the IP-Adapters' tokens
    appended to each context: the image's to the prompt's, the unconditional image's to the negative's. ip_adapters:
    (IPAdapter, its CLIP vision encoder) pairs, one per image of s.ip_images."""
    tokens = [adapter.tokens(encoder, clip_pixels(read_control_image(image)).to(device))
              for (adapter, encoder), image in zip(ip_adapters, s.ip_images)]
    image, uncond_image = (torch.cat([t[i] for t in tokens], dim=1) for i in (0, 1))  # (1, sum of tokens, 2048)
    append = lambda c, t: (torch.cat([c[0], t.to(c[0]).expand(len(c[0]), -1, -1)], dim=1), c[1])
    return [(last, append(cond, image), uncond and append(uncond, uncond_image)) for last, cond, uncond in edits]
