"""The GPU benchmark, plainxl and diffusers side by side in one run on one GPU, within a time budget:

    python tests/benchmarks/gpu.py [--budget-s 420] [--json FILE] [--compile] [--dry-run]

    text to image   1024², 28 Euler steps, CFG 5, batch 1, eager fp16 and bf16 (SDPA) [and torch.compile'd with CUDA
                    graphs, --compile]: it/s of the denoising loop (text encoding included) and seconds per image
    VAE decode      one 1024² image (float32 VAE, as both pipelines keep SDXL's)
    base + refiner  the handoff at 0.8, 28 steps
    training        one step of the DreamBooth loop at 1024², bf16: LoRA rank 32, and the full UNet with Adafactor,
                    fused backward and bf16 master weights (gradient checkpointing on both)

Every workload reports the device's peak memory. The models are SDXL's base and refiner architectures with random
weights (written once as fp16 files: a GPU machine may have no hub access), the same file for both libraries. A
workload that would start past the budget is skipped and says so. --dry-run runs every code path on the CPU with the
bundled tiny models at 64² (compile with the eager backend) in about a minute: CI runs it, so the script works
when a GPU appears. Benchmarks are measurements, never asserts.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))

from models.diffusers_layout import save_diffusers  # noqa: E402
from models.loading import load  # noqa: E402
from sampling.pipeline import Pipeline, Settings  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, the device's peak GiB or None on the CPU, fn's result), after one warm-up call."""
    fn()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return seconds, peak, result


def write_models(folder, dry):
    """(base file, refiner file, base folder, refiner folder): the bundled tiny models, or random SDXL ones."""
    if dry:
        base, refiner = ROOT / "models" / "plainxl-tiny.safetensors", ROOT / "models" / "plainxl-tiny-refiner.safetensors"
    else:
        base, refiner = folder / "base.safetensors", folder / "refiner.safetensors"
        for preset, out, extra in [("base", base, []), ("refiner", refiner, ["--components-from", str(base)])]:
            subprocess.run([sys.executable, "-m", "models.init", preset, str(out), "--dtype", "fp16", *extra], check=True,
                           cwd=ROOT)
    for file, name in [(base, "base"), (refiner, "refiner")]:
        save_diffusers(load(file), folder / name)
    return base, refiner, folder / "base", folder / "refiner"


def generation(files, dtype, device, side, steps, compile_mode):
    """The text-to-image, decode and handoff rows for one dtype: {workload: {side: (seconds, peak)}}."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base_file, refiner_file, base_dir, refiner_dir = files
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    s = Settings(prompt="1girl, solo, smile", negative_prompt="lowres", width=side, height=side, steps=steps, cfg=5.0,
                 sampler="euler", seed=1)
    ours = Pipeline.load(base_file, dtype=dtype, device=device)
    theirs = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=torch_dtype, add_watermarker=False).to(device)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    if compile_mode:
        ours.model.unet.compile(**compile_mode)
        theirs.unet.compile(**compile_mode)
    call = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, width=side, height=side, num_inference_steps=steps,
                guidance_scale=s.cfg)
    gen = lambda: torch.Generator().manual_seed(1)
    rows = {"text to image": {
        "plainxl": timed(lambda: ours(s, progress=False)),
        "diffusers": timed(lambda: theirs(**call, generator=gen()).images),
    }, "denoising loop": {
        "plainxl": timed(lambda: ours.latents(s, progress=False)),
        "diffusers": timed(lambda: theirs(**call, generator=gen(), output_type="latent").images),
    }}
    if not compile_mode:
        refiner = Pipeline.load(refiner_file, dtype=dtype, device=device)
        their_refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, torch_dtype=torch_dtype,
                                                                        add_watermarker=False).to(device)
        their_refiner.scheduler = EulerDiscreteScheduler.from_config(their_refiner.scheduler.config)
        their_refiner.set_progress_bar_config(disable=True)

        def handoff():
            g = gen()
            latents = theirs(**call, generator=g, denoising_end=0.8, output_type="latent").images
            return their_refiner(prompt=s.prompt, negative_prompt=s.negative_prompt, image=latents, generator=g,
                                 num_inference_steps=steps, guidance_scale=s.cfg, denoising_start=0.8).images

        rows["base + refiner"] = {"plainxl": timed(lambda: ours(s, refiner=refiner, progress=False)),
                                  "diffusers": timed(handoff)}
    latents = rows["denoising loop"]["plainxl"][2]
    vae = theirs.vae.float()  # SDXL's VAE decodes in float32 in both (diffusers' force_upcast; ours keeps it float32)
    rows["VAE decode"] = {
        "plainxl": timed(lambda: ours.decode(latents)),
        "diffusers": timed(lambda: vae.decode(latents.float() / vae.config.scaling_factor)),
    }
    for side_rows in rows.values():
        for name in side_rows:
            side_rows[name] = side_rows[name][:2]
    return rows


def training(files, folder, device, side, dry):
    """One DreamBooth step (the median of steps 2..3) and its peak, LoRA and full: {workload: (seconds, peak)}."""
    images = folder / "instance"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = dict(model=files[0], instance_data_dir=images, prior_loss_weight=0, resolution=side, batch_size=1,
                  max_steps=3, mixed_precision="bf16", gradient_checkpointing=True, device=device, checkpoint_every=3)
    runs = {"training step, LoRA rank 32": dict(lora_rank=32, base_dtype="bf16", lr=1e-4),
            "training step, full UNet (Adafactor, fused backward, bf16 master)":
                dict(optimizer="adafactor", fused_backward=True, master_dtype="bf16", lr=1e-3)}
    rows = {}
    for name, fields in runs.items():
        out = folder / name.split(",")[1].strip().split(" ")[0].lower()
        args = [f"--{k}={v}" for k, v in (common | fields | {"output_dir": out}).items()]
        subprocess.run([sys.executable, "-m", "train.dreambooth", *args], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if dry else None)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        rows[name] = (float(np.median([r["seconds"] for r in log[1:]])), max((r.get("peak_gib") or 0) for r in log) or None)
    return rows


def table(results, steps):
    """Markdown: seconds, their ratio (below 1: plainxl is faster), the denoising loop's it/s, peak memory."""
    lines = ["| workload | plainxl s | diffusers s | time ratio | plainxl it/s | diffusers it/s | plainxl peak GiB | "
             "diffusers peak GiB |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"
    for name, row in results.items():
        if isinstance(row, str):
            lines.append(f"| {name} | {row} | | | | | | |")
            continue
        ours, theirs = row.get("plainxl", (None, None)), row.get("diffusers", (None, None))
        ratio = f"**{ours[0] / theirs[0]:.2f}**" if theirs[0] else "–"
        rate = [f"{steps / v[0]:.2f}" if name.startswith("denoising loop") and v[0] else "–" for v in (ours, theirs)]
        lines.append(f"| {name} | {fmt(ours[0])} | {fmt(theirs[0])} | {ratio} | {rate[0]} | {rate[1]} | {fmt(ours[1])} | "
                     f"{fmt(theirs[1])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python tests/benchmarks/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--compile", action="store_true", help="also the compiled UNets (CUDA graphs)")
    p.add_argument("--dry-run", action="store_true", help="every code path on the CPU with the tiny models")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    device, side, steps = ("cpu", 64, 4) if dry else ("cuda", 1024, 28)
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_models(Path(tmp), dry)
        plans = [(f"eager {d}", lambda d=d: generation(files, d, device, side, steps, None))
                 for d in (["bf16"] if dry else ["fp16", "bf16"])]
        if args.compile or dry:
            mode = {"backend": "eager"} if dry else {"mode": "reduce-overhead"}
            plans.append(("compiled bf16", lambda: generation(files, "bf16", device, side, steps, mode)))
        plans.append(("", lambda: training(files, Path(tmp), device, side, dry)))
        for label, plan in plans:
            if time.perf_counter() - start > args.budget_s:
                results[label or "training"] = f"skipped: past the {args.budget_s:g} s budget"
                continue
            for name, row in plan().items():
                results[f"{name}, {label}" if label else name] = row if isinstance(row, dict) else {"plainxl": row}
    print(f"device: {torch.cuda.get_device_name() if not dry else 'cpu (dry run)'}, torch {torch.__version__}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print(table(results, steps))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
