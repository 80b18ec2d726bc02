"""DreamBooth for SDXL (Ruiz et al. 2023): teach the model a subject from a few images while a
prior-preservation loss on generated class images keeps the class from collapsing onto it.
With prior_loss_weight=0 it is plain fine-tuning on captioned images (how the bundled tiny model is
pretrained), and task="vae" trains the VAE on images with the same loop.

    python -m train.dreambooth [--config configs/<name>.py] [--field=value ...]
    torchrun --nproc_per_node=N -m train.dreambooth [...]

One readable loop, in nanoGPT order: config -> DDP setup -> frozen parts -> trainable parts in DDP ->
optimizer -> loop -> rank-0 I/O -> teardown. Every random number of a step (crop, flip, latent
sample, noise, timestep) comes from a generator seeded by (seed, step, sample index), so the run is
a function of the global batch, not of the number of processes, and resume is exact.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C during the seconds of imports below: one line and exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("error: interrupted before training started; nothing was written", file=sys.stderr),
                                             os._exit(130)))

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.class_images import generate_class_images, missing_class_images, share
from data.dreambooth import DataError, ImageFolder, check_folder, dataset_index, sample_generator
from models.conditioning import encode_text, vector_condition
from models.files import DTYPES
from models.loading import LoadError, check_device, inspect, load, out_of_memory, save_single_file
from models.lora import CONV_TARGETS, add_adapters, kohya_metadata, matches, merge_lora, save_lora
from models.sdxl import SDXL
from models.tokenizer import load_tokenizers, tokenize
from sampling.pipeline import NonFiniteError
from sampling.schedule import alphas_cumprod, make_schedule
from train.checkpoint import (
    RUN_FILES, find_checkpoint, intact_checkpoint, load_checkpoint, read_meta, save_checkpoint, start_run_folder,
)
from train.config import ConfigError, default, load_config
from train.optim import fuse_into_backward, fused_grad_norm, make_optimizer, shard_unet, unsharded_unet

INSTANCE, CLASS = 0, 1  # kinds of sample
NOISE, TIMESTEP, LATENT, OFFSET, TAGS, CAPTION = 1, 2, 3, 4, 5, 6  # generator streams of a sample (0: augmentation)


def trainable_parameters(model, patterns, task="dreambooth"):
    """(name, parameter) pairs that train: names matching a pattern ("unet" = everything under unet.;
    wildcards as in fnmatch, e.g. "unet.*attn2*"). The VAE trains only in the "vae" task (and then
    alone). CLIP-L's last layer and final LayerNorm never do: SDXL reads CLIP-L's penultimate layer,
    so they get no gradient (and DDP would wait for one forever)."""
    te1 = model.text_encoder_1
    unused = set()
    if te1 is not None:
        last = len(te1.text_model.encoder.layers) - 1
        unused = {n for n, _ in model.named_parameters()
                  if n.startswith((f"text_encoder_1.text_model.encoder.layers.{last}.", "text_encoder_1.text_model.final"))}
    chosen = [(n, p) for n, p in model.named_parameters()
              if any(matches(n, pat) for pat in patterns) and n.startswith("vae.") == (task == "vae")
              and n not in unused]
    if not chosen:
        where = "vae." if task == "vae" else "unet., text_encoder_1., text_encoder_2. (e.g. ['unet'] or ['unet.*attn2*'])"
        raise ConfigError(f"train={patterns} matches no parameter of the {task} task; use names under {where}")
    return chosen


def lora_adapters(model, config):
    """A LoRA run's adapters on `model` (hooked in, see models.lora): lora_targets, and with lora_conv_rank
    the ResBlock and sampler convolutions (kohya's conv_dim), among what train= names."""
    allowed = {name for name, _ in trainable_parameters(model, config.train, config.task)}
    patterns = list(config.lora_targets) + (list(CONV_TARGETS) if config.lora_conv_rank else [])
    try:
        return add_adapters(model, patterns, config.lora_rank, config.lora_alpha or config.lora_rank,
                            config.lora_conv_rank, allowed, seed=config.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def lr_factor(config, step):
    """Linear warmup over warmup_steps, then constant, linear decay or cosine decay to 0 at max_steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[config.lr_schedule]


class TrainStep(nn.Module):
    """The differentiable part of a step, wrapped in DDP: text encoders + UNet -> per-sample loss. A LoRA
    run's adapters are registered here too, so that DDP all-reduces their gradients; their hooks sit
    inside the modules they change. With cached_text (cache_text_embeddings) the encoders ran once before
    training and are not part of the step."""

    def __init__(self, model, adapters=None, cached_text=False):
        super().__init__()
        self.unet, self.lora, self.cached_text = model.unet, adapters, cached_text
        if not cached_text:
            self.text_encoder_1, self.text_encoder_2 = model.text_encoder_1, model.text_encoder_2
        self.micro_cond_dim = model.config.unet.micro_cond_dim

    def forward(self, text, numbers, noisy, t, target, weight, text_kept):
        """text: token ids (N, 77) from each tokenizer; with cached_text, the encoders' outputs for them."""
        context, pooled = text if self.cached_text else encode_text(self.text_encoder_1, self.text_encoder_2, *text)
        # Caption dropout zeroes the text conditioning, as the pipeline's zero negative does at inference.
        context, pooled = context * text_kept[:, None, None], pooled * text_kept[:, None]
        prediction = self.unet(noisy, t, context, vector_condition(pooled, numbers, self.micro_cond_dim))
        return ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3)) * weight  # (N,)


class VAEStep(nn.Module):
    """The "vae" task, for pretraining a VAE with this same loop: reconstruction MSE + kl_weight * KL.

    (sgm uses L1 plus a perceptual and a GAN loss. On the tiny model L1 alone trained slower: at step
    750 of 1500 its reconstructions had about 40% more squared error than an MSE run's.)"""

    def __init__(self, vae, kl_weight):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels, eps):
        mean, logvar = self.vae.encode(pixels)  # (N, z, h, w) each
        reconstruction = self.vae.decode(mean + torch.exp(0.5 * logvar) * eps)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))  # KL(q(z|x) || N(0, I))
        return ((reconstruction.float() - pixels) ** 2).mean(dim=(1, 2, 3)) + self.kl_weight * kl  # (N,)


def make_vae_batch(config, data, model, step, j0, device):
    """The "vae" task's inputs: this process's instance images and their latent-sampling noise."""
    G = config.batch_size * config.grad_accum * world_size()
    pixels, eps = [], []
    for j in range(j0, j0 + config.batch_size):
        index = dataset_index(config.seed, step * G + j, len(data["instance"]))
        g = sample_generator(config.seed, step, j, 0)
        pixels.append(data["instance"].example(index, config.resolution, config.center_crop, config.random_flip, g).pixels)
        z_shape = (model.config.vae.z_channels, config.resolution // 8, config.resolution // 8)
        eps.append(torch.randn(z_shape, generator=sample_generator(config.seed, step, j, LATENT)))
    return torch.stack(pixels).to(device), torch.stack(eps).to(device)


@dataclass
class EncodedImages:
    """A folder's images through the frozen VAE, for cache_latents: posterior mean and logvar
    (N, z, R/8, R/8), the size conditions (N, 6) and the prompts."""

    mean: torch.Tensor
    logvar: torch.Tensor
    numbers: torch.Tensor
    prompts: list


@torch.no_grad()
def encode_images(model, images, config, device, chunk=64, count=None):
    """The first `count` (default: every) image of an ImageFolder, center-cropped and unflipped as
    cache_latents requires, encoded once."""
    count = len(images) if count is None else min(count, len(images))
    parts, numbers = [], []
    for start in range(0, count, chunk):
        examples = [images.example(i, config.resolution, True, False, torch.Generator())
                    for i in range(start, min(start + chunk, count))]
        parts.append(model.vae.encode(torch.stack([e.pixels for e in examples]).to(device)))
        numbers += [[*e.original_size, *e.crop_top_left, *e.target_size] for e in examples]
    mean, logvar = (torch.cat(p) for p in zip(*parts))
    return EncodedImages(mean, logvar, torch.tensor(numbers, dtype=torch.float32, device=device), images.prompts)


@torch.no_grad()
def encode_captions(model, data, tokenizers, autocast, device, chunk=64):
    """cache_text_embeddings: every prompt of the data (and a refiner's dropped-caption "") through the frozen
    text encoders once, under the loop's autocast -> {prompt: (context (77, C), pooled (P,))}, kept on the CPU.
    Tokenized as TrainStep's path does (one 77-token chunk, no weights), not as sampling.prompts.encode_prompts."""
    prompts = sorted({p for folder in data.values() for p in folder.prompts}
                     | ({""} if model.text_encoder_1 is None else set()))
    cache = {}
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        with autocast:
            context, pooled = encode_text(model.text_encoder_1, model.text_encoder_2,
                                          tokenize(tokenizers[0], batch).to(device), tokenize(tokenizers[1], batch).to(device))
        cache.update({p: (c.cpu(), q.cpu()) for p, c, q in zip(batch, context, pooled)})
    return cache


def make_batch(config, data, model, tokenizers, acp, step, j0, device, texts=None):
    """This process's samples j0 .. j0 + batch_size - 1 of the step: instance images first, then (with
    prior preservation) their paired class images. `data` holds ImageFolders, or EncodedImages with
    cache_latents; `texts` is encode_captions()' cache with cache_text_embeddings. Returns the TrainStep inputs."""
    G = config.batch_size * config.grad_accum * world_size()  # the global batch of one optimizer step
    keys, picks = [], []  # (global sample index, kind): instance j and class j form pair j; (folder, image)
    for kind, name in [(INSTANCE, "instance"), (CLASS, "class")]:
        if name not in data:
            continue
        for j in range(j0, j0 + config.batch_size):
            picks.append((data[name], dataset_index(config.seed + kind, step * G + j, len(data[name].prompts))))
            keys.append((j, kind))
    n = len(keys)
    gens = lambda stream: [sample_generator(config.seed, step, j, 10 * kind + stream) for j, kind in keys]
    with torch.no_grad():
        if config.cache_latents:
            mean, logvar = (torch.stack([getattr(folder, a)[i] for folder, i in picks]) for a in ("mean", "logvar"))
            numbers = torch.stack([folder.numbers[i] for folder, i in picks])
        else:
            examples = [folder.example(i, config.resolution, config.center_crop, config.random_flip, g)
                        for (folder, i), g in zip(picks, gens(0))]
            mean, logvar = model.vae.encode(torch.stack([e.pixels for e in examples]).to(device))  # (n, z, h, w)
            numbers = torch.tensor([[*e.original_size, *e.crop_top_left, *e.target_size] for e in examples],
                                   dtype=torch.float32, device=device)
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens(LATENT)]).to(device)
        latents = (mean + torch.exp(0.5 * logvar) * eps) * model.vae.config.scaling_factor  # (n, 4, R/8, R/8)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens(NOISE)]).to(device)
    if config.noise_offset:  # per-channel offset noise (Guttenberg 2023): helps very dark / bright images
        offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in gens(OFFSET)])
        noise = noise + config.noise_offset * offset.to(device)
    t = torch.cat([torch.randint(0, config.max_timestep or len(acp), (1,), generator=g) for g in gens(TIMESTEP)]).to(device)
    a = acp.to(device)[t][:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # q(x_t | x_0), variance preserving
    v_pred = model.config.prediction_type == "v_prediction"  # v_pred marker keys / a folder's scheduler config
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_pred else noise
    weight = torch.ones(n, device=device)
    if config.snr_gamma is not None:  # Min-SNR-gamma (Hang et al. 2023), per sample
        snr = (a / (1 - a)).flatten().clamp(min=1e-8)  # zero terminal SNR: 0 at t = T-1, and eps weights divide by it
        weight = torch.minimum(snr, torch.full_like(snr, config.snr_gamma)) / (snr + 1 if v_pred else snr)
    prompts = [drop_tags(folder.prompts[i], config.caption_tag_dropout_rate, config.keep_tokens, g)
               for (folder, i), g in zip(picks, gens(TAGS))]
    text_kept = torch.tensor([float(torch.rand(1, generator=g) >= config.caption_dropout_rate) for g in gens(CAPTION)],
                             device=device)  # (n,) 0 where the caption is dropped
    if model.text_encoder_1 is None:
        # A refiner's negative is the encoded empty prompt with the negative aesthetic score (diffusers'
        # force_zeros_for_empty_prompt=False): a dropped caption becomes exactly that, not zeros.
        prompts = [p if kept else "" for p, kept in zip(prompts, text_kept.tolist())]
        scores = torch.where(text_kept > 0, config.aesthetic_score, config.negative_aesthetic_score)
        numbers = torch.cat([numbers[:, :4], scores[:, None]], dim=1)  # orig h, w, crop top, left, score
        text_kept = torch.ones_like(text_kept)
    if texts is not None:
        text = tuple(torch.stack(part).to(device) for part in zip(*(texts[p] for p in prompts)))  # context, pooled
    else:
        text = tokenize(tokenizers[0], prompts).to(device), tokenize(tokenizers[1], prompts).to(device)
    return text, numbers, noisy, t.float(), target, weight, text_kept


def drop_tags(prompt, rate, keep, generator):
    """The prompt without each of its comma-separated tags, past the first `keep`, with probability `rate`."""
    if rate == 0:
        return prompt
    tags = [tag.strip() for tag in prompt.split(",")]
    draws = torch.rand(len(tags), generator=generator).tolist()
    return ", ".join(tag for i, (tag, u) in enumerate(zip(tags, draws)) if i < keep or u >= rate)


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # exit codes as a shell reports a signal: 128 + number


class Diverged(Exception):
    """The loss or the gradients stopped being finite; the message says what to change."""


def preflight(config):
    """Every check that needs no weights, before anything loads or is written. Returns (device,
    checkpoint to resume from or None, a note for the user or None). Raises ConfigError/LoadError/DataError."""
    try:
        device = check_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(config.output_dir)
    check_folder(out, "output_dir")  # FILE/run too: nothing is written before every output path is known good
    check_folder(config.class_data_dir, "class_data_dir")
    ImageFolder(config.instance_data_dir, config.instance_prompt, "instance_data_dir")  # every image decoded
    info = inspect(config.model, config.model_config)  # the model's headers: a bad --model fails before the load
    if info.config.unet.in_channels != info.config.vae.z_channels:
        raise ConfigError(f"{config.model} is an inpainting model ({info.config.unet.in_channels} UNet input "
                          "channels); this loop trains text-to-image models")
    refiner = info.config.text_encoder_1 is None
    if refiner and ((config.prior_loss_weight > 0 and config.task == "dreambooth") or config.validation_prompt):
        raise ConfigError(f"{config.model} is a refiner, which cannot make class or validation images from noise; "
                          "train it with prior_loss_weight=0 and no validation_prompt")
    if (config.prior_loss_weight > 0 and config.task == "dreambooth") or config.validation_prompt:
        try:  # the class and validation images' sampler and steps, against this model's schedule
            make_schedule(config.class_sampler, config.class_steps, config=info.scheduler_config)
        except ValueError as e:
            raise ConfigError(f"class_sampler={config.class_sampler!r}, class_steps={config.class_steps}: {e}") from None
    with torch.device("meta"):  # weightless: train= and lora_targets are checked before anything loads
        meta = SDXL(info.config)
        trained = [name for name, _ in trainable_parameters(meta, config.train, config.task)]
        if config.cache_text_embeddings and any(name.startswith("text_encoder") for name in trained):
            raise ConfigError(f"cache_text_embeddings needs frozen text encoders, but train={config.train} trains "
                              "some; train only unet.* names, or set cache_text_embeddings=False")
        if config.lora_rank:
            lora_adapters(meta, config)
    previous = [name for name in RUN_FILES if (out / name).exists()]
    try:
        checkpoint, note = find_checkpoint(config.resume, out / "checkpoints")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if checkpoint is not None:  # what trains, and how, must be the checkpoint's: else the resumed run is another run
        made_with = read_meta(checkpoint)["config"]
        for name in ("train", "lora_rank", "lora_alpha", "lora_targets", "lora_conv_rank", "base_dtype", "optimizer",
                     "fused_backward", "master_dtype"):
            saved = made_with.get(name, default(name))  # an older checkpoint: the default then
            if saved != getattr(config, name):
                raise ConfigError(f"{checkpoint} was made with {name}={saved!r}, this run has {getattr(config, name)!r}; "
                                  f"resume with the same {name}")
    # resume=latest with nothing to resume from would start over on top of the old run's files.
    if previous and (config.resume is None or checkpoint is None) and not config.overwrite:
        raise ConfigError(f"output_dir {out} holds another run ({', '.join(previous)})"
                          + (" but no checkpoint to resume" if config.resume else "")
                          + "; pass --resume=latest to continue it, --overwrite=True to replace it, or another --output_dir")
    if config.overwrite and previous:  # what overwrite would remove must not be what this run reads
        inputs = [info.path, Path(config.instance_data_dir), Path(config.class_data_dir)]
        for name in previous:
            for used in inputs:
                if used.resolve().is_relative_to((out / name).resolve()):
                    raise ConfigError(f"overwrite=True would delete {out / name}, which holds {used} that this run "
                                      "reads; copy it elsewhere first, or use another --output_dir")
    return device, checkpoint, note


def finite_or_none(x):
    return x if math.isfinite(x) else None  # log.jsonl stays valid JSON (json.dumps would write NaN)


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


def train(config, device, resume_from, note):
    # ---------------------------------------------------------------- DDP setup from torchrun's env
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if ddp:  # NCCL between GPUs, gloo on CPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_process = rank == 0
    out = Path(config.output_dir)
    # SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) are noted, not raised: the loop finishes its
    # step, saves a checkpoint and exits non-zero. Before the loop, a second Ctrl-C stops at once.
    stop = {"requested": 0, "looping": False}  # the signal number, 0 while running

    def on_signal(signum, _):
        if stop["requested"] and not stop["looping"]:
            raise KeyboardInterrupt
        stop["requested"] = signum

    for signum in INTERRUPTED:
        signal.signal(signum, on_signal)

    try:
        # ------------------------------------------------------------ frozen parts, data
        # A LoRA run's frozen base in base_dtype; a full fine-tuning's model in master_dtype, frozen parts too.
        weights_dtype = config.base_dtype if config.lora_rank else config.master_dtype
        if weights_dtype == "fp32":
            model = load(config.model, dtype="fp32", device=device, config=config.model_config)
        else:  # cast on the CPU, so that the device never holds the model in float32
            model = load(config.model, dtype="fp32", config=config.model_config)
            for part in filter(None, (model.unet, model.text_encoder_1, model.text_encoder_2)):
                part.to(DTYPES[weights_dtype])  # the VAE stays float32: SDXL's overflows in fp16
            model.to(device)
        data = {"instance": ImageFolder(config.instance_data_dir, config.instance_prompt, "instance_data_dir")}
        if config.prior_loss_weight > 0 and config.task == "dreambooth":
            todo = missing_class_images(config.class_data_dir, config.num_class_images)  # same list on every rank
            if ddp:
                dist.barrier()  # nobody writes before everybody has listed what is missing
            Path(config.class_data_dir).mkdir(parents=True, exist_ok=True)
            generate_class_images(model, config, share(todo, rank, world), rank)
            if ddp:
                dist.barrier()
            data["class"] = ImageFolder(config.class_data_dir, config.class_prompt, "class_data_dir")
    except (LoadError, DataError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.requires_grad_(False)
    autocast = torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        config.mixed_precision, torch.float32), enabled=config.mixed_precision != "no")
    tokenizers = load_tokenizers()
    texts = encode_captions(model, data, tokenizers, autocast, device) if config.cache_text_embeddings else None
    if config.cache_latents:
        data = {name: encode_images(model, images, config, device) for name, images in data.items()}
    # What the loop no longer runs leaves the device (validation moves it back while it runs).
    if config.cache_latents:
        model.vae.to("cpu")
    if config.cache_text_embeddings:
        for part in filter(None, (model.text_encoder_1, model.text_encoder_2)):
            part.to("cpu")

    # ---------------------------------------------------------------- trainable parts in DDP
    fsdp = ddp and config.parallel == "fsdp"  # one process has nothing to shard
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
                   else TrainStep(model, adapters, cached_text=config.cache_text_embeddings)).train()
    # Every parameter that requires grad is used in forward (trainable_parameters sees to it, and add_adapters
    # only hooks modules whose weights it picks),
    # so DDP needs no find_unused_parameters and all-reduces exactly the trainable gradients.
    # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets instead of beside them (saves
    # one copy of the trainable gradients: 9.6 GiB for the full SDXL UNet in fp32).
    # fused_backward steps inside backward, before DDP's buckets would all-reduce: its hooks all-reduce instead;
    # FSDP reduce-scatters the gradients itself, after every micro-step: the accumulated gradients stay 1/N.
    wrap = ddp and not config.fused_backward and not fsdp
    ddp_step = DDP(step_module, device_ids=[local_rank] if device.type == "cuda" else None,
                   gradient_as_bucket_view=True) if wrap else step_module

    # ---------------------------------------------------------------- optimizer, schedule, scaler
    params = [p for _, p in named]
    optimizer = make_optimizer(config, params)  # AdamW or Adafactor; sharded, fused, bf16 (train/optim.py)
    if config.fused_backward:
        fuse_into_backward(optimizer, config.max_grad_norm, world)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    step = 0
    if resume_from:
        try:
            step = load_checkpoint(resume_from, model, named, optimizer, schedule, scaler, rank)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if main_process and note:
        print(f"note: {note}", file=sys.stderr)

    if main_process:
        start_run_folder(config, step, resumed=resume_from is not None)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tensorboard")
        total = sum(p.numel() for p in params)
        print(f"training {total:,} parameters ({len(params)} tensors) of {sum(p.numel() for p in model.parameters()):,}"
              f" on {world} process(es); global batch {config.batch_size * config.grad_accum * world}")
    if ddp:
        dist.barrier()  # the run folder is ready before anyone writes a checkpoint into it

    if stop["requested"]:  # asked during the load or the class images: nothing trained, nothing to save
        raise KeyboardInterrupt
    stop["looping"] = True
    acp = alphas_cumprod(zero_terminal_snr=model.config.zero_terminal_snr)
    G_local = config.batch_size * world  # samples per micro-step, all processes together

    # ---------------------------------------------------------------- the loop
    bar = tqdm(total=config.max_steps, initial=step, disable=not main_process, desc="dreambooth")
    stopping = 0  # the signal number all processes agreed to stop on (the highest one any of them got)
    while step < config.max_steps:
        started = time.perf_counter()
        sums = torch.zeros(3, device=device)  # instance loss, prior loss, pairs (for logging)
        for micro in range(config.grad_accum):
            j0 = micro * G_local + rank * config.batch_size  # first global sample index of this process
            if config.task == "vae":
                inputs = make_vae_batch(config, data, model, step, j0, device)
            else:
                inputs = make_batch(config, data, model, tokenizers, acp, step, j0, device, texts)
            # Only the last micro-step all-reduces gradients; the others accumulate locally.
            last = micro == config.grad_accum - 1
            with ddp_step.no_sync() if wrap and not last else nullcontext():
                with autocast:
                    per_sample = ddp_step(*inputs)  # (B,) instance [+ (B,) class]
                B = config.batch_size
                instance, prior = per_sample[:B], per_sample[B:]
                pair_loss = instance + config.prior_loss_weight * prior if len(prior) else instance  # (B,)
                loss = pair_loss.mean() / config.grad_accum  # DDP averages over processes: the global mean
                scaler.scale(loss).backward()
            sums += torch.stack([instance.detach().sum(), prior.detach().sum(), torch.tensor(float(B), device=device)])
        if ddp:  # losses of every process (for the log and the divergence check), before the step
            dist.all_reduce(sums)
        if config.fused_backward:  # already stepped, tensor by tensor, each clipped by its own norm
            grad_norm = fused_grad_norm(optimizer)
        else:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)  # the same on every process
            if fsdp:
                grad_norm = grad_norm.full_tensor()  # over every process's shards
        # A NaN/inf loss, or NaN/inf gradients without fp16's scaler (which skips such steps by design), would
        # write non-finite weights: stop before the step, keeping the checkpoints already on disk. (fused_backward
        # stepped every finite tensor already, and none that was not: the weights in memory are never exported.)
        if not sums.isfinite().all() or (not scaler.is_enabled() and not grad_norm.isfinite()):
            kept = intact_checkpoint(out / "checkpoints")
            bar.close()  # its line stays above the message
            raise Diverged(f"the {'loss' if not sums.isfinite().all() else 'gradient'} became NaN or inf at step "
                           f"{step + 1} (lr {schedule.get_last_lr()[0]:g}): the run diverged; lower lr"
                           + (", or use mixed_precision=bf16 (fp16 overflows)" if config.mixed_precision == "fp16" else "")
                           + ". Nothing was exported; " + (f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved yet"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step += 1

        # Whether any process was asked to stop, decided once per step for all of them: a signal arriving
        # later in this step (say during validation) counts at the next one, so every process agrees.
        stopping = stop["requested"]
        if ddp:
            flag = torch.tensor(float(stopping), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = int(flag)
        inst_loss, prior_loss = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        total_loss = inst_loss + config.prior_loss_weight * prior_loss

        # ------------------------------------------------------------ rank-0 I/O
        if main_process:
            seconds = time.perf_counter() - started
            for name, value in [("loss/total", total_loss), ("loss/instance", inst_loss), ("loss/prior", prior_loss),
                                ("lr", schedule.get_last_lr()[0]), ("grad_norm", float(grad_norm)),
                                ("images_per_s", float(sums[2]) * (2 if "class" in data else 1) / seconds)]:
                writer.add_scalar(name, value, step)
            with open(out / "log.jsonl", "a") as log:  # the same numbers, machine-readable (tests read them)
                log.write(json.dumps({"step": step, "loss": total_loss, "instance": inst_loss, "prior": prior_loss,
                                      "lr": schedule.get_last_lr()[0], "grad_norm": finite_or_none(float(grad_norm)),
                                      "seconds": round(seconds, 4)}) + "\n")
            bar.set_postfix(loss=f"{total_loss:.4f}")
            bar.update(1)
        if config.validation_prompt and step % config.validation_every == 0 and (main_process or fsdp):
            # With FSDP every process runs the UNet (its forward gathers the shards); only process 0 writes.
            validate(model, config, step, out, writer if main_process else None, device)
        if step % config.checkpoint_every == 0 or stopping or step == config.max_steps:
            save_checkpoint(out / "checkpoints", step, named, optimizer, schedule, scaler, config, rank, world)
        if stopping:
            break
    bar.close()

    # ---------------------------------------------------------------- export, teardown
    code = 0
    if fsdp and not stopping:  # every process gathers the shards; process 0 exports the whole UNet
        model.unet = unsharded_unet(model.unet, keep=main_process)
    if main_process and not stopping:
        try:
            if config.task == "vae":
                set_scaling_factor(model, data["instance"], config, device)
            if adapters is None:
                save_single_file(model, out / "model.safetensors", dtype=config.export_dtype, overwrite=True)
                print(f"wrote {out / 'model.safetensors'}")
            else:
                export_lora(model, adapters, config, out)
        except (LoadError, OSError) as e:  # NaN weights, a full disk: the checkpoints stay, the export is not made
            print(f"error: {e} (the checkpoints in {out / 'checkpoints'} are kept)", file=sys.stderr)
            code = 2
    if stopping:
        name = signal.Signals(stopping).name
        if main_process:
            print(f"error: interrupted by {name} at step {step}; the checkpoint is saved in {out / 'checkpoints'}: "
                  "run the same command with --resume=latest to continue", file=sys.stderr)
        code = INTERRUPTED[stopping]
    if main_process:
        writer.close()
    if ddp:
        dist.barrier()  # rank 0 reaches it whatever the export did: nobody waits forever
        dist.destroy_process_group()
    return code


def export_lora(model, adapters, config, out):
    """output_dir/lora.safetensors in kohya's format; with merge_lora, also the base (read again from its file,
    in float32) with that very file merged in by models.lora, as --lora does at generation."""
    base_version = "sdxl_base_v1-0" if model.text_encoder_1 is not None else "sdxl_refiner_v1-0"
    metadata = kohya_metadata(adapters, base_version, Path(config.output_dir).name, steps=config.max_steps,
                              learning_rate=config.lr, resolution=f"({config.resolution}, {config.resolution})",
                              seed=config.seed)
    save_lora(adapters, out / "lora.safetensors", DTYPES[config.export_dtype], metadata)
    print(f"wrote {out / 'lora.safetensors'}")
    if config.merge_lora:
        merged = load(config.model, dtype="fp32", config=config.model_config)
        merge_lora(merged, out / "lora.safetensors")
        save_single_file(merged, out / "model.safetensors", dtype=config.export_dtype, overwrite=True)
        print(f"wrote {out / 'model.safetensors'} (the base with the LoRA merged in)")


@torch.no_grad()
def set_scaling_factor(model, images, config, device, count=256):
    """Give the trained VAE the scaling_factor that makes its latents unit-variance for the UNet:
    1 / std of latents sampled from the first `count` images (how Rombach et al. got SD's 0.18215)."""
    model.vae.eval()
    encoded = encode_images(model, images, config, device, chunk=64, count=count)
    n, step = len(encoded.mean), config.max_steps  # noise from generators of a step the run never reached
    eps = torch.cat([torch.randn(encoded.mean[start:start + 64].shape,
                                 generator=sample_generator(config.seed, step, start, LATENT)) for start in range(0, n, 64)])
    latents = encoded.mean + torch.exp(0.5 * encoded.logvar) * eps.to(device)
    factor = round(1 / latents.std().item(), 5)
    model.config = replace(model.config, vae=replace(model.config.vae, scaling_factor=factor))
    model.vae.config = model.config.vae
    print(f"VAE scaling_factor: {factor} (1 / std of the latents of {n} images)")


def validate(model, config, step, out, writer, device):
    """One image of validation_prompt with a fixed seed, to output_dir/validation/ and TensorBoard (writer None:
    another process of an FSDP run, which takes part in the generation and writes nothing). Parts parked on the
    CPU (cache_latents, cache_text_embeddings) visit the device while they run, as with --offload."""
    import numpy as np

    from sampling.pipeline import Pipeline, Settings

    model.eval()
    pipe = Pipeline(model)
    pipe.offload = device
    try:
        image = pipe(Settings(prompt=config.validation_prompt, width=config.resolution,
                                         height=config.resolution, steps=config.class_steps, cfg=config.class_cfg,
                                         sampler=config.class_sampler, seed=config.seed), progress=False)[0]
    except NonFiniteError as e:  # training goes on; the loss check stops it if the weights themselves diverged
        print(f"note: no validation image at step {step}: {e}", file=sys.stderr)
        return
    finally:
        model.train()
    if writer is None:
        return
    (out / "validation").mkdir(exist_ok=True)
    image.save(out / "validation" / f"step-{step:06d}.png")
    writer.add_image("validation", np.asarray(image), step, dataformats="HWC")


if __name__ == "__main__":
    raise SystemExit(main())
