"""Control images from ordinary images, offline, in numpy and torch (no annotator download):

    python -m sampling.preprocess canny IN.png OUT.png [--low 100] [--high 200]   edges, white on black
    python -m sampling.preprocess scribble IN.png OUT.png [--threshold 32]        thick lines (XDoG), white on black
    python -m sampling.preprocess tile IN.png OUT.png [--factor 8]                the image, down and up again
    python -m sampling.preprocess blur IN.png OUT.png [--sigma 4]                 the image, Gaussian-blurred

canny follows OpenCV's cv2.Canny (what the canny ControlNets were trained on): 3x3 Sobel gradients of each
colour channel (the strongest channel's per pixel), L1 magnitude, thinning to local maxima across the edge,
then hysteresis: pixels above `high` are edges, pixels above `low` are edges where they touch one. scribble is
the XDoG (difference of Gaussians, sigmas 0.5 and 5) sketch AUTOMATIC1111's ControlNet extension calls
scribble_xdog. Depth, pose, lineart and segmentation maps need trained annotators: see docs/control.md.
OUT is written under a temporary name and renamed; an existing OUT is kept unless --overwrite.
"""

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SOBEL_X = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])


def as_tensor(image):
    """PIL -> (3, H, W) float32 in 0..255."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)


def as_image(x):
    """(3 or 1, H, W) in 0..255 -> an RGB PIL image."""
    array = x.clamp(0, 255).round().to(torch.uint8).expand(3, -1, -1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def gaussian_blur(x, sigma):
    """(C, H, W) blurred with a separable Gaussian of `sigma` (radius 3 sigma, the border pixels repeated)."""
    radius = max(1, math.ceil(3 * sigma))
    kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum())[None, None]  # (1, 1, K)
    x = x[:, None]  # (C, 1, H, W): each channel on its own
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel[..., None, :])
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel[..., :, None])
    return x[:, 0]


def canny(image, low=100.0, high=200.0):
    """Edges (white, 1 px wide) of a PIL image, as cv2.Canny(image, low, high) finds them."""
    x = as_tensor(image)[:, None]  # (3, 1, H, W)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, SOBEL_X[None, None])[:, 0], F.conv2d(padded, SOBEL_X.T[None, None])[:, 0]
    magnitude = gx.abs() + gy.abs()  # (3, H, W)
    strongest = magnitude.argmax(dim=0, keepdim=True)  # per pixel, the channel with the largest gradient
    gx, gy, magnitude = (t.gather(0, strongest)[0] for t in (gx, gy, magnitude))  # (H, W)
    # Thin: keep a pixel only if it is a maximum along its gradient's direction (rounded to 0, 45, 90, 135 deg).
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    direction = ((angle + 22.5) // 45).long() % 4  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    m = F.pad(magnitude, (1, 1, 1, 1))
    H, W = magnitude.shape
    at = lambda dy, dx: m[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
    neighbours = [(at(0, -1), at(0, 1)), (at(-1, -1), at(1, 1)), (at(-1, 0), at(1, 0)), (at(-1, 1), at(1, -1))]
    before = torch.stack([b for b, _ in neighbours]).gather(0, direction[None])[0]
    after = torch.stack([a for _, a in neighbours]).gather(0, direction[None])[0]
    thin = (magnitude > before) & (magnitude >= after)
    strong, weak = thin & (magnitude > high), thin & (magnitude > low)
    edges = strong
    while True:  # hysteresis: grow the strong edges through 8-connected weak pixels until nothing changes
        grown = weak & (F.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0] > 0)
        if torch.equal(grown | edges, edges):
            break
        edges = grown | edges
    return as_image(edges[None].float() * 255)


def scribble(image, threshold=32.0):
    """XDoG lines: where a fine Gaussian blur is darker than a coarse one by more than threshold / 2."""
    x = as_tensor(image)
    difference = (gaussian_blur(x, 5.0) - gaussian_blur(x, 0.5)).amin(dim=0)  # (H, W): > 0 on dark strokes
    return as_image((2 * difference.clamp(0, 255) > threshold)[None].float() * 255)


def tile(image, factor=8.0):
    """The image at 1 / factor of its size, scaled back up (bicubic): a tile ControlNet's input."""
    small = image.convert("RGB").resize((max(1, round(image.width / factor)), max(1, round(image.height / factor))),
                                         Image.BICUBIC)
    return small.resize(image.size, Image.BICUBIC)


def blur(image, sigma=4.0):
    return as_image(gaussian_blur(as_tensor(image), sigma))


PREPROCESSORS = {"canny": canny, "scribble": scribble, "tile": tile, "blur": blur}


def main(argv=None):
    from models.files import LoadError, atomic_file, check_destination
    from sampling.images import open_rgb

    p = argparse.ArgumentParser(prog="python -m sampling.preprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=list(PREPROCESSORS))
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--low", type=float, default=100.0, help="canny: the weak edge threshold (OpenCV's units)")
    p.add_argument("--high", type=float, default=200.0, help="canny: the strong edge threshold")
    p.add_argument("--threshold", type=float, default=32.0, help="scribble: the line threshold (0..255)")
    p.add_argument("--factor", type=float, default=8.0, help="tile: how many times smaller the image goes")
    p.add_argument("--sigma", type=float, default=4.0, help="blur: the Gaussian's sigma in pixels")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    options = {"canny": dict(low=args.low, high=args.high), "scribble": dict(threshold=args.threshold),
               "tile": dict(factor=args.factor), "blur": dict(sigma=args.sigma)}[args.kind]
    try:
        if not all(math.isfinite(v) and v > 0 for v in options.values()) or args.low > args.high:
            raise ValueError(f"{args.kind}'s settings {options} must be positive numbers (canny: --low <= --high)")
        image = open_rgb(args.input)
        out = check_destination(args.output, args.overwrite)
        result = PREPROCESSORS[args.kind](image, **options)
        with atomic_file(out, overwrite=args.overwrite) as tmp:
            result.save(tmp, format="PNG")
    except (ValueError, LoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
