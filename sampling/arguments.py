"""sampling.generate's command line: the flags, what they ask for (a Request: the settings and the models,
from the flags and --from-png's PNG), and every check of it that needs no model.

    OneLineParser, fail         argparse's errors and ours as one line on stderr
    size_pair ... intervention_arg
                                the flags' value types (WxH, TOP,LEFT, FILE[:SCALE], an intervention name)
    parse_args                  the flags
    Request, request_from       what a command line asks for
    check_settings              the settings alone: sizes, steps, seeds, scales, prompt syntax; images opened
"""

import argparse
import math
import re
import secrets
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from sampling.names import ALIASES, SAMPLER_NAMES, SCHEDULE_NAMES

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


def float_pair(text):
    """'0.28,5.42' -> (0.28, 5.42)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH, e.g. 0.28,5.42") from None
    return low, high


def lora_arg(text):
    """--lora's FILE[:SCALE] (models.lora.lora_arg, which python -m models.merge bake reads too; imported here, not
    at the top: it brings torch, which a command that refuses its flags before any work should not pay)."""
    from models.lora import lora_arg as read

    return read(text)


def intervention_arg(text):
    from sampling.interventions import check_name

    try:
        check_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_sampling_flags(p):
    """The sampler, its schedule and the guidance (docs/samplers.md, docs/guidance.md)."""
    p.add_argument("--sampler", choices=[*SAMPLER_NAMES, *ALIASES], metavar="SAMPLER",
                   help="ComfyUI's names (docs/samplers.md): " + ", ".join(SAMPLER_NAMES) + " (default euler_ancestral)")
    p.add_argument("--schedule", choices=["default", *SCHEDULE_NAMES], metavar="SCHEDULE",
                   help="the sampling schedule, ComfyUI's names: default (diffusers' scheduler's for euler, "
                        "euler_ancestral, dpmpp_2m, ddim, ddpm; normal for the rest), " + ", ".join(SCHEDULE_NAMES))
    p.add_argument("--karras", action="store_true", default=None,
                   help="diffusers' Karras sigmas (timesteps rounded as diffusers) with the default schedule of euler, "
                        "euler_ancestral or dpmpp_2m; --schedule karras is k-diffusion's and ComfyUI's")
    p.add_argument("--spacing", choices=["leading", "trailing", "linspace"],
                   help="the default schedule's timestep spacing (diffusers' timestep_spacing; SDXL's is leading, "
                        "Lightning, Hyper-SD and Turbo want trailing)")
    p.add_argument("--gamma", type=float, help="TCD's gamma: the share of each step renoised (default 0.3)")
    p.add_argument("--eta", type=float, help="ancestral and SDE samplers: the share of fresh noise per step (default 1)")
    p.add_argument("--s-noise", type=float, help="ancestral and SDE samplers: a scale on the fresh noise (default 1)")
    p.add_argument("--guidance-rescale", type=float)
    p.add_argument("--pag-scale", type=float, help="perturbed-attention guidance's scale (Ahn et al. 2024; e.g. 3)")
    p.add_argument("--pag-layers", nargs="+", metavar="LAYER",
                   help="where PAG perturbs self-attention: mid (the default, diffusers') or official block names "
                        "with wildcards, e.g. middle_block.1 output_blocks.[0-2].1")
    p.add_argument("--apg", action="store_true", default=None,
                   help="adaptive projected guidance (Sadat et al. 2024) instead of plain CFG at high --cfg")
    p.add_argument("--apg-eta", type=float, help="APG: the weight of the guidance parallel to the prediction (0)")
    p.add_argument("--apg-norm-threshold", type=float, help="APG: the cap on the guidance's norm (2.5; 0: none)")
    p.add_argument("--apg-momentum", type=float, help="APG: the momentum of its running average (-0.75; 0: none)")
    p.add_argument("--cfg-interval", type=float_pair, metavar="LOW,HIGH",
                   help="guidance only for sigma in (LOW, HIGH] (Kynkaanniemi et al. 2024; 0.28,5.42 for SDXL)")


def add_control_flags(p):
    """ControlNets, T2I-Adapters and IP-Adapters (docs/control.md)."""
    p.add_argument("--controlnet", action="append", type=lora_arg, metavar="MODEL[:SCALE]",
                   help="a ControlNet (SDXL; file, diffusers folder or repo id) steered by the --control-image of the "
                        "same position; repeatable: several add up; scale 1.0 by default (docs/control.md)")
    p.add_argument("--control-image", action="append", metavar="FILE",
                   help="the control image of each --controlnet, in order (python -m sampling.preprocess makes canny, "
                        "scribble and tile maps); resized to the output as diffusers does")
    p.add_argument("--control-type", action="append", metavar="TYPE",
                   help="what each --controlnet's image is, for a ControlNet-Union (openpose, depth, scribble, canny, "
                        "lineart, normal, segment, tile, repaint; none for a plain ControlNet), in order")
    p.add_argument("--control-start", type=float, help="where the ControlNets start acting, a fraction of the schedule")
    p.add_argument("--control-end", type=float, help="where they stop (default 1: to the end)")
    p.add_argument("--guess-mode", action="store_true", default=None,
                   help="ControlNet's guess mode: control on the conditional pass only, coarse levels weighted most")
    p.add_argument("--adapter", action="append", type=lora_arg, metavar="MODEL[:SCALE]",
                   help="an SDXL T2I-Adapter steered by the --adapter-image of the same position; repeatable (their "
                        "maps add up); scale 1.0 by default")
    p.add_argument("--adapter-image", action="append", metavar="FILE", help="the image of each --adapter, in order")
    p.add_argument("--adapter-factor", type=float,
                   help="the share of the first steps the T2I-Adapters act on (diffusers' adapter_conditioning_factor)")
    p.add_argument("--ip-adapter", action="append", type=lora_arg, metavar="MODEL[:SCALE]",
                   help="an SDXL IP-Adapter (h94's .safetensors, base or plus): the --ip-image of the same position "
                        "as a prompt; repeatable; scale 1.0 by default")
    p.add_argument("--ip-image", action="append", metavar="FILE", help="the image of each --ip-adapter, in order")
    p.add_argument("--ip-encoder", metavar="FOLDER_OR_FILE",
                   help="the CLIP vision encoder of the IP-Adapters (default: the image_encoder h94/IP-Adapter keeps "
                        "beside the file: ViT-H for _vit-h and plus files, ViT-bigG for ip-adapter_sdxl)")


def parse_args(argv):
    p = OneLineParser(prog="python -m sampling.generate", description="SDXL text-to-image.")
    p.add_argument("--model", help=f"single file, diffusers folder or Hugging Face repo id (default {DEFAULT_MODEL})")
    p.add_argument("--config", metavar="FOLDER_OR_CONFIG_JSON",
                   help="the architecture of a --model single file that does not store it: its diffusers folder or "
                        "config JSON (as diffusers' from_single_file(config=...))")
    p.add_argument("--vae", help="a VAE to use instead of the model's: a VAE .safetensors or a diffusers vae/ folder")
    p.add_argument("--lora", action="append", type=lora_arg, metavar="FILE[:SCALE]",
                   help="merge a LoRA file into the model (kohya, diffusers/PEFT, LoCon); repeatable; scale 1.0 by default")
    p.add_argument("--embeddings", action="append", metavar="FILE_OR_FOLDER",
                   help="textual-inversion embeddings (SDXL safetensors: clip_l and clip_g), written in prompts as "
                        "embedding:name or name; repeatable")
    add_control_flags(p)
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", help="omit for zero negative conditioning; '' encodes the empty prompt")
    p.add_argument("--prompt-2", help="what the second text encoder (bigG) reads (diffusers' prompt_2); default: --prompt")
    p.add_argument("--negative-prompt-2", help="the same for the negative prompt; default: --negative-prompt")
    p.add_argument("--width", type=int, help="default: the size the model was trained at (1024 for SDXL)")
    p.add_argument("--height", type=int, help="default: the size the model was trained at (1024 for SDXL)")
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    add_sampling_flags(p)
    p.add_argument("--seed", type=int, help="0 .. 2**64 - 1; -1 draws one at random (as AUTOMATIC1111)")
    p.add_argument("--num-images", type=int)
    p.add_argument("--original-size", type=size_pair, help="WIDTHxHEIGHT micro-conditioning (default: output size)")
    p.add_argument("--crop-top-left", type=crop_pair, help="TOP,LEFT micro-conditioning (default 0,0)")
    p.add_argument("--target-size", type=size_pair, help="WIDTHxHEIGHT micro-conditioning (default: output size)")
    p.add_argument("--negative-original-size", type=size_pair, help="WIDTHxHEIGHT: the negative's own (with the next)")
    p.add_argument("--negative-target-size", type=size_pair, help="WIDTHxHEIGHT: the negative's own target size")
    p.add_argument("--negative-crop-top-left", type=crop_pair, help="TOP,LEFT: the negative's own crop (default 0,0)")
    p.add_argument("--truncate-prompt", action="store_true", default=None,
                   help="cut prompts at 77 tokens as diffusers does (default: 75-token chunks, as A1111/ComfyUI)")
    p.add_argument("--clip-skip", type=int, help="diffusers' clip_skip: the text context from K layers before SDXL's "
                   "penultimate one, in both text encoders (the pooled vector unchanged)")
    p.add_argument("--no-prompt-weights", dest="prompt_weights", action="store_false", default=None,
                   help="read (, ), [, ] and BREAK literally, as diffusers (default: AUTOMATIC1111's weights)")
    p.add_argument("--refiner", help="a refiner model that takes over at --refiner-start (two-stage SDXL)")
    p.add_argument("--refiner-config", metavar="FOLDER_OR_CONFIG_JSON", help="--config for the refiner")
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


@dataclass
class Request:
    """What one command line asks for: the generation's settings and the models that run it."""

    settings: object  # sampling.settings.Settings, with the init image and mask as paths
    model: str  # --model, or the PNG's
    vae: str | None
    refiner: str | None
    loras: list  # (path, scale) pairs
    controlnets: list  # (source, scale) pairs
    adapters: list  # (source, scale) pairs
    ip_adapters: list  # (source, scale) pairs
    embeddings: list  # --embeddings' files and folders
    interventions: list  # names, as --intervention takes them
    recorded_hash: str | None  # the PNG's Model hash, when the model is the PNG's (to say if it differs)


def request_from(args):
    """The Request of the command line: the PNG's (if any) or the defaults, overridden by every flag. The PNG's
    VAE and refiner are used only with the PNG's model: a --model of your own takes its own VAE, and a refiner
    only if you name one."""
    from sampling.comfyui import parse_comfyui
    from sampling.interventions import check_name
    from sampling.pnginfo import parse_parameters
    from sampling.settings import Settings

    model, vae, refiner, loras, recorded = args.model, args.vae, args.refiner, args.lora, {}
    embeddings = args.embeddings
    interventions = args.intervention
    if args.from_png:
        try:  # format rule: PIL by content; the settings are A1111's 'parameters' text chunk or ComfyUI's 'prompt'
            with Image.open(args.from_png) as png:
                text, graph = png.info.get("parameters"), png.info.get("prompt")
            if text is None and graph is None:
                raise ValueError("it has no 'parameters' (AUTOMATIC1111, Forge, plainxl) or 'prompt' (ComfyUI) text chunk")
            settings, recorded = parse_parameters(text) if text is not None else parse_comfyui(graph)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"--from-png {args.from_png} cannot be used: {e}") from None
        if model is None:
            model, vae = recorded.get("Model"), vae or recorded.get("VAE")
            refiner = refiner or recorded.get("Refiner")
            loras = loras or recorded.get("Loras")
        interventions = interventions or recorded.get("Interventions")
        if not args.controlnet and recorded.get("ControlNets"):  # they fit the model family, not one model
            args.controlnet = recorded["ControlNets"]
        if not args.adapter and recorded.get("T2I-Adapters"):
            args.adapter = recorded["T2I-Adapters"]
        if not args.ip_adapter and recorded.get("IP-Adapters"):
            args.ip_adapter = recorded["IP-Adapters"]
        embeddings = embeddings or recorded.get("Embeddings")
        try:
            for name in interventions or []:
                check_name(name)
        except ValueError as e:
            raise ValueError(f"--from-png {args.from_png} records an intervention this version lacks: {e}") from None
    else:
        if args.prompt is None:
            raise ValueError("--prompt is required (or --from-png FILE)")
        settings = Settings(prompt=args.prompt)
    flags = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, prompt_2=args.prompt_2,
                 negative_prompt_2=args.negative_prompt_2, width=args.width, height=args.height,
                 steps=args.steps, cfg=args.cfg, sampler=args.sampler, schedule=args.schedule, karras=args.karras,
                 eta=args.eta, s_noise=args.s_noise, gamma=args.gamma, spacing=args.spacing, pag_scale=args.pag_scale,
                 pag_layers=tuple(args.pag_layers) if args.pag_layers else None, apg=args.apg, apg_eta=args.apg_eta,
                 apg_norm_threshold=args.apg_norm_threshold, apg_momentum=args.apg_momentum,
                 cfg_interval=args.cfg_interval,
                 guidance_rescale=args.guidance_rescale, seed=args.seed, num_images=args.num_images,
                 original_size=args.original_size, crop_top_left=args.crop_top_left, target_size=args.target_size,
                 negative_original_size=args.negative_original_size, negative_target_size=args.negative_target_size,
                 negative_crop_top_left=args.negative_crop_top_left,
                 truncate_prompt=args.truncate_prompt, prompt_weights=args.prompt_weights, clip_skip=args.clip_skip,
                 refiner_start=args.refiner_start, aesthetic_score=args.aesthetic_score,
                 negative_aesthetic_score=args.negative_aesthetic_score, init_image=args.init_image,
                 strength=args.strength, mask=args.mask, hires_scale=args.hires_scale,
                 hires_strength=args.hires_strength, hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler,
                 control_images=tuple(args.control_image) if args.control_image else None,
                 control_scales=tuple(scale for _, scale in args.controlnet) if args.controlnet else None,
                 control_start=args.control_start, control_end=args.control_end, guess_mode=args.guess_mode,
                 control_types=tuple(args.control_type) if args.control_type else None,
                 adapter_images=tuple(args.adapter_image) if args.adapter_image else None,
                 adapter_scales=tuple(scale for _, scale in args.adapter) if args.adapter else None,
                 adapter_factor=args.adapter_factor, ip_images=tuple(args.ip_image) if args.ip_image else None,
                 ip_scales=tuple(scale for _, scale in args.ip_adapter) if args.ip_adapter else None)
    settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
    if settings.seed == -1:
        settings = replace(settings, seed=secrets.randbelow(2**32))  # A1111's -1; the PNG records the seed drawn
    recorded_hash = recorded.get("Model hash") if model == recorded.get("Model") else None
    return Request(settings, model or DEFAULT_MODEL, vae, refiner, loras or [], args.controlnet or [], args.adapter or [],
                   args.ip_adapter or [], embeddings or [], interventions or [],
                   recorded_hash)


def _multiple_of_8(name, v):
    if v % 8 == 0 and v >= 8:
        return
    nearest = sorted({n for n in (v - v % 8, v - v % 8 + 8) if n >= 8}) or [8]
    raise ValueError(f"--{name} {v} is not a positive multiple of 8; use {' or '.join(map(str, nearest))}")


def check_settings(s):
    """Everything that can be checked without the model -> s with its init image and mask opened (the model's
    own checks, sampling.settings.check, take them). Raises ValueError with the fix in the message."""
    from sampling.control import read_control_image
    from sampling.images import open_rgb
    from sampling.prompt_editing import prompt_schedule
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
    if s.prompt_weights:  # each text prompt editing gives, over the most calls a run can make (two a step)
        for flag, prompt in [("--prompt", s.prompt), ("--negative-prompt", s.negative_prompt or "")]:
            try:
                for _, text in prompt_schedule(prompt, 2 * max(s.steps, 1)):
                    parse_weights(text)
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
    for flag, paths in [("--control-image", s.control_images), ("--adapter-image", s.adapter_images),
                        ("--ip-image", s.ip_images)]:
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path} does not exist; give the path of an image file")
    return replace(s, init_image=images.get("--init-image", s.init_image), mask=images.get("--mask", s.mask),
                   control_images=tuple(read_control_image(path) for path in s.control_images),
                   adapter_images=tuple(read_control_image(path) for path in s.adapter_images),
                   ip_images=tuple(read_control_image(path) for path in s.ip_images))
