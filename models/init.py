"""Write a randomly initialised SDXL-family model as an official-layout single file: the starting
point for pretraining a small model (see configs/tiny_*.py), or a stand-in for tests and teaching.

    python -m models.init {tiny,tiny-refiner,base,refiner} OUT.safetensors [--seed 0] [--dtype fp32]
        [--overwrite] [--components-from MODEL]

--dtype fp16 or bf16 stores the weights at that precision: they are drawn in float32 with the same seed
and cast, so every dtype holds the same model.

--components-from copies MODEL's VAE and OpenCLIP bigG into the new model (a refiner must share its
base's VAE, whose latents it takes over; configs/tiny_refiner.py starts so).
"""

import argparse
import sys
from dataclasses import replace

import torch

from models import sdxl
from models.files import check_destination
from models.loading import LoadError, load, save_single_file

PRESETS = {"tiny": sdxl.TINY, "tiny-refiner": sdxl.TINY_REFINER, "base": sdxl.BASE, "refiner": sdxl.REFINER}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models.init", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", choices=list(PRESETS))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="stored precision")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--components-from", metavar="MODEL", help="copy this model's VAE and OpenCLIP bigG")
    args = parser.parse_args(argv)
    try:
        check_destination(args.out, args.overwrite)  # before the weights are drawn (base: 3.5 G of them)
        config = PRESETS[args.preset]
        source = load(args.components_from, dtype="fp32") if args.components_from else None
        if source is not None:
            config = replace(config, vae=source.config.vae)  # a trained VAE carries its own scaling_factor
        torch.manual_seed(args.seed)
        model = sdxl.SDXL(config)
        for name in ("vae", "text_encoder_2") if source is not None else ():
            try:
                getattr(model, name).load_state_dict(getattr(source, name).state_dict())
            except RuntimeError:  # a size mismatch
                raise LoadError(f"{args.components_from}'s {name} has other shapes than the {args.preset} "
                                "preset's; take a model of the same family") from None
        save_single_file(model, args.out, dtype=args.dtype, overwrite=args.overwrite)
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
