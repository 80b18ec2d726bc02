"""Writes tests/kohya_buckets.json: kohya sd-scripts' own bucket assignment for a grid of image sizes and flags,
the reference tests/test_buckets.py holds data/buckets.py to. Run it by hand with a checkout of kohya-ss/sd-scripts
(it executes that checkout's BucketManager, make_bucket_resolutions and adjust_min_max_bucket_reso_by_steps, taken
out of their files with ast, since importing library.train_util needs accelerate, cv2 and a GPU stack):

    python tests/oracles/kohya_buckets.py PATH/TO/sd-scripts [--commit SHA]

Nothing here is imported by the test suite; the JSON it writes is.
"""

import argparse
import ast
import json
import logging
import math
import subprocess
from pathlib import Path

import numpy as np

SIZES = [(w, h) for w in (64, 200, 256, 300, 512, 640, 777, 800, 1000, 1024, 1080, 1200, 1536, 1920, 2048, 4000)
         for h in (64, 256, 333, 512, 600, 768, 1000, 1024, 1350, 1920, 2500, 3000)] + [(1, 1), (5000, 100), (100, 5000)]
FLAGS = [  # resolution (w, h), min, max, steps, no_upscale
    ((1024, 1024), 256, 1024, 64, False), ((1024, 1024), 256, 1024, 64, True), ((1024, 1024), 320, 2048, 64, False),
    ((768, 1024), 256, 1024, 32, False), ((896, 1152), 300, 1500, 64, False), ((1024, 1024), 512, 1536, 32, True),
    ((512, 512), 256, 1024, 64, False), ((1024, 768), 250, 1030, 64, True),
]


def extract(source, names):
    """The top-level functions/classes `names` of a module's source, as one module of code."""
    tree = ast.parse(source)
    return "\n\n".join(ast.get_source_segment(source, node) for node in tree.body
                       if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names)


def method(source, cls, name):
    """One method of a class, as a plain function (its `self` taken as the first argument)."""
    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return ast.get_source_segment(source, next(m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == name))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kohya")
    p.add_argument("--out", default=str(Path(__file__).parents[1] / "kohya_buckets.json"))
    args = p.parse_args()
    root = Path(args.kohya)
    train_util, model_util = ((root / "library" / f).read_text() for f in ("train_util.py", "model_util.py"))
    namespace = {"np": np, "math": math, "logger": logging.getLogger("kohya"), "Tuple": tuple}
    exec(extract(model_util, {"make_bucket_resolutions"}), namespace)
    namespace["model_util"] = type("model_util", (), {"make_bucket_resolutions": namespace["make_bucket_resolutions"]})
    exec(extract(train_util, {"BucketManager"}), namespace)
    exec(__import__("textwrap").dedent(method(train_util, "BaseDataset", "adjust_min_max_bucket_reso_by_steps")), namespace)
    cases = []
    for resolution, low, high, steps, no_upscale in FLAGS:
        low_r, high_r = namespace["adjust_min_max_bucket_reso_by_steps"](None, resolution, low, high, steps)
        manager = namespace["BucketManager"](no_upscale, resolution, low_r, high_r, steps)
        if not no_upscale:
            manager.make_buckets()
        images = []
        for w, h in SIZES:
            try:
                bucket, resized, _ = manager.select_bucket(w, h)
            except (ZeroDivisionError, AssertionError) as e:
                images.append({"size": [w, h], "error": type(e).__name__})
                continue
            ltrb = namespace["BucketManager"].get_crop_ltrb(bucket, (w, h))
            images.append({"size": [w, h], "bucket": list(bucket), "resized": [int(v) for v in resized],
                           "kohya_crop_ltrb": [float(v) for v in ltrb]})
        cases.append({"resolution": list(resolution), "min_bucket_reso": low, "max_bucket_reso": high,
                      "bucket_reso_steps": steps, "bucket_no_upscale": no_upscale,
                      "rounded": [low_r, high_r],
                      "buckets": [list(r) for r in manager.predefined_resos] if not no_upscale else None,
                      "images": images})
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"kohya_commit": commit or "unknown", "cases": cases}, indent=None) + "\n")
    print(f"wrote {args.out}: {len(cases)} flag sets x {len(SIZES)} sizes")


if __name__ == "__main__":
    main()
