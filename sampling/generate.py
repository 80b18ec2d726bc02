"""Command line generation: text-to-image, img2img, inpainting, base + refiner, hi-res fix.

    python -m sampling.generate --model M --prompt P [--negative-prompt N] --width W --height H --steps S
        --cfg G --sampler {euler,euler_a,dpmpp_2m,ddim,ddpm} [--karras] [--guidance-rescale R] --seed SEED
        --num-images B --dtype {fp32,fp16,bf16} --device D [--config FOLDER_OR_CONFIG_JSON] [--vae VAE]
        [--lora FILE[:SCALE] ...]
        [--no-prompt-weights] [--save-attention DIR] [--intervention NAME ...] [--tap PATTERN ... --tap-out FILE]
        --out DIR
      [--refiner R --refiner-start F [--aesthetic-score A] [--negative-aesthetic-score NA]]
      [--init-image IMG --strength S [--mask MASK]]
      [--hires-scale K --hires-strength S [--hires-steps N] [--hires-upscaler latent|lanczos]]
    python -m sampling.generate --from-png outputs/00003-42.png      # re-run a generation

Step counts: --init-image runs diffusers' int(steps x strength) steps (AUTOMATIC1111's img2img tab runs
int(steps x min(strength, 0.999)) + 1); the hi-res pass runs exactly --hires-steps, the tail of an
int(hires_steps / strength)-step schedule, as AUTOMATIC1111's hi-res fix does.

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
from contextlib import ExitStack
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


def lora_arg(text):
    """'FILE[:SCALE]' -> (FILE, SCALE), scale 1.0 when absent (a colon inside a path is left alone)."""
    path, colon, scale = text.rpartition(":")
    if not colon or Path(text).exists() or "/" in scale or "\\" in scale:
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: the scale {scale!r} is not a number; write FILE:0.8")
    return path, value


def intervention_arg(text):
    from sampling.interventions import check_name

    try:
        check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv):
    p = OneLineParser(prog="python -m sampling.generate", description="SDXL text-to-image.")
    p.add_argument("--model", help=f"single file, diffusers folder or Hugging Face repo id (default {DEFAULT_MODEL})")
    p.add_argument("--config", metavar="FOLDER_OR_CONFIG_JSON",
                   help="the architecture of a --model single file that does not store it: its diffusers folder or "
                        "config JSON (as diffusers' from_single_file(config=...))")
    p.add_argument("--vae", help="a VAE to use instead of the model's: a VAE .safetensors or a diffusers vae/ folder")
    p.add_argument("--lora", action="append", type=lora_arg, metavar="FILE[:SCALE]",
                   help="merge a LoRA file into the model (kohya, diffusers/PEFT, LoCon); repeatable; scale 1.0 by default")
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
    p.add_argument("--no-prompt-weights", dest="prompt_weights", action="store_false", default=None,
                   help="read (, ), [, ] and BREAK literally, as diffusers (default: AUTOMATIC1111's weights)")
    p.add_argument("--refiner", help="a refiner model that takes over at --refiner-start (two-stage SDXL)")
    p.add_argument("--refiner-start", type=float, help="the share of the schedule the base runs (default 0.8)")
    p.add_argument("--aesthetic-score", type=float, help="a refiner's conditioning score (default 6.0)")
    p.add_argument("--negative-aesthetic-score", type=float, help="its negative's score (default 2.5)")
    p.add_argument("--init-image", help="img2img from this image (the output takes its size unless --width/--height)")
    p.add_argument("--strength", type=float, help="how much of the init image is repainted, (0, 1] (default 0.75)")
    p.add_argument("--mask", help="inpaint: white repaints, black keeps (needs --init-image, the same size)")
    p.add_argument("--hires-scale", type=float, help="hi-res fix: a second pass at this many times the size")
    p.add_argument("--hires-strength", type=float, help="the hi-res pass's denoising strength (default 0.7)")
    p.add_argument("--hires-steps", type=int, help="the hi-res pass's steps (default: --steps)")
    p.add_argument("--hires-upscaler", choices=["latent", "lanczos"], help="latent (default) or lanczos")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--cfg-mode", choices=["batch", "split"], default="batch",
                   help="guidance as one UNet pass of [negative, positive] (batch) or two (split: less memory)")
    p.add_argument("--vae-tiling", type=int, nargs="?", const=128, metavar="LATENTS",
                   help="VAE decode/encode of big images in overlapping tiles of this many latents (default 128 = "
                        "1024 px, as diffusers' SDXL tiles); not exact: each tile normalises and attends on its own")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (the first step compiles it: minutes; later steps run faster)")
    p.add_argument("--offload", action="store_true",
                   help="keep the model on the CPU and move each part (text encoders, UNet, VAE) to --device only "
                        "while it runs: a GPU too small for the whole model needs room for the UNet alone")
    p.add_argument("--save-attention", metavar="DIR",
                   help="also write each image's cross-attention heatmaps, one panel per prompt token (DAAM: "
                        "summed over the UNet's blocks and steps), as DIR/<the image's name>")
    p.add_argument("--intervention", action="append", type=intervention_arg, metavar="NAME",
                   help="change the base UNet while it runs (sampling/interventions.py): freeu, classic-attention, "
                        "zero-micro-conditioning, or skip=PATTERN (modules by official name); repeatable")
    p.add_argument("--tap", action="append", metavar="PATTERN",
                   help="record the outputs of the base model's modules matching PATTERN (fnmatch over official "
                        "names, e.g. 'unet.middle_block') at every step into --tap-out; repeatable")
    p.add_argument("--tap-out", metavar="FILE", help="the .safetensors file --tap writes (never replaced)")
    p.add_argument("--out", default="outputs")
    p.add_argument("--from-png", help="re-run the generation recorded in this PNG (other flags override it)")
    return p.parse_args(argv)


def settings_from(args):
    """(Settings, model, vae, refiner, loras, interventions, recorded model hash) from the PNG (if any) or the
    defaults, overridden by every flag. The PNG's VAE and refiner are used only with the PNG's model: a --model
    of your own takes its own VAE, and a refiner only if you name one."""
    from sampling.interventions import check_name
    from sampling.pipeline import Settings
    from sampling.pnginfo import parse_parameters

    model, vae, refiner, loras, recorded = args.model, args.vae, args.refiner, args.lora, {}
    interventions = args.intervention
    if args.from_png:
        try:  # format rule: PIL by content; the settings are the 'parameters' text chunk (not JPEG/WebP EXIF)
            with Image.open(args.from_png) as png:
                text = png.info.get("parameters")
            if text is None:
                raise ValueError("it has no 'parameters' text chunk")
            settings, recorded = parse_parameters(text)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"--from-png {args.from_png} cannot be used: {e}") from None
        if model is None:
            model, vae = recorded.get("Model"), vae or recorded.get("VAE")
            refiner = refiner or recorded.get("Refiner")
            loras = loras or recorded.get("Loras")
        interventions = interventions or recorded.get("Interventions")
        try:
            for name in interventions or []:
                check_name(name)
        except ValueError as e:
            raise ValueError(f"--from-png {args.from_png} records an intervention this version lacks: {e}") from None
    else:
        if args.prompt is None:
            raise ValueError("--prompt is required (or --from-png FILE)")
        settings = Settings(prompt=args.prompt)
    flags = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
                 steps=args.steps, cfg=args.cfg, sampler=args.sampler, karras=args.karras,
                 guidance_rescale=args.guidance_rescale, seed=args.seed, num_images=args.num_images,
                 original_size=args.original_size, crop_top_left=args.crop_top_left, target_size=args.target_size,
                 truncate_prompt=args.truncate_prompt, prompt_weights=args.prompt_weights,
                 refiner_start=args.refiner_start, aesthetic_score=args.aesthetic_score,
                 negative_aesthetic_score=args.negative_aesthetic_score, init_image=args.init_image,
                 strength=args.strength, mask=args.mask, hires_scale=args.hires_scale,
                 hires_strength=args.hires_strength, hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler)
    settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
    if settings.seed == -1:
        settings = replace(settings, seed=secrets.randbelow(2**32))  # A1111's -1; the PNG records the seed drawn
    recorded_hash = recorded.get("Model hash") if model == recorded.get("Model") else None
    return settings, model or DEFAULT_MODEL, vae, refiner, loras or [], interventions or [], recorded_hash


def _multiple_of_8(name, v):
    if v % 8 == 0 and v >= 8:
        return
    nearest = sorted({n for n in (v - v % 8, v - v % 8 + 8) if n >= 8}) or [8]
    raise ValueError(f"--{name} {v} is not a positive multiple of 8; use {' or '.join(map(str, nearest))}")


def check_settings(s):
    """Everything that can be checked without the model -> s with its init image and mask opened (the model's
    own checks, sampling.pipeline.check, take them). Raises ValueError with the fix in the message."""
    from sampling.images import open_rgb
    from sampling.prompts import parse_weights

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
    if s.prompt_weights:
        for flag, prompt in [("--prompt", s.prompt), ("--negative-prompt", s.negative_prompt or "")]:
            try:
                parse_weights(prompt)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
    if s.hires_steps is not None and s.hires_steps < 1:
        raise ValueError(f"--hires-steps must be at least 1 (got {s.hires_steps})")
    images = {}
    for flag, path in [("--init-image", s.init_image), ("--mask", s.mask)]:
        if isinstance(path, str):
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path} does not exist; give the path of an image file")
            images[flag] = open_rgb(path)  # an ImageError (a ValueError) names the file
    if "--init-image" in images and (s.width is None or s.height is None):  # a missing side is the image's
        w, h = images["--init-image"].size
        if (s.width is None and w < 8) or (s.height is None and h < 8):
            raise ValueError(f"--init-image is {w}x{h}; give an image of at least 8x8 pixels, or --width and --height")
    return replace(s, init_image=images.get("--init-image", s.init_image), mask=images.get("--mask", s.mask))


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


def check_steps(info, refiner_info, s):
    """Each stage's steps against its model's schedule (e.g. 1000 'leading' steps reach past t = 999), and
    that each stage runs at least one step, before the weights load."""
    from sampling.pipeline import hires_second_pass, schedule_steps, window
    from sampling.schedule import make_schedule

    stages = [("--steps", info, s)]
    if refiner_info is not None:
        stages = [("--steps", info, replace(s, denoising_end=s.refiner_start)),
                  ("--steps", refiner_info, replace(s, denoising_start=s.refiner_start))]
    if s.hires_scale is not None:
        stages.append(("--hires-steps", info, hires_second_pass(s)))
    for flag, model, stage in stages:
        try:
            schedule = make_schedule(stage.sampler, schedule_steps(stage), karras=True if stage.karras else None,
                                     config=model.scheduler_config)
        except ValueError as e:
            raise ValueError(f"{flag} {stage.steps} with --sampler {stage.sampler}: {e}") from None
        window(stage, schedule, model.scheduler_config)


def check_loras(info, loras):
    """Each LoRA against the model's modules and shapes, on a weightless copy of it (meta device), before the load."""
    import torch

    from models.lora import merge_lora
    from models.sdxl import SDXL

    with torch.device("meta"):
        shell = SDXL(info.config)
    for path, scale in loras:
        merge_lora(shell, path, scale, apply=False)


def check_fits(info, settings, dtype, device, refiner_info=None, offload=False):
    """Refuse a generation whose estimated memory exceeds what the device has free (sampling.pipeline.memory_estimate);
    with the hi-res fix, at its second pass's size; with a refiner, its weights loaded too; with offload, only the
    UNet's weights (the largest part, and the only one on the device while it runs)."""
    import torch

    from models.unet import UNet
    from sampling.pipeline import hires_second_pass, memory_estimate

    s = settings
    if s.hires_scale is not None:
        settings = hires_second_pass(s)  # the largest size of the run
    dtype_bytes = {"fp32": 4}.get(dtype, 2)
    parameters = info.parameters
    if offload:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in UNet(info.config.unet).parameters())
    need = memory_estimate(info.config, settings, parameters, dtype_bytes)
    if refiner_info is not None and not offload:
        need += refiner_info.parameters * dtype_bytes
    free = available_memory(device)
    if free is not None and need > free:
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        raise ValueError(f"{settings.width}x{settings.height} x {settings.num_images} image(s) needs about "
                         f"{gib(need)} on {device}, which has {gib(free)} free; use a smaller --width/--height"
                         + (", --hires-scale" if s.hires_scale else "") + " or --num-images"
                         + (", or --dtype bf16" if dtype == "fp32" else ""))


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


def check_instruments(info, interventions, taps, tap_out):
    """--intervention's and --tap's patterns against the model's module names (built on the meta device, no
    weights), and --tap-out, before the load: ValueError naming what to fix."""
    import torch

    from models.files import check_output
    from models.sdxl import SDXL
    from sampling.instruments import matching

    if bool(taps) != bool(tap_out):
        raise ValueError("--tap and --tap-out go together: --tap PATTERN names what to record, --tap-out FILE where")
    if tap_out and Path(tap_out).exists():
        raise ValueError(f"--tap-out {tap_out} exists; name a new file (it is never replaced)")
    if tap_out:
        check_output(tap_out, "--tap-out", folder=False)
    patterns = [name.removeprefix("skip=") for name in interventions if name.startswith("skip=")] + list(taps or [])
    if patterns:
        with torch.device("meta"):
            model = SDXL(info.config)
        for pattern in patterns:
            matching(model, pattern)


def save_taps(taps, path):
    """--tap's records as one safetensors file, "<module name>/step<NNN>" -> (rows [uncond, cond], ...)."""
    from safetensors.torch import save_file

    from models.files import atomic_file

    tensors = {f"{name}/step{step:03d}": t.contiguous()
               for name, by_step in taps.items() for step, t in by_step.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp)
    return path


def save_attention(maps, image, i, s, tokenizer, path, parameters):
    """Image i's token heatmaps (sampling/instruments.py) as a labelled grid at `path`; never replaces a file."""
    from sampling.instruments import heatmap_grid, prompt_tokens, token_heatmaps

    row = s.num_images + i if s.cfg > 1 else i  # a CFG step's rows are [uncond, cond]
    heat = token_heatmaps(maps, s.height, s.width, rows=slice(row, row + 1))[0]  # (M, H, W)
    positions, labels = prompt_tokens(tokenizer, s.prompt, s.truncate_prompt, s.prompt_weights)
    try:
        save_png(heatmap_grid(image, heat[positions], labels), path, parameters)
    except FileExistsError:
        print(f"note: {path} exists and was kept; the attention map of {path.name} was not written", file=sys.stderr)
        return None
    return path


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
    from models.files import check_output
    from models.loading import LoadError, check_device, inspect, model_hash, out_of_memory, resolve
    from models.lora import addnet_hash
    from sampling.instruments import attention_maps, tap
    from sampling.interventions import named
    from sampling.pipeline import NonFiniteError, Pipeline, check, with_output_size
    from sampling.pnginfo import format_parameters

    out = Path(args.out)
    try:
        settings, model, vae, refiner, loras, interventions, recorded_hash = settings_from(args)  # the PNG's (paths)
        opened = check_settings(settings)  # the same, its init image and mask read
        check_output(out, "--out")  # it, or a folder above it, a file: refused before any work
        device = check_device(args.device)
        if args.vae_tiling is not None and args.vae_tiling < 8:
            raise ValueError(f"--vae-tiling {args.vae_tiling} is too small: it is a tile size in latents, at least 8 "
                             "(128 = 1024 px, the default when the flag is given alone)")
        attention_dir = Path(args.save_attention) if args.save_attention else None
        if attention_dir is not None:
            check_output(attention_dir, "--save-attention")
        if attention_dir is not None and (opened.hires_scale is not None or refiner):
            raise ValueError("--save-attention maps one pass of one model at one size; drop --hires-scale and "
                             "--refiner (or map the first pass alone)")
        if args.offload and device.type == "cpu":
            raise ValueError("--offload moves the model's parts to --device while they run; with --device cpu "
                             "there is nothing to offload: give --device cuda, or drop --offload")
        info = inspect(model, args.config)  # headers and configs only: the settings are checked before the weights load
        refiner_info = inspect(refiner) if refiner else None
        check(opened, info.config, refiner_info.config if refiner_info else None)
        if vae is not None:
            resolve(vae)  # it exists (or is downloaded) before the big load
        loras = [(resolve(path), scale) for path, scale in loras]
        check_loras(info, loras)
        opened = with_output_size(opened, info.config.unet)
        settings = replace(settings, width=opened.width, height=opened.height)
        check_steps(info, refiner_info, opened)
        check_fits(info, opened, args.dtype, device, refiner_info, args.offload)
        check_instruments(info, interventions, args.tap, args.tap_out)
        home = "cpu" if args.offload else device  # with --offload the weights stay on the CPU between uses
        pipe = Pipeline.load(info.path, dtype=args.dtype, device=home, vae=vae, loras=loras, config=args.config)
        # --vae replaces both stages' VAE: the refiner decodes, and the PNG records one VAE.
        refiner_pipe = Pipeline.load(refiner_info.path, dtype=args.dtype, device=home, vae=vae) if refiner else None
        for p in filter(None, (pipe, refiner_pipe)):  # ways to run that leave the images as they are
            p.cfg_mode, p.vae_tiling = args.cfg_mode, args.vae_tiling
            p.offload = device if args.offload else None
            if args.compile:
                p.model.unet.compile()  # in place: the module and its parameter names stay as they are
        model_file_hash = model_hash(info.path) if info.path.is_file() else None
        refiner_hash = model_hash(refiner_info.path) if refiner and refiner_info.path.is_file() else None
        lora_records = [(path, scale, addnet_hash(path)) for path, scale in loras]
    except (ValueError, LoadError) as e:
        return fail(str(e))
    except OSError as e:  # a path that cannot even be looked at: no permission, a name too long
        return fail(f"cannot read {e.filename or 'a file'} ({e.strerror or e}); check the path and its permissions")
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        models = "these models" if refiner else "this model"
        fix = "use --dtype bf16 or fp16" if args.dtype == "fp32" else "use a device with more memory"
        return fail(f"{args.device} has too little memory for {models} in {args.dtype}; {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder behind
        if attention_dir is not None:
            attention_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"cannot create {e.filename} ({e.strerror}); choose a folder you can write to")
    check_interrupt()
    if recorded_hash and model_file_hash and recorded_hash != model_file_hash:
        print(f"note: the PNG was made with a model whose hash is {recorded_hash}; {model} has {model_file_hash}",
              file=sys.stderr)
    try:
        with ExitStack() as instruments:  # each undone when the generation ends, however it ends
            for name in interventions:
                instruments.enter_context(named(pipe.model, name))
            taps = instruments.enter_context(tap(pipe.model, args.tap)) if args.tap else None
            maps = instruments.enter_context(attention_maps(pipe.model)) if attention_dir is not None else None
            images = pipe.images(opened, refiner_pipe, callback=check_interrupt)  # Ctrl-C checked every step
            for i, image in enumerate(images):
                seed = settings.seed + i
                parameters = format_parameters(settings, seed, model, model_hash=model_file_hash, vae=vae,
                                               refiner=refiner, refiner_hash=refiner_hash, loras=lora_records,
                                               interventions=interventions)
                written.append(save_next(image, out, seed, parameters))
                print(written[-1])
                if maps is not None:
                    grid = save_attention(maps, image, i, opened, pipe.tokenizers[0],
                                          attention_dir / written[-1].name, parameters)
                    if grid is not None:
                        print(grid)
                check_interrupt()  # after the write: a finished image is kept
            if taps is not None:
                print(save_taps(taps, Path(args.tap_out)))
    except (MemoryError, RuntimeError) as e:  # the estimate (check_fits) was short
        if not out_of_memory(e):
            raise
        return fail(f"{device} ran out of memory at {settings.width}x{settings.height} x {settings.num_images}; "
                    f"use a smaller size or --num-images ({len(written)} image(s) were written)")
    except NonFiniteError as e:
        kept = f"; the {len(written)} image(s) before it were written" if written else "; nothing was written"
        return fail(str(e).rstrip(".") + kept + ".")
    except ValueError as e:  # a combination the pipeline refuses that the checks above missed: one line still
        return fail(str(e).rstrip(".") + (f"; {len(written)} image(s) were written" if written else "; nothing was written"))
    except OSError as e:
        return fail(f"writing to {out} failed ({e.strerror}); {len(written)} image(s) were written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
