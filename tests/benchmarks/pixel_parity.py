"""Mean / max pixel difference (of 255) against diffusers' StableDiffusionXLPipeline, per sampler,
and the wall time of both pipelines on the same machine, in the same run.

    python tests/benchmarks/pixel_parity.py [--steps 20] [--size 64]

Uses the random tiny model of the parity tests (tests/test_pipeline_parity.py), batch 2, CFG 5,
a negative prompt; float32 on the CPU.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_pipeline_parity import SCHEDULERS, diffusers_images, tiny_model  # noqa: E402

from models.diffusers_layout import save_diffusers  # noqa: E402
from models.loading import save_single_file  # noqa: E402
from sampling.pipeline import Pipeline, Settings  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    from diffusers import StableDiffusionXLPipeline

    root = Path(tempfile.mkdtemp())
    model = tiny_model()
    save_single_file(model, root / "tiny.safetensors")
    save_diffusers(model, root / "tiny")
    ours = Pipeline.load(root / "tiny.safetensors")
    theirs = StableDiffusionXLPipeline.from_pretrained(root / "tiny", add_watermarker=False)
    theirs.scheduler_config_as_saved = dict(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    warmup = Settings(prompt="x", width=args.size, height=args.size, steps=2, sampler="euler")
    ours(warmup, progress=False), diffusers_images(theirs, warmup)  # first calls pay one-time costs
    print(f"{'sampler':>16} | mean |diff| | max |diff| | plainxl s | diffusers s")
    for sampler in SCHEDULERS:
        for karras in ([False, True] if sampler in ("euler", "dpmpp_2m") else [False]):
            s = Settings(prompt="1girl, solo, blue hair, red eyes", negative_prompt="lowres", width=args.size,
                         height=args.size, steps=args.steps, sampler=sampler, karras=karras, seed=0, num_images=2)
            t0 = time.perf_counter()
            a = np.stack([np.asarray(im) for im in ours(s, progress=False)]).astype(np.int16)
            t1 = time.perf_counter()
            b = np.stack(diffusers_images(theirs, s)).astype(np.int16)
            t2 = time.perf_counter()
            d = np.abs(a - b)
            name = sampler + (" karras" if karras else "")
            print(f"{name:>16} | {d.mean():11.5f} | {d.max():10d} | {t1 - t0:9.2f} | {t2 - t1:11.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
