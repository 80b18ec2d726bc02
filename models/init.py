"""Write a randomly initialised SDXL-family model as an official-layout single file: the starting
point for pretraining a small model (see configs/tiny_*.py), or a stand-in for tests and teaching.

    python -m models.init {tiny,base,refiner} OUT.safetensors [--seed 0] [--overwrite]
"""

import argparse
import sys

import torch

from models import sdxl
from models.loading import LoadError, save_single_file


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models.init", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=["tiny", "base", "refiner"])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = sdxl.SDXL({"tiny": sdxl.TINY, "base": sdxl.BASE, "refiner": sdxl.REFINER}[args.preset])
    try:
        save_single_file(model, args.out, overwrite=args.overwrite)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: writing {args.out} failed ({e.strerror or e}); nothing was written", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
