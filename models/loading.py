"""The one front door for models: `load` (any layout, optionally another VAE), `resolve` (a name to a
local path: the bundled models, local files and folders, Hugging Face repo ids), and the savers.

The stack below, bottom-up: models/files.py (safetensors files: pickles refused, lazy reads, atomic
writes), models/keys.py (official <-> diffusers names), models/single_file.py, models/diffusers_layout.py,
models/hub.py. Every problem with the input becomes a LoadError: one sentence naming the problem and the fix.
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from models.diffusers_layout import (
    load_diffusers,
    load_vae_folder,
    pipeline_options,
    read_folder_config,
    save_diffusers,
    unet_config_from_diffusers,
)
from models.files import DTYPES, LoadError, model_hash
from models.hub import download
from models.sdxl import SDXL, SDXLConfig, scheduler_config
from models.single_file import config_from_dict, load_single_file, load_vae_file, read_config, save_single_file

__all__ = ["BUNDLED", "DTYPES", "LoadError", "ModelInfo", "architecture", "check_device", "inspect", "load", "load_vae",
           "model_hash", "out_of_memory", "pipeline_options", "read_folder_config", "resolve", "save_diffusers", "save_single_file"]

# The project's own tiny model and its refiner, trained by configs/tiny_*.py and shipped in the package (no download).
BUNDLED = {name: Path(__file__).with_name(f"{name}.safetensors") for name in ("plainxl-tiny", "plainxl-tiny-refiner")}


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, read from its headers and configs only: for checking settings before loading it."""

    path: Path  # the resolved local file or folder
    config: SDXLConfig
    scheduler_config: dict  # the folder's own, else the one the model was trained with
    parameters: int  # number of weights (for memory estimates)


def inspect(source, config=None):
    """ModelInfo of a model, without reading its weights (a repo id is downloaded, as load would); config as
    load takes it."""
    path = resolve(source)
    given = architecture(config, path)
    if path.is_dir():
        cfg, scheduler = read_folder_config(path)
    else:
        (cfg, _), scheduler = read_config(path, given), None
    with torch.device("meta"):  # shapes only: no memory
        parameters = sum(p.numel() for p in SDXL(cfg).parameters())
    return ModelInfo(path, cfg, scheduler or scheduler_config(cfg), parameters)


def load(source, dtype=None, device="cpu", vae=None, config=None):
    """Load an SDXL model.

    Args:
        source: an official single file (.safetensors), a diffusers folder, a Hugging Face repo id
            ("cagliostrolab/animagine-xl-4.0", or "owner/name/file.safetensors" for one file of a repo),
            or a bundled model's name ("plainxl-tiny").
        dtype: torch dtype or "fp32"/"fp16"/"bf16" for the floating tensors; None keeps the file's
            (float8-stored weights become bfloat16).
        device: where the model ends up; the file is read on the CPU.
        vae: optional VAE to use instead of the model's own: a VAE .safetensors or a diffusers vae/ folder
            (or repo id), e.g. madebyollin/sdxl-vae-fp16-fix.
        config: the architecture of a single file that does not store it and is too narrow to read from its
            shapes (diffusers' from_single_file(config=...)): a diffusers model folder, or a JSON file (see
            `architecture`). Every tensor's shape is checked against it.
    Returns: models.sdxl.SDXL in eval mode. Raises LoadError for any bad input.
    """
    dtype = DTYPES.get(dtype, dtype)
    vae_path = resolve(vae) if vae is not None else None  # a --vae that is not there fails before the big load
    path = resolve(source)
    given = architecture(config, path)
    model = load_diffusers(path, dtype) if path.is_dir() else load_single_file(path, dtype, given)
    if vae_path is not None:
        vae_module = load_vae(vae_path, dtype, like=model.config.vae)
        if vae_module.config.z_channels != model.config.vae.z_channels:
            raise LoadError(f"the VAE {vae} has {vae_module.config.z_channels} latent channels, the model "
                            f"{model.config.vae.z_channels}; pass an SDXL VAE.")
        model.vae = vae_module
        model.config = replace(model.config, vae=vae_module.config)
    return model.to(device).eval()


CONFIG_JSON_LIMIT = 1 << 20  # bytes; a config is a few kB, so a larger --config is a model file given by mistake
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2")


def architecture(config, model_path):
    """--config FOLDER_OR_CONFIG_JSON for the single file at model_path -> an SDXLConfig, or a UNetConfig (the
    rest is then read from the file's shapes); None -> None. A local path (no download); what it is, by structure:
      a diffusers model folder (unet/config.json ...; its weights are not read), or that folder's
        model_index.json or one of its components' config.json: the folder's configs;
      plainxl's own config: a JSON object whose "unet" and "text_encoder_2" are objects (as our exports store it);
      a diffusers UNet config.json on its own ("_class_name": "UNet2DConditionModel"): the UNet's."""
    if config is None:
        return None
    if model_path.is_dir():
        raise LoadError(f"--config {config} is for a single file; {model_path} is a diffusers folder, which has "
                        "its own configs: drop --config.")
    path = Path(config).expanduser()
    if not path.exists():
        raise LoadError(f"--config {config} does not exist; give the model's diffusers folder or its config JSON.")
    inside = path.parent if path.name == "model_index.json" else path.parent.parent
    in_a_folder = (path.name == "model_index.json" or (path.name == "config.json" and path.parent.name in COMPONENTS))
    if path.is_dir() or (in_a_folder and (inside / "unet" / "config.json").is_file()
                         and (inside / "vae" / "config.json").is_file()):
        try:
            return read_folder_config(path if path.is_dir() else inside)[0]
        except LoadError as e:
            raise LoadError(f"--config {config}: {e}") from None
    if not path.is_file():  # a FIFO or a device would block or never end
        raise LoadError(f"--config {config} is not a regular file; give the model's diffusers folder or its config JSON.")
    if path.stat().st_size > CONFIG_JSON_LIMIT:
        raise LoadError(f"--config {config} is {path.stat().st_size} bytes, not a config JSON; give the model's "
                        "diffusers folder or its config JSON.")
    try:
        d = json.loads(path.read_text())
        if isinstance(d, dict) and isinstance(d.get("unet"), dict) and isinstance(d.get("text_encoder_2"), dict):
            return config_from_dict(d)
        if isinstance(d, dict) and d.get("_class_name") == "UNet2DConditionModel":
            return unet_config_from_diffusers(d)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, IndexError,
            RecursionError, LoadError) as e:
        raise LoadError(f"--config {config} cannot be read as a model config ({e}).") from None
    name = str(d.get("_class_name", "")) if isinstance(d, dict) else ""
    kind = ("a VAE's config" if name == "AutoencoderKL" else "a model_index.json away from its folder's "
            "unet/config.json" if name.startswith("StableDiffusion") else "not a config plainxl reads")
    raise LoadError(f"--config {config} is {kind}; give the model's diffusers folder, its unet/config.json, or "
                    "plainxl's own config JSON.")


def load_vae(source, dtype=None, like=None):
    """A VAE alone -> models.vae.AutoencoderKL: a diffusers VAE folder (its config.json says everything),
    or an official-layout VAE file (its scaling factor and groups: those of `like`, a VAEConfig, else SDXL's)."""
    path = resolve(source)
    dtype = DTYPES.get(dtype, dtype)
    return load_vae_folder(path, dtype) if path.is_dir() else load_vae_file(path, dtype, like)


def check_device(name):
    """A torch.device that exists on this machine, or ValueError saying which ones do (checked before a load)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if device.type == "mps":
        available = torch.backends.mps.is_available()
    if not available:
        raise ValueError(f"device {name} is not available on this machine (this torch {torch.__version__} sees "
                         f"no {device.type}); use cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {name}: this machine has {count} {device.type} device(s), numbered from 0")
    return device


def out_of_memory(e):
    """True for the errors torch raises when an allocation fails (torch.OutOfMemoryError is a RuntimeError)."""
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or "can't allocate memory" in str(e)


def resolve(source):
    """A local path as it is; "plainxl-tiny" the bundled model; a repo id through the Hugging Face cache (models.hub).
    Format rule (load, inspect, load_vae): a folder is a diffusers folder, a file an official single file."""
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
        return download(str(source))
    raise LoadError(f"{source} does not exist; pass a .safetensors file, a diffusers folder or a Hugging Face repo id.")
