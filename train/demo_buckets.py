"""The non-square DreamBooth demo on the bundled tiny model: the same subject as train.demo (heterochromia and a
star hairpin), shown in portraits (64x96, her head at the top) and landscapes (96x64, her head at the left), as
phone photos frame people; trained once with square centre crops (the old way: a portrait loses its top, where
her hair and hairpin are) and once in aspect-ratio buckets (data/buckets.py), both with an EMA of the weights and a
validation loss on one held-out picture.

Both see her head at the same scale (64 pixels): the square run's crops are 64 x 64 of the unresized pictures, the
bucket run's buckets (resolution (64, 96)) are the pictures themselves. Measured on non-square outputs, 64x96 and
96x64: the attribute classifier (data.classifier) reads the square where her head is (the top of a portrait, the
left of a landscape) as train.demo reads whole images; "subject fidelity" is the share of her identity it reads as
hers. For the same runs: the EMA weights' subject fidelity, and the validation loss at the first and last
measurement.

    python -m train.demo_buckets [--out runs/demo_buckets] [--model plainxl-tiny] [--count 48] [--field=value ...]

Writes OUT/results.json and OUT/grid.png (rows: square crops, buckets; portraits then landscapes).
"""

import json
import os

import numpy as np
from PIL import Image

from data import classifier
from data.procedural import draw
from sampling.pipeline import Pipeline, Settings
from train import dreambooth
from train.demo import CONFIG, IDENTITY, SUBJECT, arguments

SHAPES = {"portrait": (64, 96), "landscape": (96, 64)}  # the pictures' (width, height); her head is 64 x 64
OUTPUTS = SHAPES  # what is generated: the buckets the pictures train in, the pictures' own shapes
COMMON = {"prior_loss_weight": 0.0, "ema_decay": 0.99, "validation_split": 0.15, "validation_every": 50}
RUNS = {"square crops": ("square", {}),
        "buckets": ("buckets", {"enable_bucket": True, "resolution": "(64,96)", "min_bucket_reso": 32,
                                "max_bucket_reso": 128, "bucket_reso_steps": 16})}  # buckets 64x96 and 96x64


def write_shaped_images(folder, per_shape=3, seed=0):
    """The subject in portraits (head at the top) and landscapes (head at the left), a few pixels of jitter each."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2 * per_shape):
        shape = "portrait" if i < per_shape else "landscape"
        rng = np.random.default_rng([seed, i])
        head = draw(SUBJECT, 64, rng)
        canvas = Image.new("RGB", SHAPES[shape], head.getpixel((0, 0)))  # her background colour
        offset = int(rng.integers(0, 9))
        canvas.paste(head, (0, offset) if shape == "portrait" else (offset, 0))
        tmp = folder / f".{i}.png.tmp"
        canvas.save(tmp, format="PNG")
        os.replace(tmp, folder / f"{i}-{shape}.png")


def head_square(image):
    """The square of a generated picture where her head belongs, at the classifier's 64 x 64."""
    side = min(image.size)
    return image.crop((0, 0, side, side)).resize((64, 64), Image.Resampling.LANCZOS)


def subject_fidelity(pipe, reader, count, seed=20_000):
    """-> ({shape: fidelity}, {shape: images}) over `count` generations of "1girl, sks" at each output shape."""
    her, numbers, images = classifier.labels(SUBJECT), {}, {}
    for shape, (width, height) in OUTPUTS.items():
        generated = pipe(Settings(prompt="1girl, sks", width=width, height=height, steps=20, cfg=5.0,
                                  sampler="euler_a", seed=seed, num_images=count), progress=False)
        read = [classifier.labels(p) for p in classifier.predict(reader, [head_square(g) for g in generated])]
        numbers[shape] = round(float(np.mean([[r[h] == her[h] for h in IDENTITY] for r in read])), 3)
        images[shape] = generated
    return numbers, images


def sheet(rows, per_shape=6, scale=2):
    """One row per model: per_shape portraits then per_shape landscapes at their own shapes, scaled up (nearest)."""
    cell = max(max(size) for size in OUTPUTS.values()) * scale + 8
    canvas = Image.new("RGB", (cell * per_shape * len(OUTPUTS), cell * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(im for shape in OUTPUTS for im in row[shape][:per_shape]):
            big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            canvas.paste(big, (c * cell + (cell - big.width) // 2, r * cell + (cell - big.height) // 2))
    return canvas


def main(argv=None):
    folders = ["instance"] + [folder for folder, _ in RUNS.values()]
    args, overrides, out = arguments(argv, "train.demo_buckets", __doc__, folders, count=48)
    write_shaped_images(out / "instance")
    reader = classifier.load()
    results, rows = {}, []
    for run, (folder, fields) in RUNS.items():
        run_dir = out / folder
        code = dreambooth.main(["--config", str(CONFIG), f"--model={args.model}", f"--instance_data_dir={out / 'instance'}",
                                f"--output_dir={run_dir}", *[f"--{k}={v}" for k, v in (COMMON | fields).items()],
                                *overrides])  # (the command line's --field=value last: they win)
        if code:
            return code
        trained, trained_images = subject_fidelity(Pipeline.load(run_dir / "model.safetensors"), reader, args.count)
        averaged, _ = subject_fidelity(Pipeline.load(run_dir / "model-ema.safetensors"), reader, args.count)
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        held = [r["validation"] for r in log if "validation" in r]
        results[run] = {f"subject fidelity, {s}": v for s, v in trained.items()} | {
            f"EMA subject fidelity, {s}": v for s, v in averaged.items()} | {
            "validation loss, first": round(held[0], 4), "validation loss, last": round(held[-1], 4)}
        rows.append(trained_images)
        print(f"{run}: {results[run]}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    sheet(rows).save(out / "grid.png")
    print(f"wrote {out / 'results.json'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
