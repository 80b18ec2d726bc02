"""docs/samplers.md's picture: every sampler (rows) on every schedule (columns), one prompt and seed, the bundled
model, so the families can be told apart at a glance (ODE samplers agree, ancestral and SDE ones wander).

    python -m data.sampler_grid [--out notebooks/figures/samplers.png] [--steps 12] [--side 64]
"""

import argparse

from PIL import Image, ImageDraw

from models.files import output_or_exit
from sampling.names import SAMPLER_NAMES, SCHEDULE_NAMES
from sampling.pipeline import Pipeline, Settings

PROMPT = "1girl, solo, pink hair, twintails, green eyes, smile, ribbon, blue background"
SCHEDULES = ("default", *SCHEDULE_NAMES)


def grid(pipe, steps, side, label_width=130, header=28):
    """The labelled sheet: rows = samplers, columns = schedules, each tile `side` pixels."""
    sheet = Image.new("RGB", (label_width + side * len(SCHEDULES), header + side * len(SAMPLER_NAMES)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, schedule in enumerate(SCHEDULES):  # two lines of header: the long names do not fit one tile
        draw.text((label_width + c * side + 2, 2 + 12 * (c % 2)), schedule, fill="black")
    for r, sampler in enumerate(SAMPLER_NAMES):
        draw.text((4, header + r * side + side // 2 - 6), sampler, fill="black")
        for c, schedule in enumerate(SCHEDULES):
            s = Settings(prompt=PROMPT, negative_prompt="lowres", steps=steps, cfg=5.0, sampler=sampler,
                         schedule=schedule, seed=3)
            image = pipe(s, progress=False)[0]
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (label_width + c * side, header + r * side))
    return sheet


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.sampler_grid", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="notebooks/figures/samplers.png")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--side", type=int, default=64)
    args = p.parse_args(argv)
    out = output_or_exit(args.out, "the grid")
    grid(Pipeline.load("plainxl-tiny"), args.steps, args.side).save(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
