"""Class images for prior preservation, generated with the model about to be trained.

Image i is `class-NNNNN.png`, made from seed + i by process i % world_size, and written under a
temporary name then renamed: an interrupted generation resumes where it stopped and never makes
an image twice or leaves half an image behind.
"""

import os
from pathlib import Path

from tqdm import tqdm

from data.dreambooth import IMAGE_SUFFIXES
from sampling.pipeline import Pipeline, Settings


def missing_class_images(folder, count):
    """Indices i < count whose class-NNNNN.png is not there yet (other images in the folder count too)."""
    folder = Path(folder)
    existing = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES] if folder.is_dir() else []
    if len(existing) >= count:
        return []
    return [i for i in range(count) if not (folder / f"class-{i:05d}.png").exists()][: count - len(existing)]


def generate_class_images(model, config, indices, rank=0):
    """Make class-NNNNN.png for these indices (this process's share of missing_class_images)."""
    if not indices:
        return
    folder = Path(config.class_data_dir)
    pipe = Pipeline(model)
    for i in tqdm(indices, desc=f"class images (process {rank})", position=rank):
        settings = Settings(prompt=config.class_prompt, width=config.resolution, height=config.resolution,
                            steps=config.class_steps, cfg=config.class_cfg, sampler=config.class_sampler,
                            seed=config.seed + i)
        image = pipe(settings, progress=False)[0]
        tmp = folder / f".class-{i:05d}.png.tmp"
        image.save(tmp, format="PNG")
        os.replace(tmp, folder / f"class-{i:05d}.png")
