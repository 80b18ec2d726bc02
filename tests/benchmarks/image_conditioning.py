"""Wall time of our image-conditioned pipelines against diffusers' on the same random tiny models, in the
same run (float32, CPU): img2img, inpainting and base + refiner, and the pixel difference of each.

    python tests/benchmarks/image_conditioning.py [--steps 20] [--repeats 3]

Uses the models of tests/test_image_conditioning.py (a 64x64 picture, batch 2 for img2img and the
refiner; inpainting batch 1, diffusers' first-generator quirk aside). Prints ours / diffusers per case.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_image_conditioning import disc_mask, picture, reference, with_scheduler  # noqa: E402
from test_pipeline_parity import tiny_model  # noqa: E402

from models.diffusers_layout import save_diffusers  # noqa: E402
from models.sdxl import SDXL, TINY_REFINER  # noqa: E402
from sampling.pipeline import Pipeline, Settings  # noqa: E402


def best_of(repeats, run):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    root = Path(tempfile.mkdtemp())
    base = tiny_model()
    torch.manual_seed(1)
    refiner = SDXL(TINY_REFINER).eval()
    refiner.vae.load_state_dict(base.vae.state_dict())
    save_diffusers(base, root / "base")
    save_diffusers(refiner, root / "refiner")
    ours, ours_refiner = Pipeline.load(root / "base"), Pipeline.load(root / "refiner")
    theirs = {"base": reference(StableDiffusionXLPipeline, root / "base"),
              "img2img": reference(StableDiffusionXLImg2ImgPipeline, root / "base"),
              "inpaint": reference(StableDiffusionXLInpaintPipeline, root / "base"),
              "refiner": reference(StableDiffusionXLImg2ImgPipeline, root / "refiner")}
    init, mask = picture(64, 64), disc_mask(64, 64)
    common = dict(prompt="1girl, red eyes", negative_prompt="lowres", steps=args.steps, cfg=5.0, sampler="euler_a")
    gens = lambda n: [torch.Generator().manual_seed(3 + i) for i in range(n)]
    call = lambda s: dict(prompt=s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps,
                          guidance_scale=s.cfg, num_images_per_prompt=s.num_images, generator=gens(s.num_images))

    def two_stage(s):
        c = call(s)
        latents = with_scheduler(theirs["base"], s)(**c, width=64, height=64, denoising_end=0.8, output_type="latent").images
        return with_scheduler(theirs["refiner"], s)(**c, image=latents, denoising_start=0.8).images

    cases = {
        "img2img 0.6, batch 2": (Settings(**common, seed=3, num_images=2, init_image=init, strength=0.6), None,
                                 lambda s: with_scheduler(theirs["img2img"], s)(**call(s), image=init, strength=0.6).images),
        "inpainting 0.75": (Settings(**common, seed=3, init_image=init, mask=mask, strength=0.75), None,
                            lambda s: with_scheduler(theirs["inpaint"], s)(**call(s), image=init, mask_image=mask,
                                                                            strength=0.75, width=64, height=64).images),
        "base + refiner at 0.8, batch 2": (Settings(**common, seed=3, num_images=2, width=64, height=64), ours_refiner,
                                           two_stage),
    }
    print(f"{'case':>32} | ours s | diffusers s | ours / diffusers | mean / max |diff| (of 255)")
    for name, (s, second, theirs_run) in cases.items():
        t_ours, got = best_of(args.repeats, lambda: ours(s, refiner=second, progress=False))
        t_theirs, want = best_of(args.repeats, lambda: theirs_run(s))
        diff = np.abs(np.stack([np.asarray(a, dtype=np.int16) for a in got]) - np.stack([np.asarray(b, dtype=np.int16) for b in want]))
        print(f"{name:>32} | {t_ours:6.2f} | {t_theirs:11.2f} | {t_ours / t_theirs:16.2f} | {diff.mean():.4f} / {diff.max()}")


if __name__ == "__main__":
    main()
