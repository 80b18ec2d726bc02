"""Images in and out of the pipeline: reading an init image or mask, turning them into the tensors
diffusers' VaeImageProcessor makes (so img2img and inpainting equal its pipelines), and the two hi-res
fix upscalers (AUTOMATIC1111's "Latent" and "Lanczos")."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

UPSCALERS = ("latent", "lanczos")


class ImageError(ValueError):
    """An image file that cannot be read; the message names it."""


def open_rgb(path):
    """An image file decoded in full, as 8-bit RGB (RGBA and palette images lose their alpha, grayscale is
    repeated). 16- and 32-bit grayscale (PIL modes I;16, I) are scaled to 8 bits: PIL's own convert clips
    them at 255, which turns a 16-bit photo all white. Format rule: PIL tells the format from the content
    (its magic bytes), never from the suffix."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                top = 65535 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 255
                gray = np.asarray(image, dtype=np.float64) * (255 / top)
                image = Image.fromarray(gray.round().clip(0, 255).astype(np.uint8), "L")
            elif image.mode == "F":
                image = Image.fromarray((np.asarray(image).clip(0, 1) * 255).round().astype(np.uint8), "L")
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path} ({e})") from None


def as_image(image):
    """A path or a PIL image -> an RGB PIL image."""
    return open_rgb(image) if not isinstance(image, Image.Image) else image.convert("RGB")


def default_size(image, multiple=8):
    """(width, height) an image generates at when none is given: its own, rounded down to multiples of `multiple`."""
    return image.width // multiple * multiple, image.height // multiple * multiple


def resized(image, width, height):
    """Lanczos to (width, height), as VaeImageProcessor.resize (a no-op at the same size)."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def pixels(image, width, height):
    """A PIL image -> (1, 3, height, width) float32 in [-1, 1] (resized first if its size differs)."""
    array = np.asarray(resized(image.convert("RGB"), width, height), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_pixels(mask, width, height):
    """A mask image (white = repaint) -> (1, 1, height, width) of 0 and 1: resized, then made grayscale
    and binarized at 0.5, in diffusers' mask_processor order."""
    gray = np.asarray(resized(mask, width, height).convert("L"), dtype=np.float32) / 255.0  # (H, W)
    return torch.from_numpy((gray >= 0.5).astype(np.float32))[None, None]


def latent_mask(mask, latent_size):
    """(1, 1, H, W) pixel mask -> (1, 1, h, w) at latent resolution, nearest (diffusers' prepare_mask_latents)."""
    return F.interpolate(mask, size=latent_size)


def upscale_latents(latents, width, height, pixels_per_latent=8):
    """AUTOMATIC1111's "Latent" hi-res upscaler: bilinear, no antialias, to (height / 8, width / 8) (8: the VAE's
    pixels per latent)."""
    size = (height // pixels_per_latent, width // pixels_per_latent)
    return F.interpolate(latents, size=size, mode="bilinear", antialias=False)


def upscale_images(images, width, height):
    """AUTOMATIC1111's "Lanczos" hi-res upscaler: the decoded images, resized with Lanczos."""
    return [image.resize((width, height), Image.LANCZOS) for image in images]
