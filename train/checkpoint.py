"""Training state on disk, without pickle: output_dir/checkpoints/step-NNNNNN/state.safetensors, and the
run folder around it (which files are a run's, how a resumed or replaced run prepares it).

Tensors (trainable weights, optimizer moments, every process's RNG state) are safetensors; the few
numbers around them (step, optimizer hyper-parameters, lr schedule, grad scaler, config) are JSON in
the file's metadata. A checkpoint is written under a temporary folder name and renamed into place,
so a kill mid-write leaves the previous checkpoint intact; only the newest keep_checkpoints remain.
"""

import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import safe_open, save_file

from models.files import atomic_file
from train.config import save_config
from train.optim import gathered, sharded_like

RUN_FILES = ("config.json", "log.jsonl", "checkpoints", "model.safetensors", "lora.safetensors", "model-ema.safetensors",
             "lora-ema.safetensors", "controlnet", "controlnet-ema", "tensorboard", "validation")


def _rng_state(device):
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def save_checkpoint(folder, step, named, optimizer, scheduler, scaler, config, rank, world, ema=None):
    """Called by every process (it gathers their RNG states, and with parallel=fsdp the weights and moments, one
    tensor at a time); process 0 writes."""
    device = named[0][1].device
    rng = [None] * world
    if world > 1:
        dist.all_gather_object(rng, _rng_state(device))  # objects between live processes, not a file
    else:
        rng = [_rng_state(device)]
    if hasattr(optimizer, "consolidate_state_dict"):  # parallel=zero: every process sends its shard to process 0
        optimizer.consolidate_state_dict(to=0)
    averaged = ema.whole(keep=rank == 0) if ema is not None else {}  # (a collective under zero and fsdp)
    sharded = hasattr(named[0][1], "full_tensor")  # parallel=fsdp: DTensors, gathered by every process
    if rank != 0 and not sharded:
        return
    keep = rank == 0
    tensors = {f"param.{name}": gathered(p.detach(), keep) for name, p in named}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        tensors.update({f"optimizer.{index}.{k}": gathered(v, keep) for k, v in state.items()})
    tensors |= {f"ema.{name}": t for name, t in averaged.items()}
    if not keep:
        return
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    tensors.update({f"rng.{r}": state for r, state in enumerate(rng)})
    meta = {"step": step, "param_groups": opt["param_groups"], "schedule": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "config": asdict(config), "world_size": world,
            "names": [name for name, _ in named]}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / f"step-{step:06d}", folder / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, tmp / "state.safetensors", metadata={"plainxl.train_state": json.dumps(meta)})
    if final.exists():  # the same step saved again (e.g. SIGTERM right after a scheduled save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old)


def latest_checkpoint(folder):
    found = sorted(Path(folder).glob("step-*")) if Path(folder).is_dir() else []
    return found[-1] if found else None


def read_meta(path):
    """The JSON beside a checkpoint's tensors; ValueError (one sentence) if path is not an intact checkpoint."""
    path = Path(path) / "state.safetensors" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; pass resume='latest' or a step-NNNNNN folder")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
    except Exception as e:  # safetensors' errors: truncated, not safetensors, unreadable
        raise ValueError(f"checkpoint {path} is damaged ({e})") from None
    if "plainxl.train_state" not in meta:
        raise ValueError(f"{path} is a model file, not a training checkpoint; pass a step-NNNNNN folder of "
                         "output_dir/checkpoints, or resume='latest'")
    meta = json.loads(meta["plainxl.train_state"])
    missing = [n for n in meta["names"] if f"param.{n}" not in names]
    if missing:
        raise ValueError(f"checkpoint {path} is damaged (no tensor for {missing[0]})")
    return meta


def find_checkpoint(resume, folder):
    """The checkpoint to resume from -> (path or None, note or None). For resume='latest', the newest
    intact one in `folder`: a damaged newer one (a disk filled up mid-write) is passed over, and said so."""
    if resume is None:
        return None, None
    if resume != "latest":
        read_meta(resume)  # raises for anything that is not an intact checkpoint
        return Path(resume), None
    found = sorted(Path(folder).glob("step-*"), reverse=True) if Path(folder).is_dir() else []
    skipped = []
    for path in found:
        try:
            read_meta(path)
        except ValueError as e:
            skipped.append(str(e))
            continue
        note = f"{'; '.join(skipped)}: resuming from {path} instead" if skipped else None
        return path, note
    if skipped:
        raise ValueError(f"no intact checkpoint in {folder} ({skipped[0]}); start again without resume=")
    return None, f"no checkpoint in {folder} yet: starting from step 0"


def load_checkpoint(path, model, named, optimizer, scheduler, scaler, rank, ema=None):
    """Restore everything save_checkpoint wrote into the live objects; returns the step."""
    path = Path(path) / "state.safetensors" if Path(path).is_dir() else Path(path)
    read_meta(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["plainxl.train_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta["names"] != [name for name, _ in named]:
        raise ValueError(f"checkpoint {path} trains other parameters than this config's train= and lora_* fields; "
                         "resume with the config it was made with")
    with torch.no_grad():
        for name, p in named:
            if tensors[f"param.{name}"].shape != p.shape:
                raise ValueError(f"checkpoint {path} holds {name} as {tuple(tensors[f'param.{name}'].shape)}, this run "
                                 f"as {tuple(p.shape)}; resume with the config it was made with")
            p.copy_(sharded_like(tensors[f"param.{name}"], p))
    state = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, index, k = key.split(".", 2)
            # AdamW's moments are shaped as their weight and sharded like it; its step count is a number.
            state.setdefault(int(index), {})[k] = t if k == "step" else sharded_like(t, named[int(index)][1])
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if ema is not None:
        ema.load({k.removeprefix("ema."): t for k, t in tensors.items() if k.startswith("ema.")})
    scheduler.load_state_dict(meta["schedule"])  # the learning-rate scheduler
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    if f"rng.{rank}" in tensors:
        rng = tensors[f"rng.{rank}"]
        cpu_len = torch.get_rng_state().numel()
        torch.set_rng_state(rng[:cpu_len])
        if rng.numel() > cpu_len and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[cpu_len:])
    return meta["step"]


def start_run_folder(config, step, resumed):
    """Rank 0, after preflight: output_dir ready for this run. overwrite=True (when nothing is resumed) removes
    only the files a run writes (RUN_FILES). A resumed run keeps log.jsonl's lines up to its step, and moves
    checkpoints newer than that step aside (superseded-step-N: kept, but no longer 'latest' or pruned)."""
    out = Path(config.output_dir)
    if config.overwrite and not resumed:
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for newer in sorted((out / "checkpoints").glob("step-*")):
        if int(newer.name[5:]) > step:
            newer.rename(newer.with_name("superseded-" + newer.name))
            print(f"note: {newer} is newer than the step resumed from; kept as {newer.with_name('superseded-' + newer.name)}",
                  file=sys.stderr)
    log = out / "log.jsonl"
    if log.exists():  # lines past the checkpoint were made by steps that are about to run again
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line cut short by a kill mid-append
        with atomic_file(log, overwrite=True) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))
    save_config(config, out / "config.json")


def intact_checkpoint(folder):
    try:
        return find_checkpoint("latest", folder)[0]
    except ValueError:
        return None
