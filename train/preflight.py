"""What trains, and every check of a run that needs no weights, made before anything loads or is written.

    trainable_parameters    the one "what trains" function: train= patterns -> (name, parameter) pairs
    lora_adapters           a LoRA run's adapters (models.adapters) among what train= picks
    preflight               the checks: device, output paths, data, the model's headers, train= and
                            lora_targets on a weightless (meta-device) model, a checkpoint to resume and
                            whether it was made with this config, what overwrite=True would delete
"""

from pathlib import Path

import torch

from data.buckets import class_sizes
from data.dreambooth import check_folder
from models.adapters import CONV_TARGETS, add_adapters
from models.loading import check_device, inspect
from models.lora import matches
from models.sdxl import SDXL
from sampling.schedule import make_schedule
from sampling.settings import size_multiple
from train.batches import instance_images, set_placements
from train.checkpoint import RUN_FILES, find_checkpoint, read_meta
from train.config import ConfigError, default
from train.controlnet import check_control_maps, meta_controlnet


def trainable_parameters(model, patterns, task="dreambooth"):
    """(name, parameter) pairs that train: names matching a pattern ("unet" = everything under unet.;
    wildcards as in fnmatch, e.g. "unet.*attn2*"). The VAE trains only in the "vae" task (and then
    alone), the ControlNet in the "controlnet" task (and then alone). CLIP-L's last layer and final LayerNorm never do: SDXL reads CLIP-L's penultimate layer,
    so they get no gradient (and DDP would wait for one forever)."""
    te1 = model.text_encoder_1
    unused = set()
    if te1 is not None:
        last = len(te1.text_model.encoder.layers) - 1
        unused = {n for n, _ in model.named_parameters()
                  if n.startswith((f"text_encoder_1.text_model.encoder.layers.{last}.", "text_encoder_1.text_model.final"))}
    group = {"vae": "vae.", "controlnet": "controlnet."}  # tasks that train one part alone
    chosen = [(n, p) for n, p in model.named_parameters()
              if any(matches(n, pat) for pat in patterns) and n not in unused
              and all(n.startswith(prefix) == (task == t) for t, prefix in group.items())]
    if not chosen:
        where = "vae." if task == "vae" else "unet., text_encoder_1., text_encoder_2. (e.g. ['unet'] or ['unet.*attn2*'])"
        raise ConfigError(f"train={patterns} matches no parameter of the {task} task; use names under {where}")
    return chosen


def lora_adapters(model, config):
    """A LoRA run's adapters on `model` (hooked in, see models.adapters): lora_targets, and with lora_conv_rank
    the ResBlock and sampler convolutions (kohya's conv_dim), among what train= names."""
    allowed = {name for name, _ in trainable_parameters(model, config.train, config.task)}
    patterns = list(config.lora_targets) + (list(CONV_TARGETS) if config.lora_conv_rank else [])
    try:
        return add_adapters(model, patterns, config.lora_rank, config.lora_alpha or config.lora_rank,
                            config.lora_conv_rank, allowed, seed=config.seed, kind=config.lora_type,
                            factor=config.lokr_factor)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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
    images = instance_images(config)  # every image decoded
    if config.task == "controlnet":
        check_control_maps(images, config)  # and each one's control map
    set_placements(config, [images])  # with buckets: each image placeable
    if config.enable_bucket and config.prior_loss_weight > 0 and config.task == "dreambooth" and not config.dataset_config:
        try:  # enough class images for every bucket
            class_sizes([p.bucket for p in images.placements], config.num_class_images)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    info = inspect(config.model, config.model_config)  # the model's headers: a bad --model fails before the load
    if info.config.unet.in_channels != info.config.vae.z_channels:
        raise ConfigError(f"{config.model} is an inpainting model ({info.config.unet.in_channels} UNet input "
                          "channels); this loop trains text-to-image models")
    multiple = size_multiple(info.config)
    if any(side % multiple for side in config.size) or (config.enable_bucket and config.bucket_reso_steps % multiple):
        raise ConfigError(f"resolution {config.resolution} (and bucket_reso_steps) must be multiples of {multiple}, "
                          f"which {config.model}'s VAE needs (one latent is {info.config.vae.pixels_per_latent} pixels)")
    refiner = info.config.text_encoder_1 is None
    if info.config.takes_aesthetic_score != refiner:
        raise ConfigError(f"{config.model} has {'two text encoders' if not refiner else 'one text encoder'} but a "
                          f"{'refiner' if not refiner else 'base'}'s vector condition; this loop trains SDXL base models "
                          "and refiners as released")
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
        if config.task == "controlnet":
            meta.controlnet = meta_controlnet(config, info.config.unet)  # (config.controlnet's header checked)
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
        for name in ("train", "lora_rank", "lora_alpha", "lora_type", "lokr_factor", "lora_targets", "lora_conv_rank",
                     "base_dtype", "optimizer", "fused_backward", "master_dtype", "ema_decay", "ema_every"):
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
        inputs = [info.path, Path(config.instance_data_dir), Path(config.class_data_dir)] + \
            [Path(p) for p in (config.model_config, config.control_dir, config.controlnet) if p]
        for name in previous:
            for used in inputs:
                if used.resolve().is_relative_to((out / name).resolve()):
                    raise ConfigError(f"overwrite=True would delete {out / name}, which holds {used} that this run "
                                      "reads; copy it elsewhere first, or use another --output_dir")
    return device, checkpoint, note
