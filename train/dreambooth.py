"""DreamBooth for SDXL (Ruiz et al. 2023): teach the model a subject from a few images while a
prior-preservation loss on generated class images keeps the class from collapsing onto it.
With prior_loss_weight=0 it is plain fine-tuning on captioned images (how the bundled tiny model is
pretrained), and task="vae" trains the VAE on images with the same loop.

    python -m train.dreambooth [--config configs/<name>.py] [--field=value ...]
    torchrun --nproc_per_node=N -m train.dreambooth [...]

One readable loop, in nanoGPT order, and the files it calls on:

    main            config (train/config.py) -> every check before a load (train/preflight.py) -> train
    train           DDP setup -> frozen parts and data -> trainable parts in DDP -> optimizer
                    (train/optim.py) -> the loop -> export (train/export.py) and teardown
    the loop        batches (train/batches.py) -> per-sample losses (train/losses.py) -> backward ->
                    clip -> step -> rank-0 I/O (log_step) -> validation and checkpoints (train/checkpoint.py)

Every random number of a step (crop, flip, latent sample, noise, timestep) comes from a generator seeded
by (seed, step, sample index), so the run is a function of the global batch, not of the number of
processes, and resume is exact.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the seconds of imports below: one line and exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted before training started; nothing was "
                                                   "written", file=sys.stderr), os._exit(130)))

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.dreambooth import DataError
from models.files import DTYPES
from models.loading import LoadError, load, out_of_memory
from models.tokenizer import load_tokenizers
from sampling.pipeline import NonFiniteError
from sampling.schedule import alphas_cumprod
from train.batches import encode_captions, encode_images, make_batch, make_vae_batch, training_data
from train.checkpoint import load_checkpoint, save_checkpoint
from train.config import ConfigError, load_config
from train.controlnet import attach_controlnet
from train.ema import make_ema
from train.export import export
from train.log import divergence, log_step, start_run
from train.losses import TrainStep, VAEStep
from train.optim import clip_gradients, make_optimization, shard_unet, unsharded_unet
from train.preflight import lora_adapters, preflight, trainable_parameters
from train.validation import evaluate, validation_set

INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit codes as a shell reports a signal: 128 + number


class Diverged(Exception):
    """The loss or the gradients stopped being finite; the message says what to change."""


def main(argv=None):
    # ---------------------------------------------------------------- config, and every check before a load
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
        device, resume_from, note = preflight(config)
    except (ConfigError, LoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handlers = {s: signal.getsignal(s) for s in INTERRUPTED}
    try:
        return train(config, device, resume_from, note)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        print(f"error: {device} ran out of memory; use a smaller batch_size or resolution, gradient_checkpointing=True,"
              " or mixed_precision=bf16", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop (it handles Ctrl-C itself): nothing to save yet
        print("error: interrupted before training started; class images made so far are kept, and the same "
              "command continues", file=sys.stderr)
        return 130
    except Diverged as e:  # every process stops at the same step (the losses are all-reduced); one says why
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        for signum, handler in handlers.items():  # Ctrl-C works as before for whoever called main()
            signal.signal(signum, handler)


@dataclass
class Process:
    """This process's place in the run, from torchrun's environment variables (one process without them)."""

    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def start_process(device):
    """DDP setup from torchrun's env: this process's GPU, and the process group (NCCL between GPUs, gloo on CPU)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Process(ddp, rank, local_rank, world, device)


class StopRequests:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) are noted, not raised: the loop finishes its
    step, saves a checkpoint and exits non-zero. Before the loop, a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal, self.looping = 0, False  # the signal number asked for, 0 while running
        for signum in INTERRUPTED:
            signal.signal(signum, self.note)

    def note(self, signum, _):
        if self.signal and not self.looping:
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, process):
        """The signal every process stops on, the highest any of them got (0: none), decided once per step for
        all of them: a signal arriving later in the step (say during validation) counts at the next one."""
        if not process.ddp:
            return self.signal
        flag = torch.tensor(float(self.signal), device=process.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)


def load_frozen(config, process):
    """The model, frozen, in the dtype its frozen parts train beside, and the data: the instance images and,
    with prior preservation, the class images (made first where missing, each process a share)."""
    # A LoRA run's frozen base in base_dtype; a full fine-tuning's model in master_dtype, frozen parts too.
    weights_dtype = config.base_dtype if config.lora_rank else config.master_dtype
    if weights_dtype == "fp32":
        model = load(config.model, dtype="fp32", device=process.device, config=config.model_config)
    else:  # cast on the CPU, so that the device never holds the model in float32
        model = load(config.model, dtype="fp32", config=config.model_config)
        for part in filter(None, (model.unet, model.text_encoder_1, model.text_encoder_2)):
            part.to(DTYPES[weights_dtype])  # the VAE stays float32: SDXL's overflows in fp16
        model.to(process.device)
    if config.task == "controlnet":
        attach_controlnet(model, config)  # (train/controlnet.py)
    model.requires_grad_(False)
    data = training_data(config, model, process)
    if config.v_parameterization:  # after the class images, which the model makes as it is
        model.config = replace(model.config, prediction_type="v_prediction", zero_terminal_snr=config.zero_terminal_snr)
    return model, data


def cache_inputs(config, model, data, tokenizers, autocast, device):
    """cache_text_embeddings and cache_latents: the frozen encoders run once over the data, then wait on the
    CPU (validation moves them back while it runs). -> (data, the caption cache or None)."""
    texts = encode_captions(model, data, tokenizers, autocast, device) if config.cache_text_embeddings else None
    if config.cache_latents:
        data = {name: encode_images(model, images, config, device) for name, images in data.items()}
        model.vae.to("cpu")
    if config.cache_text_embeddings:
        for part in filter(None, (model.text_encoder_1, model.text_encoder_2)):
            part.to("cpu")
    return data, texts


def make_trainable(config, model, process, fsdp):
    """What trains, in DDP (or sharded by FSDP) -> (LoRA adapters or None, [(name, parameter)], the step
    module: train/losses.py's, wrapped in DDP where DDP all-reduces the gradients)."""
    adapters = lora_adapters(model, config) if config.lora_rank else None  # float32, beside the frozen weights
    if adapters is not None and config.master_dtype == "bf16":
        adapters.to(torch.bfloat16)
    if adapters is not None:
        named = [(f"lora.{name}", p) for name, p in adapters.named_parameters()]
    else:
        for _, p in trainable_parameters(model, config.train, config.task):
            p.requires_grad_(True)
        if fsdp:
            shard_unet(model.unet)  # its parameters become this process's shards (DTensors)
        named = trainable_parameters(model, config.train, config.task)
    model.unet.gradient_checkpointing = config.gradient_checkpointing
    step_module = (VAEStep(model.vae, config.kl_weight) if config.task == "vae"
                   else TrainStep(model, adapters, config.cache_text_embeddings, config.loss_type,
                                  getattr(model, "controlnet", None))).train()
    # Every parameter that requires grad is used in forward (trainable_parameters sees to it, and add_adapters
    # only hooks modules whose weights it picks), so DDP needs no find_unused_parameters and all-reduces
    # exactly the trainable gradients. gradient_as_bucket_view: gradients live in DDP's all-reduce buckets
    # instead of beside them (saves one copy of the trainable gradients: 9.6 GiB for the full SDXL UNet in fp32).
    # fused_backward steps inside backward, before DDP's buckets would all-reduce: its hooks all-reduce instead;
    # FSDP reduce-scatters the gradients itself, after every micro-step: the accumulated gradients stay 1/N.
    wrap = process.ddp and not config.fused_backward and not fsdp
    ddp_step = DDP(step_module, device_ids=[process.local_rank] if process.device.type == "cuda" else None,
                   gradient_as_bucket_view=True) if wrap else step_module
    return adapters, named, ddp_step


def train(config, device, resume_from, note):
    # ---------------------------------------------------------------- DDP setup, frozen parts, data
    process, stop = start_process(device), StopRequests()
    device, rank, world, out = process.device, process.rank, process.world, Path(config.output_dir)
    try:
        model, data = load_frozen(config, process)
    except (LoadError, DataError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    autocast = autocast_of(config, device)
    tokenizers = load_tokenizers()
    held = validation_set(model, config, data.pop("held"), tokenizers, autocast, device) if "held" in data else None
    data, texts = cache_inputs(config, model, data, tokenizers, autocast, device)

    # ---------------------------------------------------------------- trainable parts, optimizer, schedule
    fsdp = process.ddp and config.parallel == "fsdp"  # one process has nothing to shard
    adapters, named, ddp_step = make_trainable(config, model, process, fsdp)
    wrap, params = isinstance(ddp_step, DDP), [p for _, p in named]
    optimizer, scheduler, scaler = make_optimization(config, named, process)
    ema = make_ema(config, named, process)  # (float32, sharded as parallel= shards: train/ema.py)
    try:
        step = load_checkpoint(resume_from, model, named, optimizer, scheduler, scaler, rank, ema) if resume_from else 0
    except ValueError as e:  # a checkpoint of other parameters
        print(f"error: {e}", file=sys.stderr)
        return 2
    writer = start_run(config, process, model, params, step, resume_from, note)  # then every process waits
    if stop.signal:  # asked during the load or the class images: nothing trained, nothing to save
        raise KeyboardInterrupt
    stop.looping = True
    alpha_bars = alphas_cumprod(zero_terminal_snr=model.config.zero_terminal_snr)  # the training noise schedule

    # ---------------------------------------------------------------- the loop
    bar = tqdm(total=config.max_steps, initial=step, disable=not process.main, desc="dreambooth")
    stopping = 0  # the signal number all processes agreed to stop on (the highest one any of them got)
    while step < config.max_steps:
        started = time.perf_counter()
        sums = torch.zeros(3, device=device)  # instance loss, prior loss, pairs (for logging)
        for micro in range(config.grad_accum):
            first = (micro * world + rank) * config.batch_size  # this process's first sample of the step
            batch = (make_vae_batch(config, data, model, step, first, device) if config.task == "vae"
                     else make_batch(config, data, model, tokenizers, alpha_bars, step, first, device, texts))
            # Only the last micro-step all-reduces gradients; the others accumulate locally.
            last = micro == config.grad_accum - 1
            with ddp_step.no_sync() if wrap and not last else nullcontext():
                with autocast:
                    per_sample = ddp_step(**vars(batch))  # (B,) instance [+ (B,) class]
                B = config.batch_size
                instance, prior = per_sample[:B], per_sample[B:]
                pair_loss = instance + config.prior_loss_weight * prior if len(prior) else instance  # (B,)
                loss = pair_loss.mean() / config.grad_accum  # DDP averages over processes: the global mean
                scaler.scale(loss).backward()
            sums += torch.stack([instance.detach().sum(), prior.detach().sum(), torch.tensor(float(B), device=device)])
        if process.ddp:  # losses of every process (for the log and the divergence check), before the step
            dist.all_reduce(sums)
        grad_norm = clip_gradients(config, optimizer, scaler, params, fsdp)
        # A NaN/inf loss, or NaN/inf gradients without fp16's scaler (which skips such steps by design): stop before
        # the step, keeping the checkpoints on disk. (fused_backward stepped only finite tensors; nothing is exported.)
        if not sums.isfinite().all() or (not scaler.is_enabled() and not grad_norm.isfinite()):
            bar.close()  # its line stays above the message
            raise Diverged(divergence(config, sums, step, scheduler, out))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if ema is not None:
            ema.update(step)
        stopping = stop.agreed(process)  # a signal arriving later in this step counts at the next one
        held_loss = evaluate(model, config, step, out, writer, process, fsdp, held, alpha_bars, tokenizers, autocast, ema)
        if process.main:  # rank-0 I/O
            seconds = time.perf_counter() - started
            loss = log_step(config, writer, out, step, sums, scheduler, grad_norm, seconds, data, held_loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
        if step % config.checkpoint_every == 0 or stopping or step == config.max_steps:
            save_checkpoint(out / "checkpoints", step, named, optimizer, scheduler, scaler, config, rank, world, ema)
        if stopping:
            break
    bar.close()
    return finish(config, process, model, adapters, data, writer, step, stopping, fsdp, ema)


def autocast_of(config, device):
    """The loop's autocast: bf16 or fp16 as mixed_precision says ("no": off)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=config.mixed_precision != "no")


def finish(config, process, model, adapters, data, writer, step, stopping, fsdp, ema=None):
    """Export a finished run (train/export.py), say how to resume an interrupted one, and tear down. -> exit code."""
    out, code = Path(config.output_dir), 0
    # Every process gathers the shards (of the UNet under fsdp, of the EMA under zero and fsdp); process 0 exports.
    bind_ema = ema.unshard(model, keep=process.main) if ema is not None and ema.sharded and not stopping else None
    if fsdp and not stopping:
        model.unet = unsharded_unet(model.unet, keep=process.main)
    if bind_ema is not None and process.main:
        bind_ema()
    if process.main and not stopping:
        try:
            export(model, adapters, config, out, data, process.device, ema)
        except (LoadError, OSError) as e:  # NaN weights, a full disk: the checkpoints stay, the export is not made
            print(f"error: {e} (the checkpoints in {out / 'checkpoints'} are kept)", file=sys.stderr)
            code = 2
    if stopping:
        if process.main:
            print(f"error: interrupted by {signal.Signals(stopping).name} at step {step}; the checkpoint is saved in "
                  f"{out / 'checkpoints'}: run the same command with --resume=latest to continue", file=sys.stderr)
        code = INTERRUPTED[stopping]
    if process.main:
        writer.close()
    if process.ddp:
        dist.barrier()  # rank 0 reaches it whatever the export did: nobody waits forever
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
