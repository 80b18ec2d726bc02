"""cache_latents_to_disk: an image's cached latents (its posterior mean and logvar, at its bucket's size) written
beside it as <image>.plainxl-latents.safetensors (kohya writes <image>.npz there), and read back by a later run when
the image's bytes, its placement (bucket, resized size, crop) and the VAE are unchanged; otherwise encoded anew
and the file replaced. Written to a temporary name, then renamed, so a crash never leaves half a file.

    cache_path, cache_key   where an image's cache lives, and what it must match to be reused
    read_cached, write_cached
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SUFFIX = ".plainxl-latents.safetensors"


def cache_path(image_path):
    return Path(str(image_path) + SUFFIX)


def vae_fingerprint(vae):
    """A short digest of the VAE's weights (its first and last convolutions): another VAE, other latents."""
    digest = hashlib.sha256()
    for tensor in (vae.encoder.conv_in.weight, vae.quant_conv.weight):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(image_path, placement, vae_digest):
    """What a cached file must have been made from: the image's sha256, its placement, the VAE."""
    content = hashlib.sha256(Path(image_path).read_bytes()).hexdigest()
    return json.dumps({"image": content, "bucket": list(placement.bucket), "resized": list(placement.resized),
                       "crop": list(placement.crop), "vae": vae_digest}, sort_keys=True)


def read_cached(image_path, key):
    """(mean, logvar, numbers) from the image's cache file if it was made with this key, else None."""
    path = cache_path(image_path)
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("plainxl.latent_cache") != key:
                return None
            return tuple(f.get_tensor(name) for name in ("mean", "logvar", "numbers"))
    except (OSError, ValueError, KeyError, RuntimeError):  # a damaged cache is made again
        return None


def write_cached(image_path, key, mean, logvar, numbers):
    path = cache_path(image_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # every process of a run writes its own, then renames
    tensors = {"mean": mean.detach().cpu().contiguous(), "logvar": logvar.detach().cpu().contiguous(),
               "numbers": torch.tensor(numbers, dtype=torch.float32)}
    save_file(tensors, str(tmp), metadata={"plainxl.latent_cache": key})
    os.replace(tmp, path)
