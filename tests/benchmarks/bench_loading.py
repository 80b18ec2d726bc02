"""Peak memory and wall time of loading a full-size SDXL single file: plainxl vs diffusers.

    python tests/benchmarks/bench_loading.py [--dir /tmp/bench]

Writes a random fp16 file in the official layout (2515 tensors, about 6.9 GB, from the manifest in
tests/sdxl-keys), then loads it in fresh processes with plainxl's `load` and with diffusers'
`StableDiffusionXLPipeline.from_single_file` (configs from a local folder, since the hub is not
reachable), and prints the wall time of the load and the peak resident memory (VmHWM) after every
weight has been read once (safetensors maps the file, so untouched weights are not yet resident). Not part of the
test run: timings are measurements, not assertions.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Peak resident memory of this process image. Not ru_maxrss: that survives fork+exec, so a child
# would report its parent's peak.
PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024"

OURS = """
import time, torch
from models.loading import load
t = time.perf_counter(); model = load({path!r}, dtype={dtype!r}); t = time.perf_counter() - t
touch = sum(float(p.float().sum()) for p in model.parameters())  # every weight read once
print(t, {peak}, sum(p.numel() for p in model.parameters()))
"""

DIFFUSERS = """
import time, torch
from diffusers import StableDiffusionXLPipeline
dtype = {{"fp16": torch.float16, "fp32": torch.float32}}[{dtype!r}]
t = time.perf_counter()
pipe = StableDiffusionXLPipeline.from_single_file({path!r}, config={config!r}, local_files_only=True, torch_dtype=dtype)
t = time.perf_counter() - t
params = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]
touch = sum(float(p.float().sum()) for p in params)  # every weight read once
n = sum(p.numel() for p in params)
print(t, {peak}, n)
"""

BASELINE = """
import torch, diffusers, models.loading
print(0, {peak}, 0)
"""


def write_random_checkpoint(path):
    import torch
    from safetensors.torch import save_file

    shapes = json.loads((ROOT / "tests" / "sdxl-keys" / "sd_xl_base_single_file.json").read_text())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            tensors[name] = torch.arange(shape[-1]).reshape(shape)  # int64, as in the official file
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).half()
    save_file(tensors, path)


def write_config_folder(folder):
    """The configs (no weights) diffusers needs to interpret the single file offline."""
    from models.diffusers_layout import model_index, text_config_to_hf, unet_config_to_diffusers, vae_config_to_diffusers
    from models.sdxl import BASE, SDXL_SCHEDULER_CONFIG
    from models.tokenizer import load_tokenizers, save_tokenizers

    import torch

    configs = {
        "unet": unet_config_to_diffusers(BASE.unet), "vae": vae_config_to_diffusers(BASE.vae),
        "text_encoder": text_config_to_hf(BASE.text_encoder_1, torch.float16),
        "text_encoder_2": text_config_to_hf(BASE.text_encoder_2, torch.float16),
    }
    for name, config in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(json.dumps(model_index(BASE)))
    save_tokenizers(*load_tokenizers(), folder)


def run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    seconds, rss, params = out.stdout.split()[-3:]
    return float(seconds), int(rss) / 2**30, int(params)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/plainxl-bench")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--write", help=argparse.SUPPRESS)  # internal: write the random file and exit
    args = parser.parse_args()
    if args.write:
        return write_random_checkpoint(args.write)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path, config = folder / "sdxl_base_random_fp16.safetensors", folder / "config"
    if not path.exists():  # in a child, so this process stays small
        subprocess.run([sys.executable, __file__, "--write", str(path)], check=True, cwd=ROOT)
    write_config_folder(config)
    print(f"file: {path.stat().st_size / 1e9:.2f} GB; loading at {args.dtype}")
    _, base_rss, _ = run(BASELINE.format(peak=PEAK))
    print(f"{'imports only':>10}: peak RSS {base_rss:.2f} GiB")
    for name, code in [("plainxl", OURS), ("diffusers", DIFFUSERS)]:
        seconds, rss, params = run(code.format(path=str(path), dtype=args.dtype, config=str(config), peak=PEAK))
        print(f"{name:>10}: {seconds:6.1f} s, peak RSS {rss:.2f} GiB, {params:,} parameters")


if __name__ == "__main__":
    main()
