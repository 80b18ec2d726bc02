"""Generation parameters in a PNG's `parameters` text chunk, in the format AUTOMATIC1111 writes:

    1girl, solo, blue hair
    Negative prompt: lowres, bad anatomy
    Steps: 28, Sampler: Euler a, CFG scale: 5.0, Seed: 7, Size: 832x1216, Model: animagine-xl-4.0

Keys AUTOMATIC1111 does not have (guidance rescale, SDXL size conditions, init image, mask, aesthetic
scores) follow the same pattern; the image-conditioned ones are A1111's where it has them: `Denoising
strength` (img2img's strength, or the hi-res pass's), `Refiner: name [hash]`, `Refiner switch at`,
`Hires upscale`, `Hires steps`, `Hires upscaler`, and `Emphasis: None` for literal prompts. The init
image and mask are recorded by path, as given: --from-png reads them from there again.
Sizes are written WxH like A1111's Size; the crop is written TOPxLEFT. `Model hash` is A1111's (sha256
of the file, 10 hex digits), the one key it switches checkpoints on. A prompt with a line that starts
with "Negative prompt:" gets `Prompt lines: N`, so that it reads back as the same prompt.

Samplers and schedules carry A1111's labels (`Sampler: DPM++ 2M, Schedule type: Karras`; sampling/names.py);
on input its k_ aliases, ComfyUI's names, the pre-1.9 combined names ("DPM++ 2M Karras") and "Automatic" (the
sampler's own schedule in A1111) are read too. `Timesteps: diffusers` is ours: the run used diffusers'
scheduler's schedule (--schedule default, --karras), which A1111 has no label for. A1111's ENSD (a reseed
of its GPU generators) has no meaning with plainxl's per-image CPU generators and is not read.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

from sampling.names import SCHEDULE_LABELS, canonical_sampler, read_sampler, resolved_schedule, sampler_label
from sampling.settings import Settings

# One "Key: value" field; values holding a comma or colon are JSON-quoted (A1111's own regex).
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value):
    value = str(value)
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def _wxh(hw):
    return f"{hw[1]}x{hw[0]}"


NEGATIVE = "Negative prompt:"


UPSCALER_NAMES = {"latent": "Latent", "lanczos": "Lanczos"}
DEFAULTS = Settings(prompt="")


def _sampler_fields(s, schedule):
    """The sampler's settings beyond its label and schedule type, in A1111's keys where it has them."""
    fields = {"Timesteps": "diffusers"} if schedule == "default" else {}  # ours: diffusers' scheduler's own timesteps
    sampler = canonical_sampler(s.sampler)
    if sampler == "uni_pc_bh2":
        fields["UniPC variant"] = "bh2"
    if s.eta != 1.0:
        fields["Eta"] = s.eta
    if s.s_noise != 1.0:
        fields["Sigma noise"] = s.s_noise
    if s.gamma is not None:
        fields["TCD gamma"] = s.gamma
    if s.spacing:
        fields["Timestep spacing"] = s.spacing
    return fields


def _guidance_fields(s):
    fields = {"PAG scale": s.pag_scale, "PAG layers": " ".join(s.pag_layers)} if s.pag_scale else {}
    if s.apg:
        fields |= {"APG eta": s.apg_eta, "APG norm threshold": s.apg_norm_threshold, "APG momentum": s.apg_momentum}
    if s.cfg_interval:
        fields["CFG interval"] = ",".join(map(str, s.cfg_interval))
    return fields


def format_parameters(s: Settings, seed, model_name, model_hash=None, vae=None, refiner=None, refiner_hash=None,
                      loras=(), interventions=(), embeddings=(), controlnets=(), adapters=(), ip_adapters=()):
    """`loras`: (path, scale, A1111 hash) of each LoRA merged into the model, written as A1111's `Lora hashes`
    (name: hash) and our `Loras` (the paths and scales, JSON, for --from-png); `interventions`: the names
    sampling.generate --intervention took, as our `Interventions` (JSON); `embeddings`: (name, path, A1111
    hash) of each embedding the prompts use, as A1111's `TI hashes` and our `Embeddings` (paths, JSON);
    `controlnets`: (source, scale) of each ControlNet, as A1111's `ControlNet N` (its extension's fields) and our
    `ControlNets` ([source, scale, control image] JSON, with `Control start`, `Control end`, `Guess mode`);
    `adapters`, `ip_adapters`: (source, scale) of each T2I-Adapter and IP-Adapter, as our `T2I-Adapters` (the same
    JSON) with `Adapter factor`, and `IP-Adapters`."""
    lines = [s.prompt]
    if s.negative_prompt is not None:  # absent line = no negative prompt (zero conditioning)
        lines.append(f"{NEGATIVE} {s.negative_prompt}")
    fields = {"Steps": s.steps, "Sampler": sampler_label(s.sampler)}
    schedule = resolved_schedule(s.sampler, s.schedule)
    if schedule != "default" or s.karras:
        fields["Schedule type"] = "Karras" if schedule == "default" else SCHEDULE_LABELS[schedule]
    fields |= {"CFG scale": s.cfg, "Seed": seed, "Size": f"{s.width}x{s.height}"} | _sampler_fields(s, schedule)
    if model_hash:
        fields["Model hash"] = model_hash
    fields["Model"] = model_name
    if vae:
        fields["VAE"] = vae
    if loras:
        fields["Lora hashes"] = ", ".join(f"{Path(path).stem}: {digest}" for path, _, digest in loras)
        fields["Loras"] = json.dumps([[str(path), scale] for path, scale, _ in loras])
    if embeddings:  # A1111 drops ':' and ',' from a name here
        fields["TI hashes"] = ", ".join(f"{re.sub('[:,]', '', name)}: {digest}" for name, _, digest in embeddings)
        fields["Embeddings"] = json.dumps([str(path) for _, path, _ in embeddings])
    if interventions:
        fields["Interventions"] = json.dumps(list(interventions))
    fields |= _control_fields(s, controlnets, adapters, ip_adapters)
    for key, name in [("prompt_2", "Prompt 2"), ("negative_prompt_2", "Negative prompt 2")]:  # ours: diffusers'
        if getattr(s, key) is not None:
            fields[name] = getattr(s, key)
    if s.guidance_rescale:
        fields["Guidance rescale"] = s.guidance_rescale
    fields |= _guidance_fields(s)
    if s.original_size:
        fields["Original size"] = _wxh(s.original_size)
    if tuple(s.crop_top_left) != (0, 0):
        fields["Crop top left"] = "x".join(map(str, s.crop_top_left))
    if s.target_size:
        fields["Target size"] = _wxh(s.target_size)
    if s.negative_original_size and s.negative_target_size:  # diffusers reads them only as a pair
        fields |= {"Negative original size": _wxh(s.negative_original_size),
                   "Negative crop top left": "x".join(map(str, s.negative_crop_top_left)),
                   "Negative target size": _wxh(s.negative_target_size)}
    if s.truncate_prompt:
        fields["Prompt truncation"] = "true"
    if s.clip_skip:  # not A1111's "Clip skip" (which it does not apply to SDXL): diffusers' meaning
        fields["Diffusers clip skip"] = s.clip_skip
    if not s.prompt_weights:
        fields["Emphasis"] = "None"
    if s.init_image is not None:
        fields["Init image"] = s.init_image
        if s.mask is not None:
            fields["Mask"] = s.mask
    if s.init_image is not None or s.hires_scale:
        fields["Denoising strength"] = s.hires_strength if s.hires_scale else s.strength
    if refiner:
        fields["Refiner"] = f"{refiner} [{refiner_hash}]" if refiner_hash else refiner
        fields["Refiner switch at"] = s.refiner_start
    for key, name in [("aesthetic_score", "Aesthetic score"), ("negative_aesthetic_score", "Negative aesthetic score")]:
        if getattr(s, key) != getattr(DEFAULTS, key):
            fields[name] = getattr(s, key)
    if s.hires_scale:
        fields["Hires upscale"] = s.hires_scale
        if s.hires_steps:
            fields["Hires steps"] = s.hires_steps
        fields["Hires upscaler"] = UPSCALER_NAMES[s.hires_upscaler]
    prompt_lines = s.prompt.split("\n")
    if any(line.startswith(NEGATIVE) for line in prompt_lines):
        fields["Prompt lines"] = len(prompt_lines)
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def _numbers(fields, key, count, sep, kind=int, default=None):
    """fields[key] as `count` numbers joined by `sep` (a tuple; one number alone), or ValueError naming it."""
    if key not in fields:
        if default is None:
            raise ValueError(f"its parameters have no '{key}:' field")
        return default
    parts = str(fields[key]).split(sep) if sep else [str(fields[key])]
    try:
        if len(parts) != count:
            raise ValueError
        values = tuple(kind(p) for p in parts)
    except ValueError:
        form = sep.join(["N"] * count) if sep else ("a whole number" if kind is int else "a number")
        raise ValueError(f"its '{key}: {fields[key]}' is not {form}") from None
    return values if sep else values[0]


def _emphasis(fields):
    """A1111's Emphasis key -> prompt_weights: "Original" (its default) weights, "None" reads literally."""
    value = fields.get("Emphasis", "Original")
    if value not in ("Original", "None"):
        raise ValueError(f"its 'Emphasis: {value}' is not implemented here (only Original and None)")
    return value == "Original"


def _sampling_settings(fields):
    """The sampler, schedule and guidance Settings fields a parameters line gives (A1111's, Forge's or ours)."""
    sampler, schedule = read_sampler(str(fields.get("Sampler", "Euler a")), fields.get("Schedule type"),
                                     fields.get("UniPC variant"))
    for key, value in [("Hires sampler", fields.get("Sampler")), ("Hires schedule type", fields.get("Schedule type"))]:
        if fields.get(key, value) != value:
            raise ValueError(f"its '{key}: {fields[key]}' differs from the first pass's, which the hi-res pass "
                             "here always uses; re-run it with one sampler and schedule")
    for key in ("Beta schedule alpha", "Beta schedule beta"):  # A1111's Beta options; ComfyUI's and ours: 0.6
        if _numbers(fields, key, 1, None, float, 0.6) != 0.6:
            raise ValueError(f"its '{key}: {fields[key]}' is not implemented here (the beta schedule uses 0.6, 0.6)")
    karras = False
    if fields.get("Timesteps") == "diffusers":  # written by plainxl: diffusers' schedule, maybe with its Karras
        karras, schedule = fields.get("Schedule type") == "Karras", "default"
    number = lambda key, default: _numbers(fields, key, 1, None, float, default)  # noqa: E731
    return dict(sampler=sampler, schedule=schedule, karras=karras, eta=number("Eta", 1.0),
                s_noise=number("Sigma noise", 1.0), gamma=number("TCD gamma", 0.3) if "TCD gamma" in fields else None, spacing=fields.get("Timestep spacing"),
                pag_scale=number("PAG scale", 0.0), pag_layers=tuple(str(fields.get("PAG layers", "mid")).split()),
                apg="APG eta" in fields, apg_eta=number("APG eta", DEFAULTS.apg_eta),
                apg_norm_threshold=number("APG norm threshold", DEFAULTS.apg_norm_threshold),
                apg_momentum=number("APG momentum", DEFAULTS.apg_momentum),
                cfg_interval=_numbers(fields, "CFG interval", 2, ",", float) if "CFG interval" in fields else None)


def _control_fields(s, controlnets, adapters, ip_adapters):
    """format_parameters' ControlNet, T2I-Adapter and IP-Adapter fields (see there)."""
    fields = {}
    for i, (source, scale) in enumerate(controlnets):
        mode = "My prompt is more important" if s.guess_mode else "Balanced"
        fields[f"ControlNet {i}"] = (f"Model: {Path(str(source)).stem}, Weight: {scale}, Guidance Start: "
                                     f"{s.control_start}, Guidance End: {s.control_end}, Control Mode: {mode}")
    if controlnets:
        fields["ControlNets"] = _models_json(controlnets, s.control_images, s.control_types or (None,) * len(controlnets))
        fields |= {"Control start": s.control_start, "Control end": s.control_end, "Guess mode": str(s.guess_mode)}
    if adapters:
        fields["T2I-Adapters"] = _models_json(adapters, s.adapter_images)
        fields["Adapter factor"] = s.adapter_factor
    if ip_adapters:
        fields["IP-Adapters"] = _models_json(ip_adapters, s.ip_images)
    return fields


def parse_parameters(text):
    """The inverse of format_parameters -> (Settings with num_images 1, {recorded key: value}).

    Raises ValueError naming the first field that is missing or malformed."""
    *prompt_lines, last = text.rstrip("\n").split("\n")
    fields = {}
    for key, value in FIELD.findall(last):
        try:
            fields[key] = json.loads(value) if value.startswith('"') else value
        except ValueError:
            raise ValueError(f"its '{key}:' value {value} is not a valid quoted string") from None
    if "Steps" not in fields or "Seed" not in fields:
        raise ValueError("its last line is not a parameters line (no 'Steps:' and 'Seed:')")
    count = _numbers(fields, "Prompt lines", 1, None, default=-1)
    negative = None
    if count >= 0:  # the prompt itself has a "Negative prompt:" line: the count says where it ends
        if count > len(prompt_lines):
            raise ValueError(f"its 'Prompt lines: {count}' is more than the {len(prompt_lines)} lines it has")
        prompt_lines, rest = prompt_lines[:count], prompt_lines[count:]
    else:
        starts = [i for i, line in enumerate(prompt_lines) if line.startswith(NEGATIVE)][:1]
        prompt_lines, rest = (prompt_lines[:starts[0]], prompt_lines[starts[0]:]) if starts else (prompt_lines, [])
    if rest:
        if not rest[0].startswith(NEGATIVE):
            raise ValueError(f"the line after its prompt does not start with '{NEGATIVE}'")
        negative = "\n".join([rest[0][len(NEGATIVE):].removeprefix(" ")] + rest[1:])  # the one space we write
    hw = lambda key: tuple(reversed(_numbers(fields, key, 2, "x"))) if key in fields else None  # "WxH" -> (H, W)
    width, height = _numbers(fields, "Size", 2, "x")
    settings = Settings(
        prompt="\n".join(prompt_lines), negative_prompt=negative, width=width, height=height,
        prompt_2=fields.get("Prompt 2"), negative_prompt_2=fields.get("Negative prompt 2"),
        steps=_numbers(fields, "Steps", 1, None), cfg=_numbers(fields, "CFG scale", 1, None, float, 5.0),
        **_sampling_settings(fields), guidance_rescale=_numbers(fields, "Guidance rescale", 1, None, float, 0.0),
        seed=_numbers(fields, "Seed", 1, None), original_size=hw("Original size"),
        crop_top_left=_numbers(fields, "Crop top left", 2, "x", default=(0, 0)), target_size=hw("Target size"),
        negative_original_size=hw("Negative original size"), negative_target_size=hw("Negative target size"),
        negative_crop_top_left=_numbers(fields, "Negative crop top left", 2, "x", default=(0, 0)),
        truncate_prompt=fields.get("Prompt truncation") == "true",
        clip_skip=_numbers(fields, "Diffusers clip skip", 1, None) if "Diffusers clip skip" in fields else None,
        prompt_weights=_emphasis(fields),
        aesthetic_score=_numbers(fields, "Aesthetic score", 1, None, float, DEFAULTS.aesthetic_score),
        negative_aesthetic_score=_numbers(fields, "Negative aesthetic score", 1, None, float,
                                          DEFAULTS.negative_aesthetic_score),
        init_image=fields.get("Init image"), mask=fields.get("Mask"),
        refiner_start=_numbers(fields, "Refiner switch at", 1, None, float, DEFAULTS.refiner_start),
    )
    strength = _numbers(fields, "Denoising strength", 1, None, float, DEFAULTS.strength)
    if "Hires upscale" in fields:
        upscalers = {v: k for k, v in UPSCALER_NAMES.items()}
        if fields.get("Hires upscaler", "Latent") not in upscalers:
            raise ValueError(f"its hi-res upscaler {fields['Hires upscaler']!r} is not one of "
                             f"{', '.join(UPSCALER_NAMES.values())}")
        settings = replace(settings, hires_scale=_numbers(fields, "Hires upscale", 1, None, float),
                           hires_strength=strength, hires_steps=_numbers(fields, "Hires steps", 1, None, int, 0) or None,
                           hires_upscaler=upscalers[fields.get("Hires upscaler", "Latent")])
    else:
        settings = replace(settings, strength=strength)
    recorded = {k: fields[k] for k in ("Model", "Model hash", "VAE") if k in fields}
    if "Loras" in fields:
        try:
            loras = json.loads(fields["Loras"])
            recorded["Loras"] = [(str(path), float(scale)) for path, scale in loras]
        except (ValueError, TypeError):
            raise ValueError("its 'Loras:' value is not a list of [path, scale]") from None
    if "Embeddings" in fields:
        try:
            recorded["Embeddings"] = [str(path) for path in json.loads(fields["Embeddings"])]
        except (ValueError, TypeError):
            raise ValueError("its 'Embeddings:' value is not a list of paths") from None
    if "Interventions" in fields:
        try:
            recorded["Interventions"] = [str(name) for name in json.loads(fields["Interventions"])]
        except (ValueError, TypeError):
            raise ValueError("its 'Interventions:' value is not a list of names") from None
    settings = _control_settings(fields, settings, recorded)
    if "Refiner" in fields:  # "name [hash]", as A1111 writes it; the name alone without a hash
        recorded["Refiner"] = re.sub(r" \[[0-9a-f]{10}\]$", "", str(fields["Refiner"]))
    return settings, recorded


def _control_settings(fields, settings, recorded):
    """parse_parameters' ControlNet, T2I-Adapter and IP-Adapter fields -> settings with their images, scales and
    windows; the models' sources and scales go into `recorded`."""
    if "ControlNets" in fields:
        recorded["ControlNets"], images, types = _models_with_images(fields, "ControlNets")
        settings = replace(settings, control_images=images, control_scales=tuple(s for _, s in recorded["ControlNets"]),
                           control_types=types if any(t is not None for t in types) else (),
                           control_start=_numbers(fields, "Control start", 1, None, float, 0.0),
                           control_end=_numbers(fields, "Control end", 1, None, float, 1.0),
                           guess_mode=fields.get("Guess mode") == "True")
    if "T2I-Adapters" in fields:
        recorded["T2I-Adapters"], images, _ = _models_with_images(fields, "T2I-Adapters")
        settings = replace(settings, adapter_images=images, adapter_scales=tuple(s for _, s in recorded["T2I-Adapters"]),
                           adapter_factor=_numbers(fields, "Adapter factor", 1, None, float, 1.0))
    if "IP-Adapters" in fields:
        recorded["IP-Adapters"], images, _ = _models_with_images(fields, "IP-Adapters")
        settings = replace(settings, ip_images=images, ip_scales=tuple(s for _, s in recorded["IP-Adapters"]))
    return settings


def _models_json(models, images, kinds=None):
    """[[model, scale, image(, ControlNet-Union's kind)]] as JSON: what _models_with_images reads."""
    kinds = [(kind,) for kind in kinds] if kinds is not None else [()] * len(models)
    return json.dumps([[str(m), scale, str(image), *kind] for (m, scale), image, kind in zip(models, images, kinds)])


def _models_with_images(fields, key):
    """A recorded list of [model, scale, image(, ControlNet-Union's kind)] -> ([(model, scale)], images, kinds)."""
    try:
        entries = [list(entry) for entry in json.loads(fields[key])]
        models, images = [(str(e[0]), float(e[1])) for e in entries], tuple(str(e[2]) for e in entries)
    except (ValueError, TypeError, IndexError):
        raise ValueError(f"its '{key}:' value is not a list of [model, scale, image]") from None
    return models, images, tuple(e[3] if len(e) > 3 else None for e in entries)
