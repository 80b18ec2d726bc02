"""The README's picture of image-conditioned generation on the bundled models, and what the tiny
refiner's second stage changes, measured.

    python -m data.showcase [--out notebooks/figures/image_conditioning.png] [--count 32]

Tiles, left to right: text-to-image; img2img of it with another hair colour; the mask; inpainting the
background another colour; the base alone; base + refiner (switch at 0.8); a 32-pixel first pass and
its hi-res fix at 2x (the tiny model's native 64); two colliding hair colours, unweighted and weighted.
The measurement generates `count` procedural characters with the base alone and with base + refiner,
and reports the attribute classifier's tag accuracy of each (does the second stage keep what the
prompt asked for?) and the mean absolute pixel difference between the two (how much it changes).
"""

import argparse

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data import classifier, procedural
from models.files import output_or_exit
from sampling.pipeline import Pipeline, Settings

PROMPT = "1girl, blue hair, long hair, red eyes, smile, white background"
HAIRS = "1girl, pink hair, blue hair, long hair, red eyes, white background"  # two colours asked at once
COMMON = dict(negative_prompt=None, width=64, height=64, steps=28, sampler="euler_a", seed=3)


def background_mask(image):
    """White (repaint) where the picture is near its corner colour (the background), black elsewhere."""
    pixels = np.asarray(image, dtype=np.int16)
    corner = pixels[:4, :4].reshape(-1, 3).mean(0)
    near = np.abs(pixels - corner).sum(-1) < 60
    return Image.fromarray((near * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(3))  # keep a margin


def figure(base, refiner, side=128):
    """The labelled row of tiles (each `side` pixels, nearest-neighbour scaled) -> one PIL image."""
    first = base(Settings(prompt=PROMPT, **COMMON), progress=False)[0]
    mask = background_mask(first)
    tiles = [
        ("text-to-image", first),
        ("img2img 0.6, green hair", base(Settings(prompt=PROMPT.replace("blue", "green"), **COMMON, init_image=first,
                                                  strength=0.6), progress=False)[0]),
        ("mask (white repaints)", mask.convert("RGB")),
        ("inpainted, red bg", base(Settings(prompt=PROMPT.replace("white background", "red background"), **COMMON,
                                            init_image=first, mask=mask, strength=1.0), progress=False)[0]),
        ("base, seed 5", base(Settings(prompt=PROMPT, **{**COMMON, "seed": 5}), progress=False)[0]),
        ("+ refiner at 0.8", base(Settings(prompt=PROMPT, **{**COMMON, "seed": 5}), refiner=refiner, progress=False)[0]),
        ("first pass, 32 px", base(Settings(prompt=PROMPT, **{**COMMON, "width": 32, "height": 32}), progress=False)[0]),
        ("hi-res fix 2x, 64 px", base(Settings(prompt=PROMPT, **{**COMMON, "width": 32, "height": 32}, hires_scale=2,
                                               hires_strength=0.7), progress=False)[0]),
        ("pink hair, blue hair", base(Settings(prompt=HAIRS, **COMMON), progress=False)[0]),
        ("(pink hair:1.4), blue..", base(Settings(prompt=HAIRS.replace("pink hair", "(pink hair:1.4)"), **COMMON),
                                         progress=False)[0]),
    ]
    label = 16
    sheet = Image.new("RGB", (side * len(tiles), side + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, image) in enumerate(tiles):
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (i * side, label))
        draw.text((i * side + 3, 2), name, fill=(0, 0, 0))
    return sheet


def refiner_effect(base, refiner, count=32, seed=2000):
    """{"base": ..., "base + refiner": ...}: tag accuracy (mean over attributes), and the mean |difference|
    between the two stages' images in 8-bit levels."""
    rng = np.random.default_rng(seed)
    characters = [procedural.random_character(rng) for _ in range(count)]
    reader = classifier.load()
    images = {name: [base(Settings(prompt=procedural.caption(c), **{**COMMON, "seed": seed + i}), refiner=second,
                          progress=False)[0] for i, c in enumerate(characters)]
              for name, second in [("base", None), ("base + refiner", refiner)]}
    results = {name: {"tag accuracy": float(np.mean(list(classifier.tag_accuracy(reader, ims, characters).values())))}
               for name, ims in images.items()}
    results["base + refiner"]["mean |difference| to base"] = float(np.mean(
        [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean()
         for a, b in zip(images["base"], images["base + refiner"])]))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.showcase", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="notebooks/figures/image_conditioning.png")
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args(argv)
    output_or_exit(args.out, "--out", folder=False)  # before the work
    base, refiner = Pipeline.load("plainxl-tiny"), Pipeline.load("plainxl-tiny-refiner")
    figure(base, refiner).save(args.out)
    print(f"wrote {args.out}")
    for name, numbers in refiner_effect(base, refiner, args.count).items():
        print(f"{name:>24}: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()))


if __name__ == "__main__":
    main()
