"""Convert an SDXL model between the official single file and the diffusers layout.

    python -m models.convert SRC DST [--dtype fp16] [--overwrite] [--config FOLDER_OR_CONFIG_JSON]

DST ending in .safetensors: one official file (every tensor of SRC it does not change is kept, marker
keys included); any other path: a diffusers folder. The name maps are models/keys.py.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the seconds of imports below: one line and exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted; nothing was written", file=sys.stderr),
                                             os._exit(130)))

import argparse

from models.diffusers_layout import is_model_folder
from models.files import check_destination
from models.loading import LoadError, load, resolve, save_diffusers, save_single_file
from models.tokenizer import load_tokenizers


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a .safetensors file, a diffusers folder or a Hugging Face repo id")
    parser.add_argument("dst", help="DST.safetensors: one official-layout file; any other path: a diffusers folder")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it is a model file or folder")
    parser.add_argument("--config", metavar="FOLDER_OR_CONFIG_JSON",
                        help="the architecture of a SRC single file that does not store it: its diffusers folder or "
                             "config JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imports done: Ctrl-C now cleans up as it goes
    one_file = args.dst.endswith(".safetensors")  # format rule for what to write: DST's suffix
    save = save_single_file if one_file else save_diffusers
    try:  # the destination first: a bad one fails before the (slow) load
        check_destination(args.dst, args.overwrite, "file" if one_file else "folder", is_model_folder)
        source = resolve(args.src)
        model = load(source, dtype=args.dtype, config=args.config)
        own = {"tokenizers": load_tokenizers(source)} if not one_file and source.is_dir() else {}  # a folder's own
        save(model, args.dst, dtype=args.dtype, overwrite=args.overwrite, **own)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a folder we may not write: nothing half-written stays (atomic writes)
        print(f"error: writing {args.dst} failed ({e.strerror or e}); nothing was written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.dst} was not written", file=sys.stderr)
        return 130
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
