"""Generation parameters in a PNG's `parameters` text chunk, in the format AUTOMATIC1111 writes:

    1girl, solo, blue hair
    Negative prompt: lowres, bad anatomy
    Steps: 28, Sampler: Euler a, CFG scale: 5.0, Seed: 7, Size: 832x1216, Model: animagine-xl-4.0

Keys AUTOMATIC1111 does not have (guidance rescale, SDXL size conditions) follow the same pattern.
Sizes are written WxH like A1111's Size; the crop is written TOPxLEFT.
"""

import json
import re

from sampling.pipeline import Settings

SAMPLER_NAMES = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "ddpm": "DDPM"}
# One "Key: value" field; values holding a comma or colon are JSON-quoted (A1111's own regex).
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value):
    value = str(value)
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def _wxh(hw):
    return f"{hw[1]}x{hw[0]}"


def format_parameters(s: Settings, seed, model_name):
    lines = [s.prompt]
    if s.negative_prompt is not None:  # absent line = no negative prompt (zero conditioning)
        lines.append(f"Negative prompt: {s.negative_prompt}")
    fields = {"Steps": s.steps, "Sampler": SAMPLER_NAMES[s.sampler]}
    if s.karras:
        fields["Schedule type"] = "Karras"
    fields |= {"CFG scale": s.cfg, "Seed": seed, "Size": f"{s.width}x{s.height}", "Model": model_name}
    if s.guidance_rescale:
        fields["Guidance rescale"] = s.guidance_rescale
    if s.original_size:
        fields["Original size"] = _wxh(s.original_size)
    if tuple(s.crop_top_left) != (0, 0):
        fields["Crop top left"] = "x".join(map(str, s.crop_top_left))
    if s.target_size:
        fields["Target size"] = _wxh(s.target_size)
    if s.truncate_prompt:
        fields["Prompt truncation"] = "true"
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text):
    """The inverse of format_parameters -> (Settings with num_images 1, model name). Raises ValueError."""
    *prompt_lines, last = text.strip("\n").split("\n")
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in FIELD.findall(last)}
    if "Steps" not in fields or "Seed" not in fields:
        raise ValueError("its last line is not a parameters line (no 'Steps:' and 'Seed:')")
    negative = None
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            negative = "\n".join([line[len("Negative prompt:"):].lstrip(" ")] + prompt_lines[i + 1:])
            prompt_lines = prompt_lines[:i]
            break
    sampler_name = fields["Sampler"].removesuffix(" Karras")
    samplers = {v: k for k, v in SAMPLER_NAMES.items()}
    if sampler_name not in samplers:
        raise ValueError(f"its sampler {fields['Sampler']!r} is not one of {', '.join(SAMPLER_NAMES.values())}")
    hw = lambda v: tuple(int(n) for n in reversed(v.split("x")))  # "WxH" -> (H, W)
    width, height = (int(n) for n in fields["Size"].split("x"))
    settings = Settings(
        prompt="\n".join(prompt_lines), negative_prompt=negative, width=width, height=height,
        steps=int(fields["Steps"]), cfg=float(fields["CFG scale"]), sampler=samplers[sampler_name],
        karras=fields.get("Schedule type") == "Karras" or fields["Sampler"].endswith(" Karras"),
        guidance_rescale=float(fields.get("Guidance rescale", 0.0)), seed=int(fields["Seed"]),
        original_size=hw(fields["Original size"]) if "Original size" in fields else None,
        crop_top_left=tuple(int(n) for n in fields.get("Crop top left", "0x0").split("x")),
        target_size=hw(fields["Target size"]) if "Target size" in fields else None,
        truncate_prompt=fields.get("Prompt truncation") == "true",
    )
    return settings, fields.get("Model")
