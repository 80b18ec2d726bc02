"""LoRA files merged into a loaded SDXL's weights: W += scale * (alpha / rank) * up @ down.

Formats read: kohya's (`lora_unet_<official module path, dots as underscores>`, or the dialect over
diffusers paths that diffusers' exporter writes, `lora_unet_down_blocks_...`; text encoders as
`lora_te1_` / `lora_te2_` + the Hugging Face CLIP path; `.lora_down.weight` (r, in[, k, k]),
`.lora_up.weight` (out, r[, 1, 1]), a 0-dim `.alpha`, alpha = rank when absent), diffusers/PEFT
(`unet.` / `text_encoder.` / `text_encoder_2.` + diffusers paths, `.lora_A.weight` / `.lora_B.weight`,
or the older `.lora.down.weight` / `.lora.up.weight`), and LoCon convolutions in either. Names are built
forward from the model's own modules (an underscored name cannot be parsed back): `targets(model)` maps
every name any dialect uses to the parameter (and, for bigG's fused q/k/v, the rows) it changes.
"""

import hashlib
import math
import re

import torch

from models import keys
from models.files import LoadError, open_safetensors, read_tensors

SUFFIXES = {  # tensor-name ending -> (format, part)
    ".lora_down.weight": ("kohya", "down"), ".lora_up.weight": ("kohya", "up"), ".alpha": ("kohya", "alpha"),
    ".lora_A.weight": ("peft", "down"), ".lora_B.weight": ("peft", "up"),
    ".lora.down.weight": ("diffusers", "down"), ".lora.up.weight": ("diffusers", "up"),
}
LYCORIS = {".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr", ".oft_blocks": "OFT", ".dora_scale": "DoRA"}


def targets(model):
    """Every module name a LoRA file may use -> (parameter, rows or None): rows picks q, k or v of bigG's fused
    in_proj. One entry per dialect: kohya over official and diffusers paths, PEFT/diffusers over diffusers paths."""
    out = {}
    for name, module in model.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            diffusers = keys.unet_name_to_diffusers(name + ".weight", model.config.unet.num_res_blocks)[:-len(".weight")]
            for key in (f"lora_unet_{name}".replace(".", "_"), f"lora_unet_{diffusers}".replace(".", "_"),
                        f"unet.{diffusers}"):
                out[key] = (module.weight, None)
    if model.text_encoder_1 is not None:  # CLIP-L: transformers' names already
        for name, module in model.text_encoder_1.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"lora_te1_{name}".replace(".", "_")] = out[f"text_encoder.{name}"] = (module.weight, None)
    width = model.config.text_encoder_2.width
    te2 = "text_encoder_2" if model.text_encoder_1 is not None else "text_encoder"  # a refiner's only encoder
    for name, module in model.text_encoder_2.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer."):
            hf = keys.openclip_name_to_hf(name + ".weight")[:-len(".weight")]
            out[f"lora_te2_{hf}".replace(".", "_")] = out[f"{te2}.{hf}"] = (module.weight, None)
        elif hasattr(module, "in_proj_weight"):  # q, k, v stacked: rows [q; k; v]
            layer = re.match(r"transformer\.resblocks\.(\d+)\.attn", name)[1]
            for i, proj in enumerate("qkv"):
                hf = f"text_model.encoder.layers.{layer}.self_attn.{proj}_proj"
                rows = slice(i * width, (i + 1) * width)
                out[f"lora_te2_{hf}".replace(".", "_")] = out[f"{te2}.{hf}"] = (module.in_proj_weight, rows)
    return out


def read_lora(path):
    """A LoRA file -> {module name: {"down", "up", "alpha"?}}, or LoadError naming what is wrong with it."""
    with open_safetensors(path) as f:  # refuses pickles and damaged headers in one line
        names = list(f.keys())
    tensors = dict(read_tensors(path, names, torch.float32))
    groups = {}
    for key, tensor in tensors.items():
        for ending, name in LYCORIS.items():
            if ending in key:
                raise LoadError(f"{path} is a {name} (LyCORIS) file, not a LoRA; only LoRA and LoCon load here")
        match = next(((ending, part) for ending, (_, part) in SUFFIXES.items() if key.endswith(ending)), None)
        if match is None:
            raise LoadError(f"{path}: tensor {key!r} is not part of a LoRA (no .lora_down/.lora_up, lora_A/lora_B "
                            "or .alpha); is it a LoRA file?")
        module = key[:-len(match[0])].removeprefix("base_model.model.")
        module = re.sub(r"\.processor\.(to_\w+)_lora$", r".\1", module)  # diffusers' oldest attention-processor names
        groups.setdefault(module, {})[match[1]] = tensor
    for module, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoadError(f"{path}: {module} has no {'up' if 'down' in parts else 'down'} matrix; the file is damaged")
    return groups


def addnet_hash(path):
    """AUTOMATIC1111's LoRA hash (its `Lora hashes`): sha256 of the file after the safetensors header, 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def merge_lora(model, path, scale=1.0, apply=True):
    """Add scale * (alpha / rank) * up @ down to each weight the file names, in float32, cast back. Raises
    LoadError before changing anything if a name matches no module or a shape does not fit; apply=False only
    checks (a model on the meta device will do, so a command line checks its LoRAs before the load)."""
    if not math.isfinite(scale):
        raise LoadError(f"the scale {scale} of {path} is not a number; give e.g. 0.8")
    names = targets(model)
    groups = read_lora(path)
    unmatched = [m for m in groups if m not in names]
    if unmatched:
        raise LoadError(f"{path}: {len(unmatched)} of its {len(groups)} modules match none of this model's, e.g. "
                        f"{', '.join(unmatched[:3])}; is it a LoRA for SDXL?")
    deltas = []
    for module, parts in groups.items():
        param, rows = names[module]
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else rank
        target = param[rows] if rows is not None else param
        delta = (up.flatten(1) @ down.flatten(1)) * (scale * alpha / rank)  # (out, in * k * k)
        if delta.numel() != target.numel() or delta.shape[0] != target.shape[0]:
            raise LoadError(f"{path}: {module} changes a {tuple(delta.shape)} weight but this model's is "
                            f"{tuple(target.shape)}; the LoRA is for another model family")
        deltas.append((param, rows, delta.reshape(target.shape)))
    with torch.no_grad():
        for param, rows, delta in deltas if apply else ():
            view = param[rows] if rows is not None else param
            view.copy_((view.float() + delta.to(param.device)).to(param.dtype))
    return len(groups)
