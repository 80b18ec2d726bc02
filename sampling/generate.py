"""Command line text-to-image.

    python -m sampling.generate --model M --prompt P [--negative-prompt N] --width W --height H --steps S
        --cfg G --sampler {euler,euler_a,dpmpp_2m,ddim,ddpm} [--karras] [--guidance-rescale R] --seed SEED
        --num-images B --dtype {fp32,fp16,bf16} --device D --out DIR
    python -m sampling.generate --from-png outputs/00003-42.png      # re-run a generation

Image i of a batch uses seed SEED + i and equals a single-image run with that seed. Each PNG carries
its parameters (AUTOMATIC1111's format) and is written under a temporary name, then renamed.
"""

import argparse
import os
import re
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image, PngImagePlugin

DEFAULT_MODEL = "plainxl-tiny"  # bundled; e.g. --model cagliostrolab/animagine-xl-4.0 for the real one


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; we promise one line
        raise SystemExit(fail(message))


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


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
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", help="omit for zero negative conditioning; '' encodes the empty prompt")
    p.add_argument("--width", type=int, help="default: the size the model was trained at (1024 for SDXL)")
    p.add_argument("--height", type=int, help="default: the size the model was trained at (1024 for SDXL)")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sampler", choices=["euler", "euler_a", "dpmpp_2m", "ddim", "ddpm"])
    p.add_argument("--karras", action="store_true", default=None, help="Karras et al. 2022 sigmas")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument("--seed", type=int)
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
    """Settings from the PNG (if any) or the defaults, overridden by every flag given."""
    from sampling.pipeline import Settings
    from sampling.pnginfo import parse_parameters

    model = args.model
    if args.from_png:
        try:
            text = Image.open(args.from_png).info.get("parameters")
            if text is None:
                raise ValueError("it has no 'parameters' text chunk")
            settings, png_model = parse_parameters(text)
        except (OSError, ValueError) as e:
            raise ValueError(f"--from-png {args.from_png} cannot be used: {e}") from None
        model = model or png_model
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
    for name in ("width", "height"):
        if getattr(settings, name) is not None and (getattr(settings, name) % 8 or getattr(settings, name) < 8):
            v = getattr(settings, name)
            raise ValueError(f"--{name} {v} is not a positive multiple of 8; use {max(8, v - v % 8)} or {v - v % 8 + 8}")
    if settings.steps < 1:
        raise ValueError(f"--steps must be at least 1 (got {settings.steps})")
    if settings.num_images < 1:
        raise ValueError(f"--num-images must be at least 1 (got {settings.num_images})")
    if settings.karras and settings.sampler in ("ddim", "ddpm"):
        raise ValueError(f"--karras does not apply to {settings.sampler}; use euler, euler_a or dpmpp_2m with it")
    return settings, model or DEFAULT_MODEL


def next_index(out):
    """Files are NNNNN-SEED.png, numbered on from what the folder already holds, so names sort in order."""
    taken = [int(m[1]) for f in os.listdir(out) if (m := re.match(r"(\d{5})-", f))]
    return max(taken, default=-1) + 1


def save_png(image, path, parameters):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)  # never a half-written PNG under the final name


def main(argv=None):
    args = parse_args(argv)
    try:
        settings, model = settings_from(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        return fail(str(e))

    from models.loading import LoadError
    from sampling.pipeline import Pipeline
    from sampling.pnginfo import format_parameters

    try:
        pipe = Pipeline.load(model, dtype=args.dtype, device=args.device)
    except LoadError as e:
        return fail(str(e))
    settings = pipe.with_size(settings)  # the model's own size where no size was given
    images = pipe(settings)
    first = next_index(out)
    for i, image in enumerate(images):
        seed = settings.seed + i
        path = out / f"{first + i:05d}-{seed}.png"
        save_png(image, path, format_parameters(settings, seed, model))
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
