"""What plainxl produces, as sha256 digests: the bytes of generated PNGs (every sampler, two-stage, img2img,
inpainting, hi-res fix, LoRA, an intervention), of DreamBooth exports after two steps (full and LoRA, one
process and two) with their losses, and of the converter's outputs. tests/test_bit_identity.py runs this
in two trees (a commit before a restructuring and the code now) and requires equal digests: a
restructuring that changes no behaviour changes no byte.

    PYTHONPATH=TREE python tests/bit_identity.py INPUTS WORK OUT.json   # run with TREE as the working directory

INPUTS holds what the runs read (make_inputs writes it once, shared by both trees, so recorded paths are
equal); WORK is an empty folder for the outputs. Only command lines are used (their flags are contracts).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

QUICK = ["--width", "64", "--height", "64", "--steps", "6", "--seed", "11", "--num-images", "2", "--cfg", "4"]
GENERATIONS = {
    **{f"sampler {s}": ["--sampler", s] for s in ("euler", "euler_a", "dpmpp_2m", "ddim", "ddpm")},
    "karras": ["--sampler", "dpmpp_2m", "--karras"],
    "two-stage": ["--refiner", "plainxl-tiny-refiner", "--refiner-start", "0.7"],
    "img2img": ["--init-image", "{inputs}/init.png", "--strength", "0.6"],
    "inpaint": ["--init-image", "{inputs}/init.png", "--mask", "{inputs}/mask.png"],
    "hi-res": ["--hires-scale", "1.5", "--hires-steps", "3"],
    "lora": ["--lora", "{inputs}/lora.safetensors:0.8"],
    "freeu": ["--intervention", "freeu"],
    "split cfg, tiled vae": ["--cfg-mode", "split", "--vae-tiling", "8"],
}
TRAININGS = {  # name: (fields, processes)
    "full, prior, 1 process": (dict(prior_loss_weight=1.0, num_class_images=2, class_steps=2), 1),
    "full, 2 processes": (dict(prior_loss_weight=0.0), 2),
    "lora, 1 process": (dict(prior_loss_weight=0.0, lora_rank=4, lora_conv_rank=2), 1),
    "lora, 2 processes": (dict(prior_loss_weight=0.0, lora_rank=4, cache_latents=True, center_crop=True,
                               random_flip=False), 2),
}


def digest(path):
    """sha256 of a file's bytes; of a .safetensors file with several metadata entries (a LoRA's kohya fields),
    of its sorted metadata and its tensors' bytes: safetensors writes such entries in a random order."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix != ".safetensors":
        return hashlib.sha256(raw).hexdigest()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + raw[8 + n:]).hexdigest()


def make_inputs(folder):
    """An init image, a mask, four instance images and a kohya LoRA for the bundled tiny model."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from models.sdxl import SDXL, TINY

    folder = Path(folder)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "init.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "instance").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (72, 64, 3), dtype=np.uint8)).save(folder / "instance" / f"{i}.png")
    with torch.device("meta"):  # names and shapes only
        unet = SDXL(TINY).unet
    g, tensors = torch.Generator().manual_seed(0), {}
    for name in ("input_blocks.4.1.transformer_blocks.0.attn2.to_k", "middle_block.1.proj_in", "input_blocks.1.0.in_layers.2"):
        w = unet.get_submodule(name).weight
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, folder / "lora.safetensors")


def run(command, env):
    r = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{r.stderr[-3000:]}")


def main(inputs, work, out):
    inputs, work = Path(inputs), Path(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    digests = {}
    from sampling.generate import main as generate

    for name, flags in GENERATIONS.items():
        folder = work / "generate" / name.replace(" ", "_").replace(",", "")
        flags = [f.replace("{inputs}", str(inputs)) for f in flags]
        if generate(["--prompt", "1girl, red eyes", "--negative-prompt", "lowres", *QUICK, *flags, "--out", str(folder)]):
            raise RuntimeError(f"generation {name} failed")
        digests[f"generate: {name}"] = [digest(p) for p in sorted(folder.iterdir())]
    for name, (fields, processes) in TRAININGS.items():
        folder = work / "train" / name.replace(" ", "_").replace(",", "")
        fields = dict(model="plainxl-tiny", instance_data_dir=inputs / "instance", class_data_dir=folder / "class",
                      resolution=64, max_steps=2, batch_size=1, grad_accum=1 if processes == 2 else 2, lr=1e-4,
                      output_dir=folder / "run", checkpoint_every=2, export_dtype="fp32", seed=5, device="cpu",
                      **fields)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
            if processes == 2 else [sys.executable]
        run([*launcher, "-m", "train.dreambooth", *[f"--{k}={v}" for k, v in fields.items()]], env)
        exported = folder / "run" / ("lora.safetensors" if "lora_rank" in fields else "model.safetensors")
        losses = [json.loads(line)["loss"] for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
        digests[f"train: {name}"] = [digest(exported), losses]
    converted = work / "convert"
    converted.mkdir(parents=True)
    run([sys.executable, "-m", "models.convert", "plainxl-tiny", str(converted / "folder")], env)
    run([sys.executable, "-m", "models.convert", str(converted / "folder"), str(converted / "again.safetensors")], env)
    digests["convert: folder"] = {str(p.relative_to(converted)): digest(p)
                                  for p in sorted((converted / "folder").rglob("*")) if p.is_file()}
    digests["convert: back to one file"] = digest(converted / "again.safetensors")
    Path(out).write_text(json.dumps(digests, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
