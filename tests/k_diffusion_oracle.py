"""k-diffusion's sampling.py as a test oracle, without the rest of the package.

k-diffusion's __init__ imports its training code (torchvision, wandb, clip, ...), so .ci/run installs the
package with --no-deps and this loads only k_diffusion/sampling.py, under a private package name, with the
one helper it takes from k_diffusion/utils.py. Its samplers are run as published.
"""

import importlib.util
import sys
import types
from pathlib import Path


def _append_dims(x, target_dims):
    """k_diffusion.utils.append_dims: x with trailing singleton dimensions up to target_dims."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def k_diffusion_sampling():
    """The module k_diffusion.sampling, loaded from the installed package's file."""
    if "_kdiffusion_oracle.sampling" in sys.modules:
        return sys.modules["_kdiffusion_oracle.sampling"]
    spec = importlib.util.find_spec("k_diffusion")  # locates the package without running its __init__
    if spec is None:
        raise ImportError("k-diffusion is not installed; run: pip install --no-deps k-diffusion==0.1.1.post1")
    folder = Path(spec.submodule_search_locations[0])
    package = types.ModuleType("_kdiffusion_oracle")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("_kdiffusion_oracle.utils")
    utils.append_dims = _append_dims
    sys.modules["_kdiffusion_oracle"], sys.modules["_kdiffusion_oracle.utils"] = package, utils
    file_spec = importlib.util.spec_from_file_location("_kdiffusion_oracle.sampling", folder / "sampling.py")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules["_kdiffusion_oracle.sampling"] = module
    file_spec.loader.exec_module(module)
    return module
