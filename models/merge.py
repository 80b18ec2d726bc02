"""Merging SDXL checkpoints (official single files), one tensor at a time:

    python -m models.merge sum A.safetensors B.safetensors --alpha 0.3 -o OUT.safetensors [--blocks W0,...,W19]
    python -m models.merge add-difference A B C --alpha 1 -o OUT.safetensors [--blocks ...]
    python -m models.merge bake A.safetensors --lora FILE[:SCALE] [--lora ...] -o OUT.safetensors
    python -m models.merge extract BASE.safetensors TUNED.safetensors (--rank R | --energy E) [--conv-rank R] -o LORA.safetensors

sum is AUTOMATIC1111's weighted sum, (1 - alpha) A + alpha B; add-difference its A + alpha (B - C) (modules/
extras.py). --blocks gives alpha per UNet block as supermerger's 20 SDXL weights: BASE (the text encoders and
the VAE), IN00-IN08 (input_blocks.N; time_embed and label_emb count as IN00), M00 (middle_block), OUT00-OUT08
(output_blocks.N; the final out. counts as OUT08). Non-float tensors (position_ids) and keys that only A has are
A's. The output keeps every key of A, its dtypes and its metadata, and records the recipe as A1111 does
(`sd_merge_recipe`, `sd_merge_models`). Tensors are read with plain file reads, not memory maps, and written
as they are made, so a merge holds a few tensors at a time, not the models.

bake merges LoRA / LyCORIS files into A (models/lora.py: the model is loaded once). extract writes a kohya
LoRA of TUNED - BASE: per module the truncated SVD, up = U_r diag(S_r), down = V_r^T, alpha = r (scale 1), with r
given or the least that keeps the share E of the difference's energy, sum S_i^2 (kohya's extract has no energy
rule, and clamps at a quantile; we keep the exact truncation).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from models.files import LoadError, atomic_file, check_destination, model_hash
from models.lora import lora_arg

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
BLOCKS = ["BASE"] + [f"IN{i:02}" for i in range(9)] + ["M00"] + [f"OUT{i:02}" for i in range(9)]
UNET = "model.diffusion_model."


class Reader:
    """A safetensors file read one tensor at a time with plain reads (the header parsed once)."""

    def __init__(self, path):
        self.path = Path(path)
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        self.start = 8 + size
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header  # name -> {"dtype", "shape", "data_offsets"}

    def tensor(self, name):
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            data = bytearray(f.read(end - begin))
        return torch.frombuffer(data, dtype=torch.uint8).view(DTYPES[entry["dtype"]]).reshape(entry["shape"]) \
            if data else torch.zeros(entry["shape"], dtype=DTYPES[entry["dtype"]])


def write_streaming(dst, entries, make, metadata, overwrite=False):
    """A safetensors file from entries [(name, dtype, shape)], each tensor made by make(name) as it is written
    (to a temporary name, renamed at the end); NaN or inf refused before the rename."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_file(dst, overwrite) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, dtype, shape in entries:
            tensor = make(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise LoadError(f"{name} came out {tuple(tensor.shape)}, not {tuple(shape)}; the inputs do not fit")
            if tensor.is_floating_point() and not tensor.isfinite().all():
                raise LoadError(f"{name} came out NaN or inf, so {dst} was not written; check the inputs")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def block_of(key):
    """supermerger's SDXL block index (0 = BASE ... 19 = OUT08) of an official key."""
    if not key.startswith(UNET):
        return 0
    path = key[len(UNET):]
    if path.startswith(("time_embed.", "label_emb.")):
        return 1
    for prefix, first in (("input_blocks.", 1), ("output_blocks.", 11)):
        if path.startswith(prefix):
            index = int(path.split(".")[1])
            if index > 8:
                raise LoadError(f"{key}: --blocks has weights for SDXL's 9 input and output blocks only")
            return first + index
    return 10 if path.startswith("middle_block.") else 19


def check_family(a, others):
    """Every float tensor of A that a merge reads is in the others with its shape, or a one-line LoadError."""
    for other in others:
        for name, entry in a.header.items():
            theirs = other.header.get(name)
            if name.startswith(UNET) and (theirs is None or theirs["shape"] != entry["shape"]):
                found = "lacks it" if theirs is None else f"has {theirs['shape']}"
                raise LoadError(f"{a.path.name} and {other.path.name} are models of different families or shapes: "
                                f"{name} is {entry['shape']} in the first, the second {found}; merge models of one family")


def recipe(method, alpha, paths, blocks):
    """AUTOMATIC1111's sd_merge_recipe and sd_merge_models (sha256 of each file), plus the block weights."""
    hashes = [model_hash(p) if p else None for p in paths]
    merge = {"type": "plainxl", "primary_model_hash": hashes[0], "secondary_model_hash": hashes[1],
             "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None, "interp_method": method,
             "multiplier": alpha, "block_weights": blocks, "save_as_half": False, "bake_in_vae": None,
             "discard_weights": "", "is_inpainting": False, "is_instruct_pix2pix": False}
    models = {h: {"name": Path(p).stem} for h, p in zip(hashes, paths) if p}
    return {"sd_merge_recipe": json.dumps(merge), "sd_merge_models": json.dumps(models)}


def merge(paths, dst, method, alpha, blocks=None, overwrite=False):
    """sum (A, B) or add-difference (A, B, C) -> dst, one tensor at a time."""
    readers = [Reader(p) for p in paths]
    a, others = readers[0], readers[1:]
    check_family(a, others)

    def make(name):
        tensor = a.tensor(name)
        if not tensor.is_floating_point() or any(name not in r.header for r in others):
            return tensor  # position_ids and A's own keys
        weight = blocks[block_of(name)] if blocks else alpha
        b = others[0].tensor(name).float()
        if method == "sum":
            return (1 - weight) * tensor.float() + weight * b
        return tensor.float() + weight * (b - others[1].tensor(name).float())

    entries = [(name, DTYPES[e["dtype"]], e["shape"]) for name, e in a.header.items()]
    write_streaming(dst, entries, make, a.metadata | recipe(method, alpha, paths, blocks), overwrite)


def bake(path, loras, dst, overwrite=False):
    """A with LoRA / LyCORIS files merged in (in order) -> dst with every key and the metadata of A."""
    from models.loading import load
    from models.lora import merge_lora
    from models.single_file import single_file_prefixes

    a = Reader(path)
    model = load(path)
    for lora, scale in loras:
        merge_lora(model, lora, scale)
    prefixes = single_file_prefixes(model.config)
    tensors = {prefixes[c] + k: v for c in prefixes for k, v in getattr(model, c).state_dict().items()}
    entries = [(name, DTYPES[e["dtype"]], e["shape"]) for name, e in a.header.items()]
    baked = {"plainxl.baked_loras": json.dumps([[str(p), s] for p, s in loras])}
    write_streaming(dst, entries, lambda name: tensors[name] if name in tensors else a.tensor(name),
                    a.metadata | baked, overwrite)


def extract(base_path, tuned_path, dst, rank=None, energy=None, conv_rank=0, overwrite=False):
    """A kohya LoRA of tuned - base over kohya's default modules (and the convolutions, with conv_rank) -> dst."""
    from models.adapters import CONV_TARGETS, KOHYA_TARGETS
    from models.lora import Projection, kohya_name, matches, sites
    from models.sdxl import SDXL, single_file_prefixes
    from models.single_file import read_config

    config, _ = read_config(base_path)
    base, tuned = Reader(base_path), Reader(tuned_path)
    check_family(base, [tuned])
    with torch.device("meta"):
        shell = SDXL(config)  # names and shapes only
    prefixes = single_file_prefixes(config)
    patterns = KOHYA_TARGETS + (CONV_TARGETS if conv_rank else ())
    tensors = {}
    for official, module, _, paths in sites(shell):
        if not any(matches(official, p) for p in patterns):
            continue
        component, rest = official.split(".", 1)
        key = prefixes[component] + (rest + "_weight" if isinstance(module, Projection) else rest + ".weight")
        difference = tuned.tensor(key).float() - base.tensor(key).float()
        for path, rows in paths:
            part = difference[rows] if rows is not None else difference
            if not part.any():
                continue  # an unchanged module (a frozen text encoder): nothing to write
            r = conv_rank if part.ndim == 4 and part.shape[2:].numel() > 1 else rank
            up, down = low_rank(part, r, energy)
            name = kohya_name(official, path)
            if part.ndim == 4:  # LoCon: down keeps the kernel, up is 1x1
                up, down = up[:, :, None, None], down.reshape(down.shape[0], *part.shape[1:])
            tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(float(down.shape[0]))}
    if not tensors:
        raise LoadError(f"{tuned_path} equals {base_path} in every module a LoRA covers; there is nothing to extract")
    entries = [(n, torch.float32, t.shape) for n, t in tensors.items()]
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
            "plainxl.extracted_from": json.dumps([Path(base_path).name, Path(tuned_path).name, rank, energy])}
    write_streaming(dst, entries, tensors.__getitem__, meta, overwrite)


def low_rank(difference, rank, energy):
    """(up (out, r), down (r, in * k * k)) of the truncated SVD: rank r, or the least r whose singular values
    keep the share `energy` of sum S_i^2."""
    U, S, Vh = torch.linalg.svd(difference.flatten(1), full_matrices=False)
    if energy is not None:
        share = torch.cumsum(S**2, 0) / (S**2).sum()
        rank = int(torch.searchsorted(share, torch.tensor(energy) - 1e-7)) + 1
    rank = max(1, min(rank, S.numel()))
    return U[:, :rank] * S[:rank], Vh[:rank]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models.merge", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, count in (("sum", 2), ("add-difference", 3)):
        p = commands.add_parser(name)
        p.add_argument("models", nargs=count, type=Path)
        p.add_argument("--alpha", type=float, required=True)
        p.add_argument("--blocks", help="20 comma-separated weights: BASE, IN00-IN08, M00, OUT00-OUT08 (supermerger's)")
    p = commands.add_parser("bake")
    p.add_argument("models", nargs=1, type=Path)
    p.add_argument("--lora", action="append", type=lora_arg, required=True, metavar="FILE[:SCALE]")  # as generate's
    p = commands.add_parser("extract")
    p.add_argument("models", nargs=2, type=Path, metavar=("BASE", "TUNED"))
    p.add_argument("--rank", type=int)
    p.add_argument("--energy", type=float, help="keep this share of each difference's energy (sum of S^2), e.g. 0.9")
    p.add_argument("--conv-rank", type=int, default=0, help="also the 3x3 convolutions, at this rank (LoCon)")
    for p in commands.choices.values():
        p.add_argument("-o", "--out", type=Path, required=True)
        p.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        for path in args.models + [Path(lora) for lora, _ in getattr(args, "lora", None) or []]:
            if not path.is_file() or path.suffix != ".safetensors":
                raise LoadError(f"{path} is not a .safetensors file; merges read official single files (convert a "
                                "diffusers folder with python -m models.convert)")
        check_destination(args.out, args.overwrite, "file")
        if args.command in ("sum", "add-difference"):
            blocks = [float(w) for w in args.blocks.split(",")] if args.blocks else None
            if blocks is not None and len(blocks) != len(BLOCKS):
                raise LoadError(f"--blocks has {len(blocks)} weights; SDXL takes 20: {', '.join(BLOCKS)}")
            merge(args.models, args.out, args.command, args.alpha, blocks, args.overwrite)
        elif args.command == "bake":
            bake(args.models[0], args.lora, args.out, args.overwrite)
        else:
            if (args.rank is None) == (args.energy is None) or not (args.energy is None or 0 < args.energy <= 1):
                raise LoadError("give --rank R or --energy E (a share in (0, 1]), one of them")
            extract(*args.models, args.out, args.rank, args.energy, args.conv_rank, args.overwrite)
    except (LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
