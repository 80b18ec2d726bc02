"""Load and save SDXL models: official single files, diffusers folders, Hugging Face repo ids.

Loading builds the model on the meta device (no random weights are ever allocated), reads the
safetensors tensors one at a time, casts each to the target dtype and assigns it in place, so the
peak memory is about the size of the weights at that dtype. Every problem with the input becomes
a LoadError: one sentence naming the problem and the fix. Pickle files are refused, never opened.
"""

import json
import math
import mmap
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models import convert, text, unet, vae
from models.sdxl import SDXL, SDXLConfig, single_file_prefixes

CONFIG_METADATA_KEY = "plainxl.config"  # our exports store the full SDXLConfig as JSON here
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


class LoadError(Exception):
    """Bad input to a loader or saver; the message is the whole explanation (no traceback needed)."""


# ----------------------------------------------------------------------------- entry points


def load(source, dtype=None, device="cpu"):
    """Load an SDXL model.

    Args:
        source: an official single file (.safetensors), a diffusers folder, or a Hugging Face repo id
            ("cagliostrolab/animagine-xl-4.0", or "owner/name/file.safetensors" for one file of a repo).
        dtype: torch dtype or "fp32"/"fp16"/"bf16" for the floating tensors; None keeps the file's.
        device: where the model ends up; the file is read on the CPU.
    Returns: models.sdxl.SDXL in eval mode. Raises LoadError for any bad input.
    """
    dtype = DTYPES.get(dtype, dtype)
    path = resolve(source)
    if path.is_dir():
        from models.diffusers_layout import load_diffusers  # imports this module, hence imported here

        return load_diffusers(path, dtype).to(device).eval()
    model = load_single_file(path, dtype)
    return model.to(device).eval()


# The project's own tiny model, trained by configs/tiny_*.py and shipped in the package (no download).
BUNDLED = {"plainxl-tiny": Path(__file__).with_name("plainxl-tiny.safetensors")}


def resolve(source):
    """A local path as it is; "plainxl-tiny" the bundled model; a repo id through the Hugging Face cache (models.hub)."""
    bundled = BUNDLED.get(str(source))
    if bundled is not None:
        if not bundled.is_file():
            raise LoadError(f"the bundled model {source} is missing from this install ({bundled}); "
                            "reinstall plainxl, or train it as the README's 'Reproducing it' says.")
        return bundled
    path = Path(source).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?", str(source)) and not str(source).startswith("."):
        from models.hub import download

        return download(str(source))
    raise LoadError(f"{source} does not exist; pass a .safetensors file, a diffusers folder or a Hugging Face repo id.")


def _check_not_pickle(path):
    with open(path, "rb") as f:
        head = f.read(2)
    # Torch's zip checkpoints start with "PK", raw pickles with the protocol byte 0x80.
    if path.suffix in PICKLE_SUFFIXES or head == b"PK" or head[:1] == b"\x80":
        raise LoadError(
            f"{path} is a pickle checkpoint, which can run arbitrary code when opened, so it is not loaded; "
            "convert it to .safetensors with a tool you trust, or download the .safetensors version."
        )


def _open(path):
    """safetensors' own reader, for the header: names, shapes, metadata, and its validity checks."""
    _check_not_pickle(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"{path} is truncated or not a valid safetensors file ({e}); download it again.") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path, names, dtype=None):
    """Yield (name, tensor) for `names` of a safetensors file (already checked by _open), cast to dtype.

    The file is memory-mapped copy-on-write: a tensor the cast leaves alone is a view of the map (no
    copy; writes stay private). When the cast copies, the pages of the original are released right
    away, so the peak is the weights at the target dtype, not that plus the file (fp16 -> fp32 of
    SDXL: 13 GiB instead of 19.7).
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")  # layout: u64 length, JSON header, data
        header = json.loads(f.read(header_len))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data_start = 8 + header_len
    for name in names:
        info = header[name]
        begin, end = (data_start + o for o in info["data_offsets"])
        stored = SAFETENSORS_DTYPES[info["dtype"]]
        if end == begin:
            t = torch.empty(info["shape"], dtype=stored)
        else:
            t = torch.frombuffer(mm, dtype=stored, count=(end - begin) // stored.itemsize, offset=begin)
            t = t.reshape(info["shape"])
        cast = _cast(t, dtype)
        if cast is not t and end - begin > mmap.PAGESIZE and hasattr(mm, "madvise"):  # madvise: not on Windows
            # Release only whole pages inside this tensor; a page shared with a neighbour stays.
            lo = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = end // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        yield name, cast


# ----------------------------------------------------------------------------- checking


IGNORED = ("position_ids", "logit_scale", "denoiser.sigmas")  # unused buffers some files carry


def _ignored(name):
    return name.endswith(IGNORED)


def check_tensors(found, expected, where):
    """Compare {name: shape} of a file with what the model needs; raise one LoadError if they differ."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and not _ignored(n)]
    wrong = [n for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    if missing:
        raise LoadError(f"{where} is missing {len(missing)} tensors the model needs (e.g. {', '.join(missing[:3])}); "
                        "the file is incomplete or not an SDXL checkpoint.")
    if unexpected:
        raise LoadError(f"{where} has {len(unexpected)} tensors an SDXL model does not have "
                        f"(e.g. {', '.join(unexpected[:3])}); it is a different architecture or a modified file.")
    if wrong:
        n = wrong[0]
        raise LoadError(f"{where}: tensor {n} has shape {list(found[n])}, but the rest of the file implies "
                        f"{list(expected[n])} ({len(wrong)} tensors differ); the file is damaged or not SDXL.")


def _identify(names, path):
    """Refuse files that are not SDXL checkpoints, saying what they are."""
    names = list(names)
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        raise LoadError(f"{path} is an SD 1.x checkpoint; this project loads SDXL (base, refiner or a fine-tune).")
    if any(n.startswith("cond_stage_model.model.") for n in names):
        raise LoadError(f"{path} is an SD 2.x checkpoint; this project loads SDXL (base, refiner or a fine-tune).")
    if any("lora" in n.lower() for n in names[:50]):
        raise LoadError(f"{path} is a LoRA, not a full checkpoint; load the SDXL model it was trained on instead.")
    if any(n.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for n in names):
        raise LoadError(f"{path} holds one component in diffusers layout; pass the diffusers folder that contains it.")
    if not any(n.startswith("model.diffusion_model.") for n in names):
        raise LoadError(f"{path} is not an SDXL checkpoint: it has no model.diffusion_model.* tensors "
                        f"(it has e.g. {', '.join(names[:3]) or 'nothing'}).")
    if not any(n.startswith("conditioner.embedders.") for n in names):
        raise LoadError(f"{path} has a UNet but no text encoders (conditioner.embedders.*); pass a full SDXL checkpoint.")


# ----------------------------------------------------------------------------- single file


def load_single_file(path, dtype=None):
    """Official layout: each component is a prefix strip away from our module's state_dict."""
    path = Path(path)
    with _open(path) as f:
        names = list(f.keys())
        _identify(names, path)
        shapes = {n: f.get_slice(n).get_shape() for n in names}
        metadata = f.metadata() or {}
        if CONFIG_METADATA_KEY in metadata:
            cfg = config_from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        else:
            cfg = infer_config(shapes, path)
        with torch.device("meta"):
            model = SDXL(cfg)
        prefixes = single_file_prefixes(cfg)
        expected = {prefix + k: v.shape for c, prefix in prefixes.items() for k, v in getattr(model, c).state_dict().items()}
        check_tensors(shapes, expected, str(path))
    state_dicts = {component: {} for component in prefixes}
    for name, t in read_tensors(path, list(expected), dtype):  # one pass over the file
        component = next(c for c, prefix in prefixes.items() if name.startswith(prefix))
        state_dicts[component][name[len(prefixes[component]):]] = t
    for component, sd in state_dicts.items():
        getattr(model, component).load_state_dict(sd, strict=True, assign=True)
    return model


def _cast(t, dtype):
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t  # same dtype: same tensor


def _count(shapes, pattern):
    """How many distinct values the first group of `pattern` takes over the tensor names."""
    return len({m[1] for n in shapes if (m := re.match(pattern, n))})


def infer_config(shapes, where="checkpoint"):
    """An SDXLConfig from the tensor shapes of an official single file.

    Shapes give every width and depth; they do not give head counts or GroupNorm groups, for which
    SDXL's conventions hold (64 channels per head, 32 groups). Our own exports store the config instead.
    """
    refiner = not any(n.startswith("conditioner.embedders.1.") for n in shapes)
    g = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    te2 = _infer_openclip({n[len(g):]: s for n, s in shapes.items() if n.startswith(g)})
    te1 = None
    if not refiner:
        p = "conditioner.embedders.0.transformer."
        te1 = _infer_clip({n[len(p):]: s for n, s in shapes.items() if n.startswith(p)})
    p = "model.diffusion_model."
    unet_shapes = {n[len(p):]: s for n, s in shapes.items() if n.startswith(p)}
    v = "first_stage_model."
    vae_cfg = _infer_vae({n[len(v):]: s for n, s in shapes.items() if n.startswith(v)})
    try:
        unet_cfg = _infer_unet(unet_shapes, te2.projection_dim, 5 if refiner else 6)
        return SDXLConfig(unet_cfg, vae_cfg, te1, te2)
    except (KeyError, ValueError, StopIteration, ZeroDivisionError) as e:
        raise LoadError(f"{where} does not have the layout of an SDXL checkpoint ({e}); it is damaged or another model.") from None


def _infer_unet(s, pooled_dim, num_numbers):
    mc, in_channels = s["input_blocks.0.0.weight"][:2]
    blocks = sorted({int(m[1]) for n in s if (m := re.match(r"input_blocks\.(\d+)\.", n))})
    depth = lambda prefix: _count(s, rf"{re.escape(prefix)}\.transformer_blocks\.(\d+)\.")
    levels, current = [], []  # per level: (channels, depth) of each ResBlock
    for b in blocks[1:]:
        if f"input_blocks.{b}.0.op.weight" in s:
            levels.append(current)
            current = []
        else:
            current.append((s[f"input_blocks.{b}.0.out_layers.3.weight"][0], depth(f"input_blocks.{b}.1")))
    levels.append(current)
    if len({len(level) for level in levels}) != 1 or any(len({d for _, d in level}) != 1 for level in levels):
        raise ValueError("levels differ in ResBlock count or attention depth")
    out_depths = tuple(depth(f"output_blocks.{i}.1") for i in range(_count(s, r"output_blocks\.(\d+)\.")))
    adm = s["label_emb.0.0.weight"][1]
    context = next(v[1] for n, v in s.items() if n.endswith("attn2.to_k.weight"))
    return unet.UNetConfig(
        in_channels=in_channels, out_channels=s["out.2.weight"][0], model_channels=mc,
        channel_mult=tuple(level[0][0] // mc for level in levels), num_res_blocks=len(levels[0]),
        transformer_depth=tuple(level[0][1] for level in levels),
        transformer_depth_middle=depth("middle_block.1"), transformer_depth_output=out_depths,
        context_dim=context, adm_in_channels=adm, micro_cond_dim=(adm - pooled_dim) // num_numbers,
        norm_groups=_norm_groups(mc),
    )


def _infer_vae(s):
    ch, in_channels = s["encoder.conv_in.weight"][:2]
    levels = _count(s, r"encoder\.down\.(\d+)\.")
    return vae.VAEConfig(
        in_channels=in_channels, out_channels=s["decoder.conv_out.weight"][0], ch=ch,
        ch_mult=tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)),
        num_res_blocks=_count(s, r"encoder\.down\.0\.block\.(\d+)\."), z_channels=s["post_quant_conv.weight"][0],
        norm_groups=_norm_groups(ch),
    )


def _norm_groups(channels):
    """Shapes do not store the GroupNorm group count: SDXL's 32 where the width allows, else the most
    groups that divide it (a guess for narrow models; our own files carry the true count in metadata)."""
    return math.gcd(32, channels)


def _infer_clip(s):
    vocab, width = s["text_model.embeddings.token_embedding.weight"]
    return text.TextEncoderConfig(
        vocab_size=vocab, context_length=s["text_model.embeddings.position_embedding.weight"][0], width=width,
        layers=_count(s, r"text_model\.encoder\.layers\.(\d+)\."), heads=width // 64,
        mlp_dim=s["text_model.encoder.layers.0.mlp.fc1.weight"][0], act="quick_gelu", projection_dim=None,
    )


def _infer_openclip(s):
    vocab, width = s["token_embedding.weight"]
    return text.TextEncoderConfig(
        vocab_size=vocab, context_length=s["positional_embedding"][0], width=width,
        layers=_count(s, r"transformer\.resblocks\.(\d+)\."), heads=width // 64,
        mlp_dim=s["transformer.resblocks.0.mlp.c_fc.weight"][0], act="gelu", projection_dim=s["text_projection"][1],
    )


def config_from_dict(d):
    """Inverse of dataclasses.asdict for SDXLConfig (lists back to tuples)."""
    tup = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
    te1 = d["text_encoder_1"]
    return SDXLConfig(
        unet=unet.UNetConfig(**tup(d["unet"])), vae=vae.VAEConfig(**tup(d["vae"])),
        text_encoder_1=text.TextEncoderConfig(**te1) if te1 else None,
        text_encoder_2=text.TextEncoderConfig(**d["text_encoder_2"]),
    )


# ----------------------------------------------------------------------------- saving


def _state_dicts(model, dtype):
    """{component: state_dict} with floating tensors cast to dtype (None keeps them) and made contiguous."""
    out = {}
    for component in single_file_prefixes(model.config):
        sd = getattr(model, component).state_dict()
        out[component] = {k: _cast(v, dtype).contiguous() for k, v in sd.items()}
    return out


def _atomic_target(dst, overwrite):
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise LoadError(f"{dst} already exists; choose another destination or pass --overwrite.")
    if not dst.parent.is_dir():
        raise LoadError(f"{dst.parent} is not a folder; create it first.")
    return dst


def save_single_file(model, dst, dtype=None, overwrite=False):
    """Write one official-layout .safetensors file (written to a temporary name, then renamed)."""
    dst = _atomic_target(dst, overwrite)
    dtype = DTYPES.get(dtype, dtype)
    tensors = {}
    prefixes = single_file_prefixes(model.config)
    for component, sd in _state_dicts(model, dtype).items():
        tensors.update({prefixes[component] + k: v for k, v in sd.items()})
    # One metadata entry only: safetensors writes several in a random (hash) order, which would make
    # two exports of the same model differ byte-wise.
    metadata = {CONFIG_METADATA_KEY: json.dumps(asdict(model.config))}
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
