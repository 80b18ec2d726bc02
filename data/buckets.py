"""Aspect-ratio buckets: each training image is resized and centre-cropped to a bucket of about the resolution's
area with an aspect ratio near its own, as SDXL was trained and as kohya sd-scripts' BucketManager assigns them
(library/train_util.py and model_util.make_bucket_resolutions; tests/test_buckets.py holds every image of a grid
of sizes and flags to what kohya's own code gives, tests/kohya_buckets.json).

    BucketFlags         kohya's flags: resolution (w, h), min/max_bucket_reso, bucket_reso_steps, bucket_no_upscale
    rounded_limits      min and max rounded to the steps, as kohya does, with its warnings
    bucket_resolutions  the predefined buckets: steps-multiples of about the resolution's area
    place               one image -> its bucket, resized size and crop window (a Placement)
    cover               without buckets: the image scaled to cover the resolution, which is its crop
    epoch_batches, batch_at
                        the batches of a run, each of one bucket, a pure function of (seed, position)
    class_sizes         the sizes class images are made at: the instance images' buckets, in proportion

    python -m data.buckets FOLDER [--resolution R | --resolution W,H] [--bucket_reso_steps S]
        [--min_bucket_reso A] [--max_bucket_reso B] [--bucket_no_upscale] [--json FILE]

prints one JSON object per image, {"image", "bucket": [w, h], "resized": [w, h], "crop": [left, top]}.
"""

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.dreambooth import IMAGE_SUFFIXES, DataError
from models.files import atomic_file


@dataclass(frozen=True)
class BucketFlags:
    resolution: tuple = (1024, 1024)  # (width, height): the buckets' area is about width * height
    min_bucket_reso: int = 256  # no bucket side below (rounded down to the steps); not with bucket_no_upscale
    max_bucket_reso: int = 1024  # no bucket side above (rounded up to the steps)
    bucket_reso_steps: int = 64  # every bucket side is a multiple of this
    bucket_no_upscale: bool = False  # images are only shrunk: each gets its own bucket, its size cut to the steps


@dataclass(frozen=True)
class Placement:
    bucket: tuple  # (width, height) of the training crop
    resized: tuple  # (width, height) the image is resized to first; it covers the bucket
    crop: tuple  # (left, top) of the centred crop in the resized image


def rounded_limits(flags, warn=True):
    """(min, max) bucket sides rounded down / up to multiples of the steps, with kohya's warning for each
    (BaseDataset.adjust_min_max_bucket_reso_by_steps); ValueError if the resolution falls outside them."""
    steps, low, high = flags.bucket_reso_steps, flags.min_bucket_reso, flags.max_bucket_reso
    if low % steps and warn:
        print(f"warning: min_bucket_reso {low} is not a multiple of bucket_reso_steps {steps}; using "
              f"{low - low % steps}", file=sys.stderr)
    if high % steps and warn:
        print(f"warning: max_bucket_reso {high} is not a multiple of bucket_reso_steps {steps}; using "
              f"{high + steps - high % steps}", file=sys.stderr)
    low, high = low - low % steps, high + (steps - high % steps) % steps
    if not low <= min(flags.resolution) <= max(flags.resolution) <= high:
        raise ValueError(f"resolution {flags.resolution[0]}x{flags.resolution[1]} must lie within min_bucket_reso {low} "
                         f"and max_bucket_reso {high}; change one of them")
    return low, high


def bucket_resolutions(flags):
    """The predefined buckets, sorted: the square of the resolution's area, and for each width w from min to max
    in steps the height h = the area / w cut to the steps (at most max), both ways round, where h >= min."""
    steps, (low, high) = flags.bucket_reso_steps, rounded_limits(flags, warn=False)
    area = flags.resolution[0] * flags.resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    for width in range(low, high + 1, steps):
        height = min(high, int(area // width // steps) * steps)
        if height >= low:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def round_to_steps(x, steps):
    """kohya's: round half up, then down to a multiple of the steps."""
    x = int(x + 0.5)
    return x - x % steps


def place(width, height, flags, buckets=None):
    """An image of (width, height) -> its Placement, as kohya's BucketManager.select_bucket: the predefined
    bucket of nearest aspect ratio (the first of a tie; the image's own size if it is one), the image scaled to
    cover it (round half up); with bucket_no_upscale, the image shrunk to the resolution's area if larger, its
    bucket its size cut to the steps. The crop is centred (the extra pixel of an odd margin on the right/bottom)."""
    steps, ratio = flags.bucket_reso_steps, width / height
    if not flags.bucket_no_upscale:
        buckets = buckets or bucket_resolutions(flags)
        bucket = (width, height)
        if bucket not in buckets:
            errors = np.abs(np.array([w / h for w, h in buckets]) - ratio)  # float64, as kohya's numpy array
            bucket = buckets[int(errors.argmin())]
        scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        area = flags.resolution[0] * flags.resolution[1]
        resized = (width, height)
        if width * height > area:  # shrink to the area, then cut the side whose rounding keeps the ratio best
            fit_width = math.sqrt(area * ratio)
            fit_height = area / fit_width
            by_width = round_to_steps(fit_width, steps)
            by_height = round_to_steps(fit_height, steps)
            width_error = abs(by_width / round_to_steps(by_width / ratio, steps) - ratio)
            height_error = abs(round_to_steps(by_height * ratio, steps) / by_height - ratio)
            resized = ((by_width, int(by_width / ratio + 0.5)) if width_error < height_error
                       else (int(by_height * ratio + 0.5), by_height))
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    crop = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    return Placement(bucket, resized, crop)


def cover(size, target):
    """Without buckets: (width, height) scaled to cover target (w, h), the short side's rounding never below it."""
    scale = max(target[0] / size[0], target[1] / size[1])
    resized = (max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale)))
    return Placement(tuple(target), resized, ((resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2))


def check_placeable(path, size, flags):
    """With bucket_no_upscale, an image with a side under min_bucket_reso would train at a bucket smaller than
    the flags allow (or none: kohya divides by zero): one DataError naming it."""
    low = flags.min_bucket_reso - flags.min_bucket_reso % flags.bucket_reso_steps
    if flags.bucket_no_upscale and min(size) < low:
        raise DataError(f"{path} is {size[0]}x{size[1]}, smaller than min_bucket_reso {low}, and bucket_no_upscale "
                        "keeps it that size; remove it, upscale it, or drop bucket_no_upscale")


@functools.lru_cache(maxsize=8)
def epoch_batches(buckets_of, group, seed, epoch):
    """One epoch of batches for images whose buckets are `buckets_of` (a tuple, one bucket per image): each
    bucket's images in a seeded random order, cut into groups of `group` (the last filled up from the start of
    that order, so every batch is full), and the batches of all buckets in a seeded random order.
    -> [(bucket, [image index] * group)]."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 11]).generate_state(1)[0]))
    batches = []
    for bucket in sorted(set(buckets_of)):
        members = [i for i, b in enumerate(buckets_of) if b == bucket]
        order = [members[k] for k in torch.randperm(len(members), generator=g).tolist()]
        for start in range(0, len(order), group):
            batches.append((bucket, [order[(start + k) % len(order)] for k in range(group)]))
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def batch_at(buckets_of, group, seed, position):
    """The position-th batch of the run: epochs of epoch_batches one after another (each the same length).
    -> (bucket, [image index] * group)"""
    counts = {}
    for bucket in buckets_of:
        counts[bucket] = counts.get(bucket, 0) + 1
    per_epoch = sum(-(-n // group) for n in counts.values())
    epoch, k = divmod(position, per_epoch)
    return epoch_batches(tuple(buckets_of), group, seed, epoch)[k]


def class_sizes(buckets_of, count):
    """The (width, height) of each of `count` class images: the instance images' buckets in proportion to how
    many instance images each holds (rounded down, at least one each, what is left to the fullest buckets first),
    in runs of one size."""
    counts = {}
    for bucket in buckets_of:
        counts[bucket] = counts.get(bucket, 0) + 1
    if count < len(counts):
        raise ValueError(f"num_class_images {count} is fewer than the {len(counts)} buckets the instance images "
                         f"fill; give at least {len(counts)}, so that every bucket has class images")
    order = sorted(counts, key=lambda b: (-counts[b], b))
    shares = {b: max(1, count * counts[b] // len(buckets_of)) for b in order}
    for b in order * count:  # hand out what rounding left, the fullest buckets first (or take back the excess)
        total = sum(shares.values())
        if total == count:
            break
        if total < count:
            shares[b] += 1
        elif shares[b] > 1:
            shares[b] -= 1
    return [b for b in order for _ in range(shares[b])]


BUCKET_FIELDS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")


def bucket_problem(config, moved):
    """What is wrong with a training config's bucket fields (`moved`: those it sets), in one sentence, or None."""
    if moved and not config.enable_bucket:
        return f"{moved[0]} applies with enable_bucket=True; set it, or leave {moved[0]} out"
    if not config.enable_bucket:
        return None
    if config.bucket_reso_steps % 8:
        return (f"bucket_reso_steps must be a multiple of 8, SDXL's pixels per latent (got {config.bucket_reso_steps}; "
                "kohya's default is 64)")
    if config.task == "vae":
        return "the vae task trains on square crops of resolution; leave enable_bucket out"
    try:
        rounded_limits(config.bucket_flags(), warn=False)
    except ValueError as e:
        return str(e)
    return None


def image_files(folder):
    """The images under a folder (recursively, sorted), by suffix."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.buckets", description="Which aspect-ratio bucket each image "
                                "of a folder trains in, as kohya sd-scripts assigns them.")
    p.add_argument("folder")
    p.add_argument("--resolution", default="1024", help="R, or W,H (default 1024)")
    p.add_argument("--bucket_reso_steps", type=int, default=64)
    p.add_argument("--min_bucket_reso", type=int, default=256)
    p.add_argument("--max_bucket_reso", type=int, default=1024)
    p.add_argument("--bucket_no_upscale", action="store_true")
    p.add_argument("--json", help="write the JSON lines to this file instead of stdout")
    args = p.parse_args(argv)
    try:
        sides = [int(v) for v in args.resolution.split(",")]
        if len(sides) not in (1, 2) or min(sides) < 1 or args.bucket_reso_steps < 1:
            raise ValueError
    except ValueError:
        print(f"error: --resolution {args.resolution!r} / --bucket_reso_steps {args.bucket_reso_steps}: give R or W,H "
              "(positive whole numbers) and a positive step, e.g. --resolution 1024 or 1024,768", file=sys.stderr)
        return 2
    flags = BucketFlags((sides[0], sides[-1]), args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
                        args.bucket_no_upscale)
    folder = Path(args.folder)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder; give the folder of training images", file=sys.stderr)
        return 2
    if args.json and Path(args.json).exists():
        print(f"error: {args.json} already exists; choose another --json file", file=sys.stderr)
        return 2
    try:
        rounded_limits(flags)
        buckets = None if flags.bucket_no_upscale else bucket_resolutions(flags)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines, counts, bad = [], {}, 0
    for path in image_files(folder):
        try:
            with Image.open(path) as image:  # the header's size, as kohya's imagesize.get (no EXIF rotation)
                size = image.size
            check_placeable(path, size, flags)
        except (OSError, SyntaxError, ValueError) as e:  # (DataError is a ValueError)
            print(f"{path}: {e}" if not isinstance(e, DataError) else str(e), file=sys.stderr)
            bad += 1
            continue
        placement = place(*size, flags, buckets)
        lines.append(json.dumps({"image": path.relative_to(folder).as_posix(), "bucket": list(placement.bucket),
                                 "resized": list(placement.resized), "crop": list(placement.crop)}))
        counts[placement.bucket] = counts.get(placement.bucket, 0) + 1
    if args.json:
        with atomic_file(Path(args.json)) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))
    if args.json or sys.stdout.isatty():  # stdout holds only the JSON when it is piped
        print(f"{len(lines)} images in {len(counts)} buckets" + (f" ({bad} could not be placed)" if bad else ""))
        for (w, h), n in sorted(counts.items(), key=lambda item: -item[1]):
            print(f"  {w:>5} x {h:<5} {n:>6}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
