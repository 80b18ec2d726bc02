"""Does a model follow its prompt? Generate from procedural captions, read the pictures back with the
attribute classifier, and compare with what the prompt asked for; the baseline scores the same images
against the captions of other, random characters (what chance agreement looks like).

    python -m data.evaluate --model plainxl-tiny [--count 100] [--steps 20] [--grid FILE.png]
"""

import argparse
import functools

import numpy as np
from PIL import Image

from data import classifier, procedural
from models.files import LoadError, output_or_exit
from sampling.pipeline import Pipeline, Settings


def prompt_fidelity(pipe, count=100, seed=1000, steps=20, cfg=5.0, sampler="euler_a", size=64):
    """Per-attribute accuracy of generations against their own prompts, and against random prompts."""
    rng = np.random.default_rng(seed)
    asked = [procedural.random_character(rng) for _ in range(count)]
    others = [procedural.random_character(rng) for _ in range(count)]  # the random-prompt baseline
    images = []
    for i, character in enumerate(asked):
        settings = Settings(prompt=procedural.caption(character), width=size, height=size, steps=steps, cfg=cfg,
                            sampler=sampler, seed=seed + i)
        images += pipe(settings, progress=False)
    model = classifier.load()
    return classifier.tag_accuracy(model, images, asked), classifier.tag_accuracy(model, images, others), images


def caption_fidelity(images, prompts):
    """{attribute: share of images read (by the attribute classifier) as their procedural caption says, "mean"};
    sampling.ablate's score for the bundled model."""
    return classifier.tag_accuracy(bundled_classifier(), images, [procedural.parse_caption(p) for p in prompts])


@functools.cache
def bundled_classifier():
    return classifier.load()


def grid(images, columns, side=128):
    """One sheet of images in rows of `columns`, each scaled to side x side (nearest: pixels stay sharp)."""
    sheet = Image.new("RGB", (columns * side, side * -(-len(images) // columns)), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (side * (i % columns), side * (i // columns)))
    return sheet


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", metavar="FOLDER_OR_CONFIG_JSON", help="the architecture of a bare single file")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--grid", help="also write the first 16 generations here, 4x4, each 2x (their prompts are printed)")
    args = parser.parse_args(argv)
    if args.grid:  # the output before the model and the generations
        output_or_exit(args.grid, "--grid", folder=False)
    try:
        pipe = Pipeline.load(args.model, config=args.config)
    except LoadError as e:
        raise SystemExit(f"error: {e}") from None
    own, baseline, images = prompt_fidelity(pipe, args.count, args.seed, args.steps, args.cfg)
    if args.grid:
        rng = np.random.default_rng(args.seed)  # prompt_fidelity's prompts, in its order
        for i in range(min(16, args.count)):
            print(f"{i:2d}: {procedural.caption(procedural.random_character(rng))}")
        grid(images[:16], columns=4).save(args.grid)
    print(f"{'attribute':>12} | own prompt | random prompt")
    for name in own:
        print(f"{name:>12} | {own[name]:10.3f} | {baseline[name]:13.3f}")


if __name__ == "__main__":
    main()
