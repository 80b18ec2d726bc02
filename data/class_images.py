"""Class images for prior preservation, generated with the model about to be trained.

Image i is `class-NNNNN.png`, made from seed + i, and written under a temporary name then renamed: an
interrupted generation resumes where it stopped and never makes an image twice or leaves half an image
behind. Consecutive images are made class_batch_size at a time (the pipeline's image i of a batch uses
seed + i, so an image does not depend on the batch it was made in), and on a GPU under bf16 autocast.
"""

import os
from pathlib import Path

import torch
from tqdm import tqdm

from data.dreambooth import image_paths
from sampling.pipeline import Pipeline, Settings


def missing_class_images(folder, count):
    """Indices i < count whose class-NNNNN.png is not there yet (other images in the folder count too)."""
    folder = Path(folder)
    existing = image_paths(folder) if folder.is_dir() else []
    if len(existing) >= count:
        return []
    return [i for i in range(count) if not (folder / f"class-{i:05d}.png").exists()][: count - len(existing)]


def share(indices, rank, world):
    """Process `rank`'s contiguous share of the missing indices (contiguous, so that they batch)."""
    per = -(-len(indices) // world)  # ceil
    return indices[rank * per:(rank + 1) * per]


def batches(indices, size):
    """Runs of consecutive indices, at most `size` long: [3, 4, 5, 9] with size 2 -> [3, 4], [5], [9]."""
    runs = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1 and len(runs[-1]) < size:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def by_size(run, size_of):
    """A run of consecutive indices cut where the size changes: a batch is made at one size."""
    parts = []
    for i in run:
        if parts and size_of(parts[-1][-1]) == size_of(i):
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def generate_class_images(model, config, indices, rank=0, sizes=None):
    """Make class-NNNNN.png for these indices (this process's share of missing_class_images), each at the
    resolution, or at sizes[i] (width, height): with buckets, the instance images' buckets (data.buckets.class_sizes)."""
    if not indices:
        return
    folder = Path(config.class_data_dir)
    pipe = Pipeline(model)
    device = next(model.unet.parameters()).device
    # bf16 on a GPU: about twice as fast as float32, and SDXL's VAE does not overflow in bf16 (fp16 does)
    fast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with tqdm(total=len(indices), desc=f"class images (process {rank})", position=rank) as bar:
        size_of = (lambda i: sizes[i]) if sizes else (lambda i: config.size)
        runs = [part for run in batches(indices, config.class_batch_size) for part in by_size(run, size_of)]
        for run in runs:
            (width, height) = size_of(run[0])
            settings = Settings(prompt=config.class_prompt, width=width, height=height,
                                steps=config.class_steps, cfg=config.class_cfg, sampler=config.class_sampler,
                                seed=config.seed + run[0], num_images=len(run))
            with fast:
                images = pipe(settings, progress=False)
            for i, image in zip(run, images):
                tmp = folder / f".class-{i:05d}.png.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, folder / f"class-{i:05d}.png")
            bar.update(len(run))
