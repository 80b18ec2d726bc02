"""Control images at generation time: what the ControlNets (models/controlnet.py) add to the UNet at each step.

    control_pixels      a control image -> (1, C, H, W) in [0, 1] at the output size, as diffusers prepares it
    check_control       control settings that cannot run, refused in one sentence before the weights load
    Control             one stage's ControlNets and their images: Control.unet_kwargs(x, t, context, y) at each step

diffusers' StableDiffusionXLControlNetPipeline is the reference (tests/test_controlnet.py): several ControlNets
add up; each acts on the steps i of the stage with start <= i / n and (i + 1) / n <= end (n: the stage's steps up
to the schedule's end); guess mode runs them on the conditional half only, the unconditional half gets nothing.
"""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def control_pixels(image, width, height):
    """diffusers' control image preparation: RGB, resized to width x height with Lanczos if it is not that size,
    [0, 1] (not [-1, 1]) -> (1, 3, height, width) float32."""
    image = resized(read_control_image(image).convert("RGB"), width, height)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def check_control(s, num_controlnets):
    """ValueError, one sentence with the fix, for control settings that cannot run with `num_controlnets`."""
    images, scales = list(s.control_images), list(s.control_scales)
    if len(images) != num_controlnets:
        raise ValueError(f"{num_controlnets} ControlNets and {len(images)} control images: give one --control-image "
                         "per --controlnet, in the same order")
    if scales and len(scales) != num_controlnets:
        raise ValueError(f"{len(scales)} control scales for {num_controlnets} ControlNets; give one per ControlNet")
    if not all(math.isfinite(v) for v in scales):
        raise ValueError(f"control scales {scales} must be finite numbers, e.g. 0.8")
    if not (0 <= s.control_start < s.control_end <= 1):
        raise ValueError(f"--control-start {s.control_start} / --control-end {s.control_end} are not fractions of "
                         "the schedule with 0 <= start < end <= 1; e.g. 0 and 0.6")
    for image in images:
        image = read_control_image(image)
        if s.width and s.height:
            (w, h), aspect = image.size, s.width / s.height
            if abs(w / h - aspect) > ASPECT_TOLERANCE * aspect:
                raise ValueError(f"the control image is {w}x{h} but the output is {s.width}x{s.height}, another shape; "
                                 "crop the control image to the output's shape, or leave out --width/--height to "
                                 "take its size")


class Control:
    """A stage's ControlNets with their control images at the stage's size, scales and step window.

    total: the steps from the stage's first to the schedule's end (a base cut at denoising_end counts the rest,
    as diffusers does); uncond_contexts: the negative prompts' context tensors, which mark a pass as
    unconditional under guess mode when CFG runs as two passes (cfg_mode "split")."""

    def __init__(self, controlnets, s, total, num_images, uncond_contexts, device):
        self.controlnets = controlnets
        self.hints = [control_pixels(image, s.width, s.height).to(device) for image in s.control_images]
        self.scales = list(s.control_scales) or [1.0] * len(controlnets)
        self.start, self.end, self.total = s.control_start, s.control_end, total
        self.guess_mode = s.guess_mode or any(c.controlnet_config.global_pool for c in controlnets)  # as diffusers
        self.num_images, self.uncond_contexts = num_images, uncond_contexts
        self.step = 0  # the stage's step now running (advanced by after_step)

    def after_step(self, i):
        self.step = i + 1

    def acting(self):
        i, n = self.step, self.total
        return not (i / n < self.start or (i + 1) / n > self.end)

    def unet_kwargs(self, x, t, context, y):
        """{"control": the summed residuals} for a UNet pass over x (B or 2B rows), or {} off the window."""
        if not self.acting():
            return {}
        rows = slice(None)
        if self.guess_mode:
            if len(x) == 2 * self.num_images:  # the CFG batch [uncond, cond]: the conditional half only
                rows = slice(self.num_images, None)
            elif any(context is u for u in self.uncond_contexts):  # an unconditional pass of its own
                return {}
        total = None
        for controlnet, hint, scale in zip(self.controlnets, self.hints, self.scales):
            xr = x[rows, :controlnet.config.in_channels]  # an inpainting UNet's x also holds the mask and image
            residuals = controlnet(xr, t[rows], context[rows], y[rows], hint.expand(len(xr), -1, -1, -1), scale,
                                   self.guess_mode)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        if rows.start is not None:  # zeros for the unconditional half, as diffusers
            total = [torch.cat([torch.zeros_like(r), r]) for r in total]
        return {"control": total}
