"""What sampling.generate writes: each image as the next free NNNNN-SEED.png of the output folder, with its
parameters in the PNG (sampling/pnginfo.py), under a temporary name then linked into place, never replacing a
file; --save-attention's heatmap grids and --tap's records."""

import os
import re
import sys

from PIL import PngImagePlugin


def next_index(out):
    """Files are NNNNN-SEED.png, numbered on from the highest number the folder holds (any width)."""
    taken = [int(m[1]) for f in os.listdir(out) if (m := re.match(r"(\d+)-", f))]
    return max(taken, default=-1) + 1


def save_png(image, path, parameters):
    """Write the PNG under a temporary name, then link it into place: a file already there is never replaced
    (FileExistsError), and no half-written PNG ever has the final name."""
    from models.files import atomic_file

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def save_next(image, out, seed, parameters):
    """Save as the next free NNNNN-SEED.png of `out`; another process taking a number moves us on."""
    index = next_index(out)
    while True:
        path = out / f"{index:05d}-{seed}.png"
        try:
            save_png(image, path, parameters)
            return path
        except FileExistsError:
            index = next_index(out)


def save_attention(maps, image, i, s, pipe, path, parameters):
    """Image i's token heatmaps (sampling/instruments.py) as a labelled grid at `path`; never replaces a file."""
    from sampling.instruments import heatmap_grid, prompt_tokens, token_heatmaps

    row = s.num_images + i if s.cfg > 1 else i  # a CFG step's rows are [uncond, cond]
    heat = token_heatmaps(maps, s.height, s.width, rows=slice(row, row + 1),
                          pixels_per_latent=pipe.model.config.vae.pixels_per_latent)[0]  # (M, H, W)
    positions, labels = prompt_tokens(pipe.tokenizers[0], s.prompt, s.truncate_prompt, s.prompt_weights)
    try:
        save_png(heatmap_grid(image, heat[positions], labels), path, parameters)
    except FileExistsError:
        print(f"note: {path} exists and was kept; the attention map of {path.name} was not written", file=sys.stderr)
        return None
    return path


def save_taps(taps, path):
    """--tap's records as one safetensors file, "<module name>/step<NNN>" -> (rows [uncond, cond], ...)."""
    from safetensors.torch import save_file

    from models.files import atomic_file

    tensors = {f"{name}/step{step:03d}": t.contiguous()
               for name, by_step in taps.items() for step, t in by_step.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp)
    return path
