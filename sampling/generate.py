"""Command line text-to-image.

    python -m sampling.generate --model M --prompt P [--negative-prompt N] --width W --height H --steps S
        --cfg G --sampler {euler,euler_a,dpmpp_2m,ddim,ddpm} [--karras] [--guidance-rescale R] --seed SEED
        --num-images B --dtype {fp32,fp16,bf16} --device D [--vae VAE] --out DIR
    python -m sampling.generate --from-png outputs/00003-42.png      # re-run a generation

Image i of a batch uses seed SEED + i and equals a single-image run with that seed. Every setting is
checked against the model's headers before the weights load. Each PNG carries its parameters
(AUTOMATIC1111's format), is written as soon as it is decoded, under a temporary name then renamed,
and never replaces a file. Ctrl-C keeps the images already written and exits 130.
"""

import argparse
import math
import os
import re
import secrets
import signal
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image, PngImagePlugin

DEFAULT_MODEL = "plainxl-tiny"  # bundled; e.g. --model cagliostrolab/animagine-xl-4.0 for the real one
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we promise one line
        raise SystemExit(fail(message))


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    return code


def size_pair(text):
    """'1024x768' (WxH, like AUTOMATIC1111's Size) -> (height, width)."""
    if not re.fullmatch(r"\d+x\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
    w, h = text.split("x")
    return int(h), int(w)


def crop_pair(text):
    if not re.fullmatch(r"\d+,\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not TOP,LEFT, e.g. 0,0")
    return tuple(int(n) for n in text.split(","))


def parse_args(argv):
    p = OneLineParser(prog="python -m sampling.generate", description="SDXL text-to-image.")
    p.add_argument("--model", help=f"single file, diffusers folder or Hugging Face repo id (default {DEFAULT_MODEL})")
    p.add_argument("--vae", help="a VAE to use instead of the model's: a VAE .safetensors or a diffusers vae/ folder")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", help="omit for zero negative conditioning; '' encodes the empty prompt")
    p.add_argument("--width", type=int, help="default: the size the model was trained at (1024 for SDXL)")
    p.add_argument("--height", type=int, help="default: the size the model was trained at (1024 for SDXL)")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler", choices=["euler", "euler_a", "dpmpp_2m", "ddim", "ddpm"])
    p.add_argument("--karras", action="store_true", default=None, help="Karras et al. 2022 sigmas")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument("--seed", type=int, help="0 .. 2**64 - 1; -1 draws one at random (as AUTOMATIC1111)")
    p.add_argument("--num-images", type=int)
    p.add_argument("--original-size", type=size_pair, help="WIDTHxHEIGHT micro-conditioning (default: output size)")
    p.add_argument("--crop-top-left", type=crop_pair, help="TOP,LEFT micro-conditioning (default 0,0)")
    p.add_argument("--target-size", type=size_pair, help="WIDTHxHEIGHT micro-conditioning (default: output size)")
    p.add_argument("--truncate-prompt", action="store_true", default=None,
                   help="cut prompts at 77 tokens as diffusers does (default: 75-token chunks, as A1111/ComfyUI)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="outputs")
    p.add_argument("--from-png", help="re-run the generation recorded in this PNG (other flags override it)")
    return p.parse_args(argv)


def settings_from(args):
    """(Settings, model, vae, recorded model hash) from the PNG (if any) or the defaults, overridden by every flag.

    The PNG's VAE is used only with the PNG's model: a --model of your own takes its own VAE."""
    from sampling.pipeline import Settings
    from sampling.pnginfo import parse_parameters

    model, vae, recorded = args.model, args.vae, {}
    if args.from_png:
        try:
            with Image.open(args.from_png) as png:
                text = png.info.get("parameters")
            if text is None:
                raise ValueError("it has no 'parameters' text chunk")
            settings, recorded = parse_parameters(text)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"--from-png {args.from_png} cannot be used: {e}") from None
        if model is None:
            model, vae = recorded.get("Model"), vae or recorded.get("VAE")
    else:
        if args.prompt is None:
            raise ValueError("--prompt is required (or --from-png FILE)")
        settings = Settings(prompt=args.prompt)
    flags = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                 steps=args.steps, cfg=args.cfg, sampler=args.sampler, karras=args.karras,
                 guidance_rescale=args.guidance_rescale, seed=args.seed, num_images=args.num_images,
                 original_size=args.original_size, crop_top_left=args.crop_top_left, target_size=args.target_size,
                 truncate_prompt=args.truncate_prompt)
    settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
    if settings.seed == -1:
        settings = replace(settings, seed=secrets.randbelow(2**32))  # A1111's -1; the PNG records the seed drawn
    check_settings(settings)
    return settings, model or DEFAULT_MODEL, vae, recorded.get("Model hash") if model == recorded.get("Model") else None


def _multiple_of_8(name, v):
    if v % 8 == 0 and v >= 8:
        return
    nearest = sorted({n for n in (v - v % 8, v - v % 8 + 8) if n >= 8}) or [8]
    raise ValueError(f"--{name} {v} is not a positive multiple of 8; use {' or '.join(map(str, nearest))}")


def check_settings(s):
    """Everything that can be checked without the model. Raises ValueError with the fix in the message."""
    for name in ("width", "height"):
        if getattr(s, name) is not None:
            _multiple_of_8(name, getattr(s, name))
    if s.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {s.steps})")
    if s.num_images < 1:
        raise ValueError(f"--num-images must be at least 1 (got {s.num_images})")
    if not 0 <= s.seed <= MAX_SEED - (s.num_images - 1):
        batch = f" for {s.num_images} images (they use seed .. seed + {s.num_images - 1})" if s.num_images > 1 else ""
        raise ValueError(f"--seed {s.seed} is outside 0 .. 2**64 - 1{batch}; use a seed in that range, "
                         "or -1 for a random one")
    if not (math.isfinite(s.cfg) and s.cfg >= 0):
        raise ValueError(f"--cfg {s.cfg} is not a guidance scale; use a finite number >= 0 (1 or less: no guidance)")
    if not (math.isfinite(s.guidance_rescale) and 0 <= s.guidance_rescale <= 1):
        raise ValueError(f"--guidance-rescale {s.guidance_rescale} is outside 0 .. 1; use e.g. 0.7, or 0 for none")
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        if not math.isfinite(getattr(s, name)):
            raise ValueError(f"{name} {getattr(s, name)} is not a finite number")
    if s.karras and s.sampler in ("ddim", "ddpm"):
        raise ValueError(f"--karras does not apply to {s.sampler}; use euler, euler_a or dpmpp_2m with it")


def available_memory(device):
    """Bytes free for a generation on `device`, or None where it cannot be told."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
            return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024
        except (OSError, TypeError):
            return None
    return None


def check_fits(info, settings, dtype, device):
    """Refuse a generation whose estimated memory exceeds what the device has free (sampling.pipeline.memory_estimate)."""
    from sampling.pipeline import memory_estimate
    from sampling.schedule import make_schedule

    try:  # the step count against this model's schedule (e.g. 1000 'leading' steps reach past t = 999)
        make_schedule(settings.sampler, settings.steps, karras=True if settings.karras else None,
                      config=info.scheduler_config)
    except ValueError as e:
        raise ValueError(f"--steps {settings.steps} with --sampler {settings.sampler}: {e}") from None
    need = memory_estimate(info.config, settings, info.parameters, {"fp32": 4}.get(dtype, 2))
    free = available_memory(device)
    if free is not None and need > free:
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        raise ValueError(f"{settings.width}x{settings.height} x {settings.num_images} image(s) needs about "
                         f"{gib(need)} on {device}, which has {gib(free)} free; use a smaller --width/--height or "
                         f"--num-images" + (", or --dtype bf16" if dtype == "fp32" else ""))


def next_index(out):
    """Files are NNNNN-SEED.png, numbered on from the highest number the folder holds (any width)."""
    taken = [int(m[1]) for f in os.listdir(out) if (m := re.match(r"(\d+)-", f))]
    return max(taken, default=-1) + 1


def save_png(image, path, parameters):
    """Write the PNG under a temporary name, then link it into place: a file already there is never replaced
    (FileExistsError), and no half-written PNG ever has the final name."""
    from models.files import atomic_file

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def save_next(image, out, seed, parameters):
    """Save as the next free NNNNN-SEED.png of `out`; another process taking a number moves us on."""
    index = next_index(out)
    while True:
        path = out / f"{index:05d}-{seed}.png"
        try:
            save_png(image, path, parameters)
            return path
        except FileExistsError:
            index = next_index(out)


class Interrupts:
    """Ctrl-C, taken at safe points. The first press is only noted, and the run stops at the next sampler
    step or image (a KeyboardInterrupt raised inside torch's imports can surface as another exception, or
    kill the process by signal); a second press interrupts at once."""

    def __init__(self):
        self.asked = False

    def __call__(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def check(self, *_):
        if self.asked:
            raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    written, interrupts = [], Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts)
    try:
        return generate(args, written, interrupts.check)
    except KeyboardInterrupt:
        return fail(f"interrupted; {len(written)} image(s) were written and kept"
                    + (f" ({', '.join(map(str, written))})" if written else ""), 130)
    finally:
        signal.signal(signal.SIGINT, previous)


def generate(args, written, check_interrupt):
    from models.loading import LoadError, check_device, inspect, model_hash, out_of_memory, resolve
    from sampling.pipeline import NonFiniteError, Pipeline, with_native_size
    from sampling.pnginfo import format_parameters

    out = Path(args.out)
    try:
        settings, model, vae, recorded_hash = settings_from(args)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; name a folder (it is created if missing)")
        device = check_device(args.device)
        info = inspect(model)  # headers and configs only: the settings are checked before the weights load
        if vae is not None:
            resolve(vae)  # it exists (or is downloaded) before the big load
        settings = with_native_size(settings, info.config.unet)
        check_fits(info, settings, args.dtype, device)
        pipe = Pipeline.load(info.path, dtype=args.dtype, device=device, vae=vae)
        model_file_hash = model_hash(info.path) if info.path.is_file() else None
    except (ValueError, LoadError) as e:
        return fail(str(e))
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        return fail(f"{args.device} has too little memory for this model in {args.dtype}; use --dtype bf16 or fp16")
    try:
        out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder behind
    except OSError as e:
        return fail(f"cannot create --out {out} ({e.strerror}); choose a folder you can write to")
    check_interrupt()
    if recorded_hash and model_file_hash and recorded_hash != model_file_hash:
        print(f"note: the PNG was made with a model whose hash is {recorded_hash}; {model} has {model_file_hash}",
              file=sys.stderr)
    try:
        for i, image in enumerate(pipe.images(settings, callback=check_interrupt)):  # checked every step
            seed = settings.seed + i
            parameters = format_parameters(settings, seed, model, model_hash=model_file_hash, vae=vae)
            written.append(save_next(image, out, seed, parameters))
            print(written[-1])
            check_interrupt()  # after the write: a finished image is kept
    except (MemoryError, RuntimeError) as e:  # the estimate (check_fits) was short
        if not out_of_memory(e):
            raise
        return fail(f"{device} ran out of memory at {settings.width}x{settings.height} x {settings.num_images}; "
                    f"use a smaller size or --num-images ({len(written)} image(s) were written)")
    except NonFiniteError as e:
        kept = f"; the {len(written)} image(s) before it were written" if written else "; nothing was written"
        return fail(str(e).rstrip(".") + kept + ".")
    except OSError as e:
        return fail(f"writing to {out} failed ({e.strerror}); {len(written)} image(s) were written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
