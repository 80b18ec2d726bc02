"""The ControlNet demo on the bundled tiny model: a canny ControlNet trained on procedural characters' own edge
maps (configs/tiny_controlnet.py), then measured on characters it never saw. Each picture shows its character at
a random size and place (the model alone draws her centred and whole), so the map is what says where she stands.

Edge agreement: the canny edges of a generated image (sampling.preprocess.canny, the thresholds the maps were made
with) against its control map, as an F1 score with one pixel of tolerance (precision: the share of the output's
edge pixels within one pixel of a control edge; recall: the share of control edge pixels within one pixel of an
output edge). Measured for the same prompts and seeds without the ControlNet and with it, and, as the floor of
unrelated drawings, for control maps paired with another character's map.

    python -m train.demo_controlnet [--out runs/demo_controlnet] [--model plainxl-tiny] [--count 48] [--field=value ...]

Writes OUT/results.json and OUT/grid.png (columns: control map, without, with; one row per character).
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import evaluate
from data.procedural import caption, draw, random_character
from sampling.pipeline import Pipeline, Settings
from sampling.preprocess import canny
from train import dreambooth
from train.demo import arguments

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_controlnet.py")
TRAIN_IMAGES = 400
GENERATION = dict(width=64, height=64, steps=20, cfg=5.0, sampler="euler_a")


def write_pairs(out, count, seed):
    """`count` random characters: images/ (with captions) and edges/ (their canny maps), written atomically."""
    rng = np.random.default_rng(seed)
    for name in ("images", "edges"):
        (out / name).mkdir(parents=True, exist_ok=True)
    characters = []
    for i in range(count):
        character = random_character(rng)
        image = placed(draw(character, 64, rng), rng)
        for folder, picture in (("images", image), ("edges", canny(image))):
            tmp = out / folder / f".{i:04d}.png.tmp"
            picture.save(tmp, format="PNG")
            os.replace(tmp, out / folder / f"{i:04d}.png")
        (out / "images" / f"{i:04d}.txt").write_text(caption(character))
        characters.append(character)
    return characters


def placed(image, rng):
    """The drawing scaled to 55-100 % and put anywhere on a canvas of its background: where the character stands
    and how big it is are then what only the edge map tells (the tiny model draws her centred and whole)."""
    side = int(rng.integers(36, 65))
    canvas = Image.new("RGB", image.size, image.getpixel((0, 0)))
    x, y = (int(v) for v in rng.integers(0, image.width - side + 1, 2))
    canvas.paste(image.resize((side, side), Image.Resampling.LANCZOS), (x, y))
    return canvas


def edge_f1(output_edges, control_edges, tolerance=1):
    """F1 of two edge maps (PIL, white on black) with `tolerance` pixels of slack."""
    a, b = (torch.from_numpy(np.asarray(e)[..., 0] > 0).float()[None, None] for e in (output_edges, control_edges))
    near = lambda m: F.max_pool2d(m, 2 * tolerance + 1, 1, tolerance) > 0
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    precision = (a.bool() & near(b)).sum() / a.sum()
    recall = (b.bool() & near(a)).sum() / b.sum()
    return float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0


def measure(pipe, controls, prompts, seed=30_000):
    """-> (mean edge F1 of the outputs against their maps, the outputs) for one pipeline."""
    outputs, scores = [], []
    for i, (control, prompt) in enumerate(zip(controls, prompts)):
        s = Settings(prompt=prompt, seed=seed + i, control_images=[control] if pipe.controlnets else (), **GENERATION)
        image = pipe(s, progress=False)[0]
        outputs.append(image)
        scores.append(edge_f1(canny(image), control))
    return round(float(np.mean(scores)), 3), outputs


def sheet(controls, without, with_controlnet, rows=6, scale=3):
    chosen = [im for triple in zip(controls[:rows], without[:rows], with_controlnet[:rows]) for im in triple]
    return evaluate.grid(chosen, columns=3, side=64 * scale)


def main(argv=None):
    args, overrides, out = arguments(argv, "train.demo_controlnet", __doc__, ["images", "edges", "run", "held"],
                                     count=48)
    write_pairs(out, TRAIN_IMAGES, seed=0)
    held = write_pairs(out / "held", args.count, seed=1)  # characters never trained on
    code = dreambooth.main(["--config", CONFIG, f"--model={args.model}", f"--instance_data_dir={out / 'images'}",
                            f"--control_dir={out / 'edges'}", f"--output_dir={out / 'run'}", *overrides])
    if code:
        return code
    controls = [Image.open(out / "held" / "edges" / f"{i:04d}.png").convert("RGB") for i in range(len(held))]
    prompts = [caption(c) for c in held]
    plain, plain_images = measure(Pipeline.load(args.model), controls, prompts)
    controlled, controlled_images = measure(Pipeline.load(args.model, controlnets=[out / "run" / "controlnet"]),
                                            controls, prompts)
    unrelated = round(float(np.mean([edge_f1(controls[i - 1], controls[i]) for i in range(len(controls))])), 3)
    seconds = sum(json.loads(line)["seconds"] for line in (out / "run" / "log.jsonl").read_text().splitlines())
    results = {"edge F1 without the ControlNet": plain, "edge F1 with the ControlNet": controlled,
               "edge F1 of another character's map": unrelated, "training s": round(seconds, 1),
               "held-out characters": len(held)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sheet(controls, plain_images, controlled_images).save(out / "grid.png")
    print(json.dumps(results, indent=2))
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
