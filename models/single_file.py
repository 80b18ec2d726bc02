"""The official single-file layout (sgm / "ldm"): identify a file, know its architecture (stored by our
exports, else solved from shapes), load it, save it.

Loading builds the model on the meta device (no random weights are ever allocated) and assigns the
file's tensors, cast one at a time (models.files.read_tensors), so the peak memory is about the size
of the weights at the target dtype. Each component is a prefix strip away from our module's state_dict.
Tensors no module holds (marker keys, CLIP's position_ids and logit_scale) ride along in
model.extra_tensors and are written back by save_single_file: an export loses nothing it did not change.
"""

import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from models import text, unet, vae
from models.files import DTYPES, LoadError, atomic_file, cast, check_destination, open_safetensors, read_tensors
from models.sdxl import SDXL, V_PRED_MARKER, ZTSNR_MARKER, SDXLConfig, single_file_prefixes

CONFIG_METADATA_KEY = "plainxl.config"  # our exports store the full SDXLConfig as JSON here
KEPT = ("position_ids", "logit_scale", "denoiser.sigmas")  # unused buffers some files carry: kept, not loaded
MARKERS = (V_PRED_MARKER, ZTSNR_MARKER)
EMA_PREFIX = "model_ema."  # sgm's EMA copy of the UNet (names without dots); the live weights are what we load


def is_extra(name):
    return name in MARKERS or name.endswith(KEPT)


# ----------------------------------------------------------------------------- checking


def check_tensors(found, expected, where):
    """Compare {name: shape} of a file with what the model needs; raise one LoadError if they differ."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected and not is_extra(n) and not n.startswith(EMA_PREFIX)]
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


def identify(names, path):
    """Refuse files that are not SDXL checkpoints, saying what they are. Format rule: the tensor names
    (SD 1.x, SD 2.x, a LoRA, a VAE alone, one diffusers component, or SDXL's UNet and conditioner)."""
    names = list(names)
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        raise LoadError(f"{path} is an SD 1.x checkpoint; this project loads SDXL (base, refiner or a fine-tune).")
    if any(n.startswith("cond_stage_model.model.") for n in names):
        raise LoadError(f"{path} is an SD 2.x checkpoint; this project loads SDXL (base, refiner or a fine-tune).")
    if any("lora" in n.lower() for n in names[:50]):
        raise LoadError(f"{path} is a LoRA, not a full checkpoint; load the SDXL model it was trained on instead.")
    if any(n.startswith(("encoder.", "decoder.", "first_stage_model.")) for n in names) and \
            not any(n.startswith("model.diffusion_model.") for n in names):
        raise LoadError(f"{path} is a VAE on its own; pass it as --vae, with a full SDXL model as --model.")
    if any(n.startswith(("down_blocks.", "text_model.")) for n in names):
        raise LoadError(f"{path} holds one component in diffusers layout; pass the diffusers folder that contains it.")
    if not any(n.startswith("model.diffusion_model.") for n in names):
        raise LoadError(f"{path} is not an SDXL checkpoint: it has no model.diffusion_model.* tensors "
                        f"(it has e.g. {', '.join(names[:3]) or 'nothing'}).")
    if not any(n.startswith("conditioner.embedders.") for n in names):
        raise LoadError(f"{path} has a UNet but no text encoders (conditioner.embedders.*); pass a full SDXL checkpoint.")


def assign(module, state, where):
    """module.load_state_dict(state, strict=True, assign=True) after the one check shapes cannot make: a
    weight stored as integers (a damaged dtype field; torch would raise deep inside) is refused."""
    wanted = module.state_dict()
    for name, t in state.items():
        if t.is_floating_point() != wanted[name].is_floating_point():
            raise LoadError(f"{where}: tensor {name} is stored as {str(t.dtype).removeprefix('torch.')}, not as the "
                            "model's numbers; the file is damaged or not this model's.")
    module.load_state_dict(state, strict=True, assign=True)


def read_renamed(names, dtype=None):
    """{file: {our name: stored name}} -> {our name: tensor}: each file read once, every tensor cast to dtype."""
    tensors = {}
    for file, mapping in names.items():
        stored = dict(read_tensors(file, list(mapping.values()), dtype))
        tensors |= {ours: stored[name] for ours, name in mapping.items()}
    return tensors


def built(make, tensors, where):
    """make() on the meta device, then `tensors` ({name: tensor}) assigned to it once check_tensors finds every
    name and shape it has and no other -> the module, in eval mode. LoadError naming what does not fit."""
    with torch.device("meta"):
        module = make()
    check_tensors({n: t.shape for n, t in tensors.items()}, {n: t.shape for n, t in module.state_dict().items()}, where)
    assign(module, tensors, where)
    return module.eval()


# ----------------------------------------------------------------------------- the architecture


def config_from_dict(d):
    """Inverse of dataclasses.asdict for SDXLConfig (lists back to tuples). Raises ValueError/KeyError/TypeError."""
    tup = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
    te1 = d["text_encoder_1"]
    return SDXLConfig(
        unet=unet.UNetConfig(**tup(d["unet"])), vae=vae.VAEConfig(**tup(d["vae"])),
        text_encoder_1=text.TextEncoderConfig(**te1) if te1 else None,
        text_encoder_2=text.TextEncoderConfig(**d["text_encoder_2"]),
        prediction_type=d.get("prediction_type", "epsilon"), zero_terminal_snr=d.get("zero_terminal_snr", False),
    )


def _count(shapes, pattern):
    """How many distinct values the first group of `pattern` takes over the tensor names."""
    return len({m[1] for n in shapes if (m := re.match(pattern, n))})


class _NotSDXLWidth(ValueError):
    """A width below every SDXL-family model's: its head count or group count cannot be assumed."""


def _sdxl_width(width, minimum, multiple, what):
    if width < minimum or width % multiple:
        raise _NotSDXLWidth(f"its {what} is {width} wide, not an SDXL-family width (a multiple of {multiple}, "
                            f"at least {minimum})")
    return width


def infer_config(shapes, where="checkpoint", unet_config=None):
    """An SDXLConfig from the tensor shapes of an official single file (the UNet's from unet_config if given).

    Shapes give every width and depth; they do not give head counts or GroupNorm groups, for which
    SDXL's conventions hold (64 channels per head, 32 groups). Those conventions are sound only at
    SDXL-family widths, so a narrower file (a tiny model whose metadata was stripped) is refused
    rather than built wrong: our own exports store the config, and --config supplies one.
    """
    refiner = not any(n.startswith("conditioner.embedders.1.") for n in shapes)
    part = lambda prefix: {n[len(prefix):]: s for n, s in shapes.items() if n.startswith(prefix)}
    try:
        g = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
        te2 = _infer_openclip(part(g))
        te1 = None if refiner else _infer_clip(part("conditioner.embedders.0.transformer."))
        vae_cfg = _infer_vae(part("first_stage_model."))
        unet_cfg = unet_config or _infer_unet(part("model.diffusion_model."), te2.projection_dim, 5 if refiner else 6)
        return SDXLConfig(unet_cfg, vae_cfg, te1, te2)
    except _NotSDXLWidth as e:
        if unet_config is not None:
            raise LoadError(f"{where}: the config gives the UNet only, and {e}, so its attention heads and GroupNorm "
                            "groups cannot be read from the shapes; give the model's whole diffusers folder (or its "
                            "model_index.json) as --config.") from None
        raise LoadError(f"{where} has no {CONFIG_METADATA_KEY} metadata and {e}, so its attention heads and "
                        "GroupNorm groups cannot be read from the shapes; give its architecture, its diffusers folder or "
                        "config JSON, with --config FOLDER_OR_CONFIG_JSON (--refiner-config for a refiner; "
                        "model_config= in a training or ablation config, config= in Python).") from None
    except (KeyError, ValueError, StopIteration, ZeroDivisionError, IndexError) as e:
        raise LoadError(f"{where} does not have the layout of an SDXL checkpoint ({e}); it is damaged or another model.") from None


def encoder_shape(s):
    """The UNet config fields an encoder's tensor shapes give (input and middle blocks, embeddings), official
    names: a UNet's, or a ControlNet's (models/controlnet.py), which is the UNet's first half."""
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
    return dict(
        in_channels=in_channels, model_channels=mc, channel_mult=tuple(level[0][0] // mc for level in levels),
        num_res_blocks=len(levels[0]), transformer_depth=tuple(level[0][1] for level in levels),
        transformer_depth_middle=depth("middle_block.1"), adm_in_channels=s["label_emb.0.0.weight"][1],
        context_dim=next(v[1] for n, v in s.items() if n.endswith("attn2.to_k.weight")),
    )


def _infer_unet(s, pooled_dim, num_numbers):
    fields = encoder_shape(s)
    _sdxl_width(fields["model_channels"], 256, 64, "UNet")
    depth = lambda prefix: _count(s, rf"{re.escape(prefix)}\.transformer_blocks\.(\d+)\.")
    out_depths = tuple(depth(f"output_blocks.{i}.1") for i in range(_count(s, r"output_blocks\.(\d+)\.")))
    return unet.UNetConfig(
        **fields, out_channels=s["out.2.weight"][0], transformer_depth_output=out_depths,
        micro_cond_dim=(fields["adm_in_channels"] - pooled_dim) // num_numbers,
        time_cond_proj_dim=s["time_cond_proj.weight"][1] if "time_cond_proj.weight" in s else None,
    )


def _infer_vae(s, norm_groups=None):
    """norm_groups None: SDXL's 32 (sound at SDXL-family widths only); else the given count."""
    ch, in_channels = s["encoder.conv_in.weight"][:2]
    levels = _count(s, r"encoder\.down\.(\d+)\.")
    return vae.VAEConfig(
        in_channels=in_channels, out_channels=s["decoder.conv_out.weight"][0],
        ch=ch if norm_groups else _sdxl_width(ch, 64, 32, "VAE"), norm_groups=norm_groups or 32,
        ch_mult=tuple(s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)),
        num_res_blocks=_count(s, r"encoder\.down\.0\.block\.(\d+)\."), z_channels=s["post_quant_conv.weight"][0],
    )


def _infer_clip(s):
    vocab, width = s["text_model.embeddings.token_embedding.weight"]
    return text.TextEncoderConfig(
        vocab_size=vocab, context_length=s["text_model.embeddings.position_embedding.weight"][0], width=width,
        layers=_count(s, r"text_model\.encoder\.layers\.(\d+)\."), heads=_sdxl_width(width, 512, 64, "CLIP-L") // 64,
        mlp_dim=s["text_model.encoder.layers.0.mlp.fc1.weight"][0], act="quick_gelu", projection_dim=None,
    )


def _infer_openclip(s):
    vocab, width = s["token_embedding.weight"]
    return text.TextEncoderConfig(
        vocab_size=vocab, context_length=s["positional_embedding"][0], width=width,
        layers=_count(s, r"transformer\.resblocks\.(\d+)\."), heads=_sdxl_width(width, 512, 64, "OpenCLIP") // 64,
        mlp_dim=s["transformer.resblocks.0.mlp.c_fc.weight"][0], act="gelu", projection_dim=s["text_projection"][1],
    )


# ----------------------------------------------------------------------------- loading


def read_config(path, given=None):
    """The header of an official single file -> (SDXLConfig, {name: shape}), without reading a tensor.
    The architecture is `given` (an SDXLConfig, or a UNetConfig with the rest read from the shapes), else
    the file's own metadata, else read from the shapes; load_single_file checks every shape against it."""
    path = Path(path)
    with open_safetensors(path) as f:
        names = list(f.keys())
        identify(names, path)
        shapes = {n: f.get_slice(n).get_shape() for n in names}
        metadata = f.metadata() or {}
    if isinstance(given, SDXLConfig):
        cfg = given
    elif CONFIG_METADATA_KEY in metadata and given is None:
        try:
            cfg = config_from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LoadError(f"{path} has a damaged {CONFIG_METADATA_KEY} metadata entry ({e}); export it again.") from None
    else:
        cfg = infer_config(shapes, path, unet_config=given)
    # Marker keys say how the UNet was trained (ComfyUI and AUTOMATIC1111 read them the same way).
    if V_PRED_MARKER in shapes:
        cfg = replace(cfg, prediction_type="v_prediction", zero_terminal_snr=ZTSNR_MARKER in shapes)
    return cfg, shapes


def load_single_file(path, dtype=None, given=None):
    """Official layout -> SDXL (on the CPU), its architecture as read_config finds it. Raises LoadError for
    any bad input."""
    path = Path(path)
    cfg, shapes = read_config(path, given)
    with torch.device("meta"):
        model = SDXL(cfg)
    prefixes = single_file_prefixes(cfg)
    expected = {prefix + k: v.shape for c, prefix in prefixes.items() for k, v in getattr(model, c).state_dict().items()}
    check_tensors(shapes, expected, str(path) if given is None else f"{path} (with the architecture --config gives)")
    ema = [n for n in shapes if n.startswith(EMA_PREFIX)]
    if ema:
        print(f"note: {path} also holds an EMA copy of the UNet ({len(ema)} {EMA_PREFIX}* tensors); "
              "the live weights are loaded, the EMA copy is ignored and not exported.", file=sys.stderr)
    extras = [n for n in shapes if n not in expected and is_extra(n)]
    state_dicts = {component: {} for component in prefixes}
    for name, t in read_tensors(path, list(expected) + extras, dtype):  # one pass over the file
        if name in extras:
            model.extra_tensors[name] = t
            continue
        component = next(c for c, prefix in prefixes.items() if name.startswith(prefix))
        state_dicts[component][name[len(prefixes[component]):]] = t
    for component, sd in state_dicts.items():
        assign(getattr(model, component), sd, path)
    return model


def load_vae_file(path, dtype=None, like=None):
    """A VAE alone from an official-layout file (`encoder.*`, with or without `first_stage_model.`), as
    stabilityai/sdxl-vae and sdxl-vae-fp16-fix ship it -> AutoencoderKL. Shapes carry neither a scaling
    factor nor GroupNorm groups: with `like` (the VAEConfig of the model it goes into) both are that
    model's, which is sound for a VAE of the model's own family (the shapes are checked); else SDXL's."""
    path = Path(path)
    with open_safetensors(path) as f:
        names = list(f.keys())
        prefix = "first_stage_model." if any(n.startswith("first_stage_model.") for n in names) else ""
        if any(n.startswith("model.diffusion_model.") for n in names):
            raise LoadError(f"{path} is a whole SDXL model, not a VAE; pass it as --model, or a VAE file as --vae.")
        if any(n.startswith("encoder.down_blocks.") for n in names):
            raise LoadError(f"{path} is a VAE in diffusers names; pass the folder that holds it with its config.json.")
        shapes = {n[len(prefix):]: f.get_slice(n).get_shape() for n in names if n.startswith(prefix)}
    try:
        cfg = _infer_vae(shapes, like and like.norm_groups)
        if like is not None:
            cfg = replace(cfg, scaling_factor=like.scaling_factor)
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise LoadError(f"{path} is not an SDXL VAE file ({e}); pass a VAE .safetensors or a diffusers vae/ folder.") from None
    with torch.device("meta"):
        module = vae.AutoencoderKL(cfg)
    expected = module.state_dict()
    check_tensors(shapes, {n: t.shape for n, t in expected.items()}, str(path))
    sd = {name[len(prefix):]: t for name, t in read_tensors(path, [prefix + n for n in expected], dtype)}
    assign(module, sd, path)
    return module


# ----------------------------------------------------------------------------- saving


def state_dicts(model, dtype):
    """{component: state_dict} with floating tensors cast to dtype (None keeps them) and made contiguous."""
    out = {}
    for component in single_file_prefixes(model.config):
        sd = getattr(model, component).state_dict()
        out[component] = {k: cast(v, dtype).contiguous() for k, v in sd.items()}
    return out


def check_finite(tensors, dst):
    """Never write NaN weights: a LoadError naming the first non-finite tensor (after any cast: fp16 overflows)."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not t.isfinite().all():
            raise LoadError(f"tensor {name} holds NaN or inf (a diverged run, or values beyond the export dtype's "
                            f"range), so {dst} was not written; export another checkpoint, or as bf16/fp32.")


def save_single_file(model, dst, dtype=None, overwrite=False):
    """Write one official-layout .safetensors file (written to a temporary name, then renamed), with the
    model's extra tensors and its prediction markers, and the config as metadata."""
    dst = check_destination(dst, overwrite, "file")
    dtype = DTYPES.get(dtype, dtype)
    tensors = {name: cast(t, dtype).contiguous() for name, t in getattr(model, "extra_tensors", {}).items()}
    markers = {V_PRED_MARKER: model.config.prediction_type == "v_prediction", ZTSNR_MARKER: model.config.zero_terminal_snr}
    for m, on in markers.items():  # the config is the truth (a trainer may change it), kept markers or not
        if on:
            tensors.setdefault(m, torch.zeros(0))
        else:
            tensors.pop(m, None)
    prefixes = single_file_prefixes(model.config)
    for component, sd in state_dicts(model, dtype).items():
        tensors.update({prefixes[component] + k: v for k, v in sd.items()})
    # One metadata entry only: safetensors writes several in a random (hash) order, which would make
    # two exports of the same model differ byte-wise.
    metadata = {CONFIG_METADATA_KEY: json.dumps(asdict(model.config))}
    check_finite(tensors, dst)
    try:
        with atomic_file(dst, overwrite) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    except FileExistsError:
        raise LoadError(f"{dst} appeared while it was being written; choose another destination.") from None
