"""Hugging Face repo ids -> local paths, through huggingface_hub's usual cache (honours HF_HUB_OFFLINE).

Without a network the cache is used as it is: the hub is probed once (one TCP connect, 3 s at most),
instead of letting the HTTP client retry for half a minute and end in a traceback.
"""

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.constants import ENDPOINT, HF_HUB_CACHE, HF_HUB_OFFLINE
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from models.files import LoadError

# Repos whose preferred download is one official single file rather than the diffusers folders.
DEFAULT_FILES = {
    "cagliostrolab/animagine-xl-4.0": "animagine-xl-4.0.safetensors",
    "stabilityai/stable-diffusion-xl-base-1.0": "sd_xl_base_1.0.safetensors",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "sd_xl_refiner_1.0.safetensors",
}


def download(source):
    """"owner/name" or "owner/name/file.safetensors" -> a cached file or diffusers folder (downloaded if needed)."""
    parts = source.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or DEFAULT_FILES.get("/".join(parts[:2]))
    online = not HF_HUB_OFFLINE and (_proxied() or _reachable())
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, local_files_only=not online))
        if not online:
            return _pick(Path(snapshot_download(repo_id, local_files_only=True)), repo_id)
        return _download_model(repo_id)
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if HF_HUB_OFFLINE else f"there is no network to {urlparse(ENDPOINT).hostname}"
        raise LoadError(
            f"{source} is not a local path, nor in the Hugging Face cache ({HF_HUB_CACHE}), and the hub cannot be "
            f"reached ({why}; HF_HUB_OFFLINE=1 skips the hub); download it once with internet, or pass a local path."
        ) from None
    except GatedRepoError:
        raise LoadError(f"{repo_id} is gated; accept its licence on the hub and log in with `hf auth login`.") from None
    except RepositoryNotFoundError:
        raise LoadError(f"{source} is neither a local path nor a Hugging Face repo "
                        "(if the repo is private, log in with `hf auth login`).") from None
    except EntryNotFoundError:
        raise LoadError(f"{repo_id} has no file {filename}; check the name on the repo's Files page.") from None
    except HFValidationError as e:  # a name the regex in models.loading.resolve let through, e.g. "a--b/c"
        raise LoadError(f"{source} is not a valid Hugging Face repo id ({e}); pass owner/name or a local path.") from None
    except Exception as e:  # the HTTP client's own errors (httpx, requests) differ between hub versions
        if isinstance(e, (HfHubHTTPError, OSError)) or type(e).__module__.split(".")[0] in HTTP_CLIENTS:
            raise LoadError(f"downloading {source} failed ({e}); check the network and try again.") from None
        raise


HTTP_CLIENTS = ("httpx", "httpx2", "requests", "urllib3")


def _proxied():
    """Behind a proxy a direct probe says nothing: let the hub's client (which uses the proxy) try."""
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                                            "http_proxy"))


def _reachable(timeout=3.0):
    """Whether a TCP connection to the hub's host opens (DNS included)."""
    url = urlparse(ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _download_model(repo_id):
    """A repo without a known default file: its one top-level .safetensors, else its diffusers folders."""
    try:
        files = HfApi().list_repo_files(repo_id)
    except OfflineModeIsEnabled:
        return _pick(Path(snapshot_download(repo_id, local_files_only=True)), repo_id)
    top = [f for f in files if "/" not in f and f.endswith(".safetensors")]
    if "unet/config.json" not in files:
        if len(top) != 1:
            raise LoadError(f"{repo_id} has {len(top)} top-level .safetensors files and no diffusers folders; "
                            f"name one as {repo_id}/FILE (e.g. {', '.join(top[:3]) or 'none found'}).")
        return Path(hf_hub_download(repo_id, top[0]))
    # The diffusers folders: configs, tokenizers and, per component, full-precision weights if the repo
    # has them, else the fp16 variant (never both: SDXL repos hold each in several formats).
    patterns = ["model_index.json", "*/*.json", "*/*.txt"]
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights = [f for f in files if f.startswith(component + "/") and f.endswith(".safetensors")]
        full = [f for f in weights if ".fp16." not in f]
        patterns += full or weights
    return _pick(Path(snapshot_download(repo_id, allow_patterns=patterns)), repo_id)


def _pick(folder, repo_id):
    """Format rule: a cached repo is a diffusers folder if it has unet/config.json, else its one top-level
    .safetensors file (by name; the file itself is then sniffed by models.files like any other)."""
    if (folder / "unet" / "config.json").exists():
        return folder
    top = sorted(folder.glob("*.safetensors"))
    if len(top) == 1:
        return top[0]
    raise LoadError(f"the cached copy of {repo_id} holds no single model file or diffusers folder; "
                    f"name the file as {repo_id}/FILE.safetensors.")
