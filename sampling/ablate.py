"""An ablation grid: sampler x steps x cfg x intervention [x control scale x start x end] x seed, every prompt in
every cell.

    python -m sampling.ablate --config configs/ablation_<name>.py [--model M] [--out DIR] [--device D] [--dtype T]

A config file defines `config = dict(...)`:
    model           single file, diffusers folder or Hugging Face repo id (default: the bundled plainxl-tiny)
    model_config    the architecture of a bare single file (generate's --config): its diffusers folder or config JSON
    prompts         a list of prompts; a cell makes one image of each (the same negative_prompt for all)
    grid            dict of axes, each a list: sampler, steps, cfg, intervention (names of `interventions`;
                    "none" runs the plain model), seed
    interventions   dict name -> function(model) giving a context manager (sampling/interventions.py's, or yours)
    score           optional function(images, prompts) -> {metric: number}, e.g. data.evaluate.caption_fidelity
    controlnets     optional ControlNets (files, folders or repo ids), with control_images (one each): then the grid
                    may also sweep control_scale, control_start and control_end (default [1.0], [0.0], [1.0])
    width, height, negative_prompt, out (default runs/<config file name>, e.g. runs/ablation_freeu)

Writes out/cells/<sampler>-<steps>-cfg<cfg>-<intervention>-seed<seed>.png (the cell's images side by side, its
parameters in the PNG), out/contact_sheet.png (one labelled row per cell) and, with a score, out/scores.md (one
row per setting, its seeds pooled). Cells already written are skipped, so an interrupted run continues where
it stopped; out/ablation.json records the model, prompts and size, and a folder of another grid is refused.
Every check runs before the model loads.
"""

import argparse
import itertools
import json
import sys
from contextlib import nullcontext
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from models.controlnet import inspect_controlnet
from models.files import atomic_file, check_output, read_config_file
from models.loading import LoadError, check_device, inspect
from sampling.arguments import check_settings
from sampling.control import check_control
from sampling.outputs import save_png
from sampling.pipeline import Pipeline
from sampling.schedule import make_schedule
from sampling.settings import Settings, check

AXES = ("sampler", "steps", "cfg", "intervention", "seed")
CONTROL_AXES = {"control_scale": [1.0], "control_start": [0.0], "control_end": [1.0]}  # with controlnets: their defaults
FIELDS = {"model", "model_config", "prompts", "grid", "interventions", "score", "width", "height", "negative_prompt",
          "out", "controlnets", "control_images"}
DEFAULTS = {"model": "plainxl-tiny", "model_config": None, "width": 64, "height": 64, "negative_prompt": None,
            "score": None, "out": None, "controlnets": [], "control_images": []}
SHARED = ("model", "prompts", "negative_prompt", "width", "height")  # what every cell of one grid has in common


class AblationError(ValueError):
    """A config the runner cannot run; the message says what to change."""


class ScoreError(Exception):
    """The config's score function refused the cells' images or prompts."""


def read_config(path):
    """The config file's dict, its fields checked (the cells' settings are checked against the model by
    check_cells): unknown fields, missing or empty axes, prompts, intervention names."""
    config = read_config_file(path)
    unknown = sorted(set(config) - FIELDS)
    if unknown:
        raise AblationError(f"{path}: unknown field {unknown[0]!r}; the fields are {', '.join(sorted(FIELDS))}")
    controls = CONTROL_AXES if config.get("controlnets") else {}
    grid = {"intervention": ["none"], "seed": [0], **controls, **config.get("grid", {})}
    if set(grid) & set(CONTROL_AXES) and not controls:
        raise AblationError(f"{path}: the control axes sweep ControlNets; give controlnets and control_images too")
    if len(config.get("control_images", [])) != len(config.get("controlnets", [])):
        raise AblationError(f"{path}: give one control image per ControlNet (control_images, controlnets)")
    if set(grid) - set(AXES) - set(controls) or any(not isinstance(v, list) or not v for v in grid.values()) \
            or set(AXES) - set(grid):
        raise AblationError(f"{path}: grid needs the axes {', '.join(AXES)}, each a non-empty list "
                            f"(intervention and seed may be left out), got {sorted(grid)}")
    if not config.get("prompts") or not all(isinstance(p, str) for p in config["prompts"]):
        raise AblationError(f"{path}: prompts must be a non-empty list of strings")
    for axis, ok, what in [("steps", lambda n: isinstance(n, int) and n > 0, "positive whole numbers"),
                           ("seed", lambda n: isinstance(n, int) and 0 <= n < 2**64, "whole numbers from 0"),
                           ("cfg", lambda n: isinstance(n, (int, float)) and n == n, "numbers")] + \
            [(axis, lambda n: isinstance(n, (int, float)) and n == n, "numbers") for axis in controls]:
        if not all(ok(value) for value in grid[axis]):
            raise AblationError(f"{path}: grid {axis} must be {what} (got {grid[axis]})")
    named = {"none": None, **config.get("interventions", {})}
    missing = [i for i in grid["intervention"] if i not in named]
    if missing:
        raise AblationError(f"{path}: intervention {missing[0]!r} is not in interventions ({', '.join(named)})")
    return {**DEFAULTS, **config, "grid": grid, "interventions": named}


def axes(grid):
    """The grid's axes in order: AXES, with the control axes (where it has them) before the seed."""
    return AXES[:-1] + tuple(a for a in CONTROL_AXES if a in grid) + AXES[-1:]


def cells(grid):
    """Every combination of the axes, in the grid's order: dicts with one value per axis."""
    return [dict(zip(axes(grid), values)) for values in itertools.product(*(grid[axis] for axis in axes(grid)))]


def settings(config, cell, prompt):
    control = dict(control_images=tuple(config["control_images"]), control_start=cell["control_start"],
                   control_end=cell["control_end"], control_scales=(cell["control_scale"],) * len(config["controlnets"])
                   ) if config["controlnets"] else {}
    return Settings(prompt=prompt, negative_prompt=config["negative_prompt"], width=config["width"],
                    height=config["height"], steps=cell["steps"], cfg=cell["cfg"], sampler=cell["sampler"],
                    seed=cell["seed"], **control)


def check_cells(config, info):
    """Every cell's settings against the model's headers (ModelInfo), before its weights load: ValueError."""
    for controlnet in config["controlnets"]:
        if inspect_controlnet(controlnet, info.config.unet)[1].control_types:
            raise AblationError(f"{controlnet} is a ControlNet-Union, which needs a control type per image; ablation "
                                "configs take plain ControlNets")
    for cell in cells(config["grid"]):
        make_schedule(cell["sampler"], cell["steps"], config=info.scheduler_config)
        for prompt in config["prompts"]:
            opened = check_settings(settings(config, cell, prompt))
            check(opened, info.config)
            check_control(opened, len(config["controlnets"]))


def cell_name(cell):
    control = f"-control{cell['control_scale']:g}-{cell['control_start']:g}-{cell['control_end']:g}" \
        if "control_scale" in cell else ""
    return f"{cell['sampler']}-{cell['steps']}-cfg{cell['cfg']:g}-{cell['intervention']}{control}-seed{cell['seed']}.png"


def what_is_shared(config):
    """What every cell of a grid shares, beside its own settings: a folder's cells are of one such grid."""
    shared = {key: str(config[key]) if key == "model" else config[key] for key in SHARED}
    return shared | ({key: list(map(str, config[key])) for key in ("controlnets", "control_images")}
                     if config["controlnets"] else {})


def check_folder(out, config):
    """A folder holding cells of another grid (other model, prompts or size) is refused: they would be taken as
    this grid's. ablation.json records what its cells share."""
    record = out / "ablation.json"
    if record.exists() and json.loads(record.read_text()) != json.loads(json.dumps(what_is_shared(config))):
        raise AblationError(f"{out} holds cells of a grid with another model, prompts, negative prompt or size "
                            f"({record}); use another --out, or delete {out} to start over")


def run(config, out, device="cpu", dtype="fp32", progress=True):
    """Generate the cells not yet on disk, then write the contact sheet and the score table."""
    pipe = Pipeline.load(config["model"], dtype=dtype, device=device, config=config["model_config"],
                         controlnets=config["controlnets"])
    width, height = config["width"], config["height"]
    every = cells(config["grid"])
    todo = [c for c in every if not (out / "cells" / cell_name(c)).exists()]
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if not (out / "ablation.json").exists():
        with atomic_file(out / "ablation.json") as tmp:
            tmp.write_text(json.dumps(what_is_shared(config), indent=2) + "\n")
    bar = tqdm(total=len(every), initial=len(every) - len(todo), desc="ablation", disable=not progress)
    for cell in todo:
        make = config["interventions"][cell["intervention"]]
        images = []
        with make(pipe.model) if make else nullcontext():
            for prompt in config["prompts"]:
                images += pipe(settings(config, cell, prompt), progress=False)
        row = Image.new("RGB", (width * len(images), height))
        for i, image in enumerate(images):
            row.paste(image, (i * width, 0))
        save_png(row, out / "cells" / cell_name(cell), ", ".join(f"{k}: {v}" for k, v in cell.items()))
        bar.update(1)
    bar.close()
    return summarize(config, out, width)


def summarize(config, out, width):
    """contact_sheet.png from the cells on disk and, with a score, scores.md; returns the table's text or None."""
    rows = [(cell, Image.open(out / "cells" / cell_name(cell)).convert("RGB")) for cell in cells(config["grid"])]
    label = 160  # px of text on the left of each row
    W, H = rows[0][1].size
    sheet = Image.new("RGB", (label + W, H * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (cell, image) in enumerate(rows):
        sheet.paste(image, (label, i * H))
        text = (f"{cell['sampler']} {cell['steps']} steps cfg {cell['cfg']:g}\n"
                f"{cell['intervention']}, seed {cell['seed']}")
        if "control_scale" in cell:
            text += f"\ncontrol {cell['control_scale']:g} from {cell['control_start']:g} to {cell['control_end']:g}"
        draw.multiline_text((4, i * H + 4), text, fill="black")
    with atomic_file(out / "contact_sheet.png", overwrite=True) as tmp:  # ours: redrawn from the cells every run
        sheet.save(tmp, format="PNG")
    if config["score"] is None:
        return None
    pooled = {}  # (sampler, steps, cfg, intervention) -> the images of all its seeds, and their prompts
    for cell, image in rows:
        key = tuple(cell[a] for a in axes(config["grid"])[:-1])
        images = [image.crop((i * width, 0, (i + 1) * width, H)) for i in range(W // width)]
        pooled_images, pooled_prompts = pooled.setdefault(key, ([], []))
        pooled_images.extend(images)
        pooled_prompts.extend(config["prompts"])
    table = None
    for key, (images, prompts) in pooled.items():
        try:
            scores = config["score"](images, prompts)
        except ValueError as e:  # e.g. a prompt the classifier's caption reader does not know
            raise ScoreError(f"the config's score failed on {key}: {e}; the cells are written and kept") from None
        if table is None:
            names = axes(config["grid"])[:-1]
            table = [f"| {' | '.join(names)} | {' | '.join(scores)} |", "|---" * (len(names) + len(scores)) + "|"]
        table.append(f"| {' | '.join(map(str, key))} | {' | '.join(f'{v:.3f}' for v in scores.values())} |")
    text = "\n".join(table) + "\n"
    with atomic_file(out / "scores.md", overwrite=True) as tmp:  # ours: recomputed from the cells every run
        tmp.write_text(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sampling.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", help="overrides the config's model")
    parser.add_argument("--out", help="overrides the config's out")
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    try:
        config = read_config(args.config)
        if args.model:
            config["model"] = args.model
        out = Path(args.out or config["out"] or f"runs/{Path(args.config).stem}")
        check_output(out, "--out" if args.out else "out")  # it, or a folder above it, a file
        check_folder(out, config)
        device = check_device(args.device)
        check_cells(config, inspect(config["model"], config["model_config"]))  # headers only: before the big load
    except (ValueError, LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        table = run(config, out, device, args.dtype)
    except ScoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = len(list((out / "cells").glob("*.png")))
        print(f"error: interrupted; {done} cell(s) are written and kept, and the same command continues",
              file=sys.stderr)
        return 130
    print(f"wrote {out / 'contact_sheet.png'}" + (f" and {out / 'scores.md'}:\n{table}" if table else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
