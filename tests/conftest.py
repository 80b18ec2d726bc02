import sys
from pathlib import Path

import pytest
import torch

from models.loading import save_single_file
from models.sdxl import SDXL, TINY

# Tests that read the benchmarks' meta-device budgets import them by name (tests/benchmarks is not a package).
sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer checks; CI runs them, `-m 'not slow'` skips them locally")


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory):
    """A random tiny SDXL (models.sdxl.TINY, seed 0) as an official-layout single file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_single_file(SDXL(TINY), path)
    return path
