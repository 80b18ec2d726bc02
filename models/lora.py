"""LoRA (Hu et al. 2021): files merged into a loaded SDXL's weights, W += scale * (alpha / rank) * up @ down,
or LyCORIS' (models/lycoris.py). The adapters that train.dreambooth trains are in models/adapters.py.

Formats read: kohya's (`lora_unet_<official module path, dots as underscores>`, or the dialect over
diffusers paths that diffusers' exporter writes, `lora_unet_down_blocks_...`; text encoders as
`lora_te1_` / `lora_te2_` + the Hugging Face CLIP path; `.lora_down.weight` (r, in[, k, k]),
`.lora_up.weight` (out, r[, 1, 1]), a 0-dim `.alpha`, alpha = rank when absent), diffusers/PEFT
(`unet.` / `text_encoder.` / `text_encoder_2.` + diffusers paths, `.lora_A.weight` / `.lora_B.weight`,
or the older `.lora.down.weight` / `.lora.up.weight`), and LoCon convolutions in either. Names are built
forward from the model's own modules (an underscored name cannot be parsed back): `sites(model)` lists
every weight a LoRA can change with the names files give it, and `targets(model)` maps every dialect's
name to it.
"""

import argparse
import fnmatch
import hashlib
import math
import re
import sys
from pathlib import Path

import torch

from models import keys, lycoris
from models.files import LoadError, open_safetensors, read_tensors
from models.text import Projection

SUFFIXES = {  # tensor-name ending -> (format, part)
    ".lora_down.weight": ("kohya", "down"), ".lora_up.weight": ("kohya", "up"), ".alpha": ("kohya", "alpha"),
    ".lora_A.weight": ("peft", "down"), ".lora_B.weight": ("peft", "up"),
    ".lora.down.weight": ("diffusers", "down"), ".lora.up.weight": ("diffusers", "up"),
}


PREFIXES = {"unet": "lora_unet_", "text_encoder_1": "lora_te1_", "text_encoder_2": "lora_te2_"}


def matches(name, pattern):
    """fnmatch for a pattern with wildcards; otherwise the name itself or anything under it ("unet")."""
    return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else name == pattern or name.startswith(pattern + ".")


def sites(model):
    """Every place a LoRA can change, built forward from the model's modules: (official module name, module,
    weight, [(path, rows)]). path is the name LoRA files use (the official path in the UNet, the Hugging Face
    CLIP path in the text encoders); rows picks q, k or v of bigG's fused in_proj (None: the whole weight)."""
    for name, module in model.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield f"unet.{name}", module, module.weight, [(name, None)]
    if model.text_encoder_1 is not None:  # CLIP-L: transformers' names already
        for name, module in model.text_encoder_1.named_modules():
            if isinstance(module, torch.nn.Linear):
                yield f"text_encoder_1.{name}", module, module.weight, [(name, None)]
    width = model.config.text_encoder_2.width
    for name, module in model.text_encoder_2.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer."):
            yield f"text_encoder_2.{name}", module, module.weight, [(keys.openclip_name_to_hf(name + ".weight").removesuffix(".weight"), None)]
        elif isinstance(module, Projection):  # transformer.resblocks.N.attn.in_proj: q, k, v stacked, rows [q; k; v]
            layer = re.match(r"transformer\.resblocks\.(\d+)\.attn", name)[1]
            weight = model.text_encoder_2.get_submodule(name.removesuffix(".in_proj")).in_proj_weight
            yield f"text_encoder_2.{name}", module, weight, [
                (f"text_model.encoder.layers.{layer}.self_attn.{proj}_proj", slice(i * width, (i + 1) * width))
                for i, proj in enumerate("qkv")]


def kohya_name(official, path):
    return (PREFIXES[official.split(".")[0]] + path).replace(".", "_")


def targets(model):
    """Every module name a LoRA file may use -> (weight, rows or None). One entry per dialect: kohya over
    official and diffusers paths, PEFT/diffusers over diffusers paths."""
    out = {}
    te2 = "text_encoder_2" if model.text_encoder_1 is not None else "text_encoder"  # a refiner's only encoder
    for official, _, weight, paths in sites(model):
        for path, rows in paths:
            out[kohya_name(official, path)] = (weight, rows)
            if official.startswith("unet."):
                diffusers = keys.unet_name_to_diffusers(path + ".weight", model.config.unet.num_res_blocks).removesuffix(".weight")
                out[f"lora_unet_{diffusers}".replace(".", "_")] = out[f"unet.{diffusers}"] = (weight, rows)
            else:
                out[f"{'text_encoder' if official.startswith('text_encoder_1') else te2}.{path}"] = (weight, rows)
                # kohya sd-scripts on transformers >= 5 drops text_model. (lora_te1_encoder_layers_0_...)
                out[kohya_name(official, path.removeprefix("text_model."))] = (weight, rows)
    return out


ENDINGS = sorted({**{e: (None if part == "alpha" else "LoRA", part) for e, (_, part) in SUFFIXES.items()},
                  **lycoris.PARTS}.items(), key=lambda item: -len(item[0]))  # the longest ending first
REQUIRED = {"LoRA": [("down",), ("up",)], "LoHa": [("w1a",), ("w1b",), ("w2a",), ("w2b",)],
            "LoKr": [("w1", "w1a"), ("w2", "w2a")], "OFT": [("blocks",)], "IA3": [("ia3",)], "Full": [("diff",)]}


def read_lora(path):
    """A LoRA or LyCORIS file -> {module name: {"kind": "LoRA" | "LoHa" | ..., part: tensor}} (models/lycoris.py
    names the parts), or LoadError naming what is wrong with it."""
    with open_safetensors(path) as f:  # refuses pickles and damaged headers in one line
        names = list(f.keys())
    tensors = dict(read_tensors(path, names, torch.float32))
    groups, kinds = {}, {}
    for key, tensor in tensors.items():
        unsupported = next((kind for ending, kind in lycoris.UNSUPPORTED.items() if key.endswith(ending)), None)
        if unsupported:
            raise LoadError(f"{path} is a {unsupported} file (LyCORIS), which plainxl does not load; LoRA, LoCon, "
                            "LoHa, LoKr, DoRA, OFT, BOFT, IA3 and full-diff files load")
        match = next(((ending, kind_part) for ending, kind_part in ENDINGS if key.endswith(ending)), None)
        if match is None and key.endswith(".weight") and key.removesuffix(".weight") + ".on_input" in tensors:
            match = (".weight", ("IA3", "ia3"))  # IA3's scaling vector: a bare .weight beside .on_input
        if match is None:
            raise LoadError(f"{path}: tensor {key!r} is not part of a LoRA or LyCORIS module (no .lora_down/.lora_up, "
                            "lora_A/lora_B, .hada_/.lokr_/.oft_ factors, .diff or .alpha); is it a LoRA file?")
        module = key[:-len(match[0])].removeprefix("base_model.model.")
        module = re.sub(r"\.processor\.(to_\w+)_lora$", r".\1", module)  # diffusers' oldest attention-processor names
        groups.setdefault(module, {})[match[1][1]] = tensor
        kinds.setdefault(module, set()).update({match[1][0]} - {None})
    for module, parts in groups.items():
        kind = kinds[module].pop() if len(kinds[module]) == 1 else None
        if kind is None:
            raise LoadError(f"{path}: {module} has {'no adapter' if not kinds[module] else 'the tensors of ' + ' and '.join(sorted(kinds[module]))}"
                            "; the file is damaged")
        missing = [need[0] for need in REQUIRED[kind] if not any(n in parts for n in need)]
        if missing:
            raise LoadError(f"{path}: {module} ({kind}) has no {missing[0]} tensor; the file is damaged")
        if not all(t.is_floating_point() for name, t in parts.items() if name not in ("on_input", "alpha")):
            raise LoadError(f"{path}: {module} is not stored as floating point numbers; the file is damaged")
        parts["kind"] = "BOFT" if kind == "OFT" and parts["blocks"].ndim == 4 else kind
    return groups


def lora_arg(text):
    """'FILE[:SCALE]' -> (FILE, SCALE), scale 1.0 when absent (a colon inside a path is left alone); an argparse
    type for every command line that takes LoRAs."""
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
    LoadError before changing anything if the file is empty, no name matches a module, or a shape does not
    fit; modules matching none of the model's are left out with one warning line (when applied). apply=False
    only checks (a model on the meta device will do, so a command line checks its LoRAs before the load)."""
    if not math.isfinite(scale):
        raise LoadError(f"the scale {scale} of {path} is not a number; give e.g. 0.8")
    names = targets(model)
    groups = read_lora(path)
    if not groups:
        raise LoadError(f"{path} holds no tensors, so it would change nothing; is the download complete?")
    unmatched = [m for m in groups if m not in names]
    if len(unmatched) == len(groups):
        raise LoadError(f"{path}: none of its {len(groups)} modules match this model's (its first keys: "
                        f"{', '.join(unmatched[:3])}); is it a LoRA for SDXL?")
    if unmatched and apply:  # (the check before the load stays quiet: one warning per LoRA, not two)
        print(f"warning: {path}: {len(unmatched)} of its {len(groups)} modules match none of this model's and are "
              f"left out, e.g. {', '.join(unmatched[:3])}", file=sys.stderr)
    updates = []  # (param, rows, the new weight or None, the delta or None)
    bias_of = biases(model) if any("diff_b" in parts for parts in groups.values()) else {}
    for module, parts in ((m, p) for m, p in groups.items() if m in names):
        param, rows = names[module]
        target = param[rows] if rows is not None else param
        plain = parts["kind"] == "LoRA" and not {"mid", "dora_scale", "magnitude"} & set(parts)
        if plain:  # W + scale * (alpha / rank) * up @ down
            down, up = parts["down"], parts["up"]
            rank = down.shape[0]
            alpha = float(parts["alpha"]) if "alpha" in parts else rank
            delta = (up.flatten(1) @ down.flatten(1)) * (scale * alpha / rank)  # (out, in * k * k)
            fits = delta.numel() == target.numel() and delta.shape[0] == target.shape[0]
        else:  # LyCORIS (and LoCon's Tucker, DoRA): the new weight itself
            try:
                new = lycoris.merged_weight(parts["kind"], parts, target.detach().float().cpu(), scale)
                fits = new.shape == target.shape
            except (RuntimeError, ValueError, IndexError, ZeroDivisionError):  # factors that do not make this weight
                fits, new = False, None
        if not fits:
            raise LoadError(f"{path}: {module} ({parts['kind']}) does not fit this model's {tuple(target.shape)} weight; "
                            "the file is for another model family")
        updates.append((param, rows, None if plain else new, delta.reshape(target.shape) if plain else None))
        if "diff_b" in parts:  # full-diff's bias difference
            updates.append((bias_of[param], rows, None, scale * parts["diff_b"]))
    with torch.no_grad():
        for param, rows, new, delta in updates if apply else ():
            view = param[rows] if rows is not None else param
            view.copy_((new.to(param.device) if new is not None else view.float() + delta.to(param.device)).to(param.dtype))
    return len(groups) - len(unmatched)


def biases(model):
    """{weight: its bias} over every site (bigG's fused projection: in_proj_bias, rows as its weight's)."""
    out = {}
    for official, module, weight, _ in sites(model):
        owner = model.get_submodule(official.removesuffix(".in_proj")) if isinstance(module, Projection) else module
        out[weight] = owner.in_proj_bias if isinstance(module, Projection) else module.bias
    return out
