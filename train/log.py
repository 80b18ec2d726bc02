"""A run's rank-0 I/O besides checkpoints and the export: the run folder and its TensorBoard, output_dir/log.jsonl
(one JSON line per step, machine-readable: the tests read it), and the message of a run that diverged."""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train.checkpoint import intact_checkpoint, start_run_folder


def start_run(config, process, model, params, step, resume_from, note):
    """On the main process, the run folder (train/checkpoint.py's start_run_folder: the config, and with
    overwrite the old run's files gone) and TensorBoard -> the writer (None elsewhere). Every process calls
    it: all wait at its barrier until the folder is ready."""
    writer = None
    if process.main and note:
        print(f"note: {note}", file=sys.stderr)
    if process.main:
        start_run_folder(config, step, resumed=resume_from is not None)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(Path(config.output_dir) / "tensorboard")
        total = sum(p.numel() for p in params)
        print(f"training {total:,} parameters ({len(params)} tensors) of {sum(p.numel() for p in model.parameters()):,}"
              f" on {process.world} process(es); global batch {config.batch_size * config.grad_accum * process.world}")
    if process.ddp:
        dist.barrier()  # the run folder is ready before anyone writes a checkpoint into it
    return writer


def log_step(config, writer, out, step, sums, scheduler, grad_norm, seconds, data, validation=None):
    """One step's numbers to TensorBoard and to output_dir/log.jsonl (the same, machine-readable; with the
    validation loss where one was measured) -> the loss."""
    inst_loss, prior_loss = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    total_loss = inst_loss + config.prior_loss_weight * prior_loss
    for name, value in [("loss/total", total_loss), ("loss/instance", inst_loss), ("loss/prior", prior_loss),
                        ("lr", scheduler.get_last_lr()[0]), ("grad_norm", float(grad_norm)),
                        ("images_per_s", float(sums[2]) * (2 if "class" in data else 1) / seconds)]:
        writer.add_scalar(name, value, step)
    if validation is not None:
        writer.add_scalar("loss/validation", validation, step)
    # On a GPU, the device's peak allocation so far (GiB): what tests/benchmarks/gpu.py reports.
    peak = {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)} if torch.cuda.is_initialized() else {}
    record = {"step": step, "loss": total_loss, "instance": inst_loss, "prior": prior_loss, "lr": scheduler.get_last_lr()[0],
              "grad_norm": finite_or_none(float(grad_norm)), "seconds": round(seconds, 4)}
    record |= ({"validation": validation} if validation is not None else {}) | peak
    with open(out / "log.jsonl", "a") as log:  # the tests read it
        log.write(json.dumps(record) + "\n")
    return total_loss


def finite_or_none(x):
    return x if math.isfinite(x) else None  # log.jsonl stays valid JSON (json.dumps would write NaN)


def divergence(config, sums, step, scheduler, out):
    """The message of a run whose loss or gradients stopped being finite at this step."""
    kept = intact_checkpoint(out / "checkpoints")
    return (f"the {'loss' if not sums.isfinite().all() else 'gradient'} became NaN or inf at step {step + 1} "
            f"(lr {scheduler.get_last_lr()[0]:g}): the run diverged; lower lr"
            + (", or use mixed_precision=bf16 (fp16 overflows)" if config.mixed_precision == "fp16" else "")
            + ". Nothing was exported; " + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved yet"))
