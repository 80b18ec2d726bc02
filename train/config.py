"""DreamBooth training configuration: one dataclass, filled from defaults, an optional config file
(configs/<name>.py defining `config = dict(...)`), then `--field=value` overrides.

On the command line a value is read as a Python literal (`--lr=1e-5`, `--train=["unet"]`,
`--center_crop=True`); anything that is not one is a plain string (`--instance_prompt=a photo of sks dog`).
Unknown fields and wrong types fail at once with a message naming the field.
"""

import ast
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from data.buckets import BUCKET_FIELDS, bucket_problem
from models.adapters import KOHYA_TARGETS, LORA_TYPES
from models.files import atomic_file, read_config_file
from train.controlnet import controlnet_problem
from train.optim import optimizer_problem


@dataclass
class TrainConfig:
    """Every field of a run, each explained where it is declared (kohya's names where kohya has the field)."""

    # ---- the model and the data
    model: str = "cagliostrolab/animagine-xl-4.0"  # a single file, diffusers folder or Hugging Face repo id
    # The architecture of a `model` single file that does not store it and is too narrow to be read from its
    # shapes: its diffusers folder or config JSON (sampling.generate's --config).
    model_config: str | None = None
    instance_data_dir: str = "instance_images"  # the subject's images; a .txt beside an image replaces the prompt
    # kohya's dataset config (a TOML file, data/kohya_config.py): its subsets replace instance_data_dir and
    # class_data_dir (is_reg subsets are the class images; none: no prior preservation), its dataset keys
    # (resolution, batch_size, the bucket keys, prior_loss_weight) these fields, as kohya reads it.
    dataset_config: str | None = None
    instance_prompt: str = "1girl, sks"
    class_data_dir: str = "class_images"  # prior-preservation images, generated up to num_class_images if short
    class_prompt: str = "1girl"
    prior_loss_weight: float = 1.0  # weight of the class loss; 0 turns prior preservation off
    num_class_images: int = 100
    # The training size: R (square) or (W, H); crops of it, re-drawn every step (with center_crop, random_flip).
    # With enable_bucket, the area the aspect-ratio buckets keep (data/buckets.py, kohya's flags and defaults).
    resolution: int | tuple = 1024
    center_crop: bool = False
    random_flip: bool = True  # kohya's flip_aug
    enable_bucket: bool = False  # each image in the bucket of nearest aspect ratio; a batch holds one bucket
    min_bucket_reso: int = 256  # no bucket side below this (rounded down to bucket_reso_steps)
    max_bucket_reso: int = 1024  # no bucket side above this (rounded up to bucket_reso_steps)
    bucket_reso_steps: int = 64  # bucket sides are multiples of this (of 8, SDXL's latents)
    bucket_no_upscale: bool = False  # images only shrink; each gets the bucket of its own size, cut to the steps
    # Encode every image once before training (needs center_crop and no random_flip, so the pixels never
    # change); the latent is still sampled anew from its posterior every step. The VAE then leaves the GPU for
    # the CPU (validation images bring it back for a moment).
    cache_latents: bool = False
    # ... and keep them beside each image (<image>.plainxl-latents.safetensors, as kohya's .npz), reused by later
    # runs while the image, its bucket and crop, and the VAE are unchanged (train/latent_cache.py).
    cache_latents_to_disk: bool = False
    # Encode every prompt once before training, under the loop's autocast (needs frozen text encoders and no
    # caption_tag_dropout_rate, so the prompts never change); the text encoders then leave the GPU as the VAE
    # does with cache_latents (kohya's cache_text_encoder_outputs).
    cache_text_embeddings: bool = False

    # ---- the optimization
    batch_size: int = 1  # instance images per process per micro-step (each paired with one class image)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 800
    lr: float = 2e-6
    lr_schedule: str = "constant"  # constant, linear or cosine (decay to 0 at max_steps), after warmup_steps
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    adam_betas: tuple = (0.9, 0.999)
    weight_decay: float = 1e-2
    train: list = field(default_factory=lambda: ["unet"])  # name patterns over unet.*, text_encoder_1/2.*
    mixed_precision: str = "no"  # no, fp16 (grad scaler) or bf16 autocast; trained weights stay float32
    gradient_checkpointing: bool = False  # recompute UNet blocks in backward to save activation memory
    seed: int = 0

    # ---- outputs, checkpoints, validation
    output_dir: str = "runs/dreambooth"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint path
    overwrite: bool = False  # replace the run already in output_dir (else refused unless resume= is given)
    validation_prompt: str | None = None  # images on the main process, to TensorBoard and output_dir
    validation_every: int = 200

    # A validation loss on instance images held out of training: this share of them (a seeded choice), or the
    # images of validation_dir; each at fixed timesteps with fixed noise (train/validation.py), every
    # validation_every steps, logged beside the training loss.
    validation_split: float = 0.0
    validation_dir: str | None = None

    # An exponential moving average of the trained weights (train/ema.py): None is off, else its decay (e.g.
    # 0.999), updated every ema_every steps; validation reads it, and ema_export "beside" writes it next to the
    # trained weights (model-ema.safetensors, lora-ema.safetensors), "model" instead of them.
    ema_decay: float | None = None
    ema_every: int = 1
    ema_export: str = "beside"

    # ---- regularisers and conditioning
    # Share of samples trained with zeroed text conditioning (context and pooled): the unconditional
    # prediction that classifier-free guidance's zero negative asks for.
    caption_dropout_rate: float = 0.0
    # Drop each comma-separated tag of a prompt with this probability, except the first keep_tokens tags
    # ("tokens" are tags in kohya's names too).
    caption_tag_dropout_rate: float = 0.0
    keep_tokens: int = 0
    shuffle_caption: bool = False  # shuffle a prompt's tags past the first keep_tokens every step (kohya's)
    snr_gamma: float | None = None  # Min-SNR weighting (Hang et al. 2023); None turns it off
    noise_offset: float = 0.0  # per-channel offset noise (Guttenberg 2023)
    # Regularisers as kohya names them (docs/train.md: their papers and where plainxl differs).
    multires_noise_iterations: int = 0  # pyramid noise: coarser noise levels added to the noise; 0 is off
    multires_noise_discount: float = 0.3  # level i weighs discount^i
    ip_noise_gamma: float = 0.0  # input perturbation: the noisy latents from noise + gamma * fresh noise
    debiased_estimation_loss: bool = False  # per-sample weight 1 / sqrt(SNR) (1 / (SNR + 1) for v)
    loss_type: str = "l2"  # l2, huber or smooth_l1 (scheduled pseudo-Huber: c per sample by huber_schedule)
    huber_schedule: str = "snr"  # constant, exponential or snr
    huber_c: float = 0.1
    masked_loss: bool = False  # weight the loss by each image's alpha channel, or by mask_dir's image of its name
    mask_dir: str | None = None
    v_parameterization: bool = False  # train the v target, the export then a v-prediction model (its marker keys)
    zero_terminal_snr: bool = False  # with v_parameterization: betas rescaled to zero terminal SNR
    loraplus_lr_ratio: float | None = None  # LoRA+: the adapters' up weights at lr * this ratio
    # Train on timesteps t < max_timestep only (SDXL's refiner was trained on the low-noise end, t < 200);
    # None: all of them.
    max_timestep: int | None = None
    # A refiner's fifth conditioning number for every captioned sample; a caption-dropped sample gets
    # negative_aesthetic_score and the empty prompt, the refiner pipeline's negative (diffusers' defaults).
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    export_dtype: str = "fp16"  # of output_dir/model.safetensors (and lora.safetensors)
    class_sampler: str = "euler_a"  # class and validation images: sampler, steps, guidance scale
    class_steps: int = 28
    class_cfg: float = 5.0
    class_batch_size: int = 4  # class images made at once
    device: str | None = None  # None: cuda if available, else cpu
    task: str = "dreambooth"  # "vae": train the VAE alone on the instance images (reconstruction + kl_weight * KL)
    kl_weight: float = 1e-6  # task="vae": weight of the KL term
    # task="controlnet" (train/controlnet.py): a ControlNet learns to follow control_dir's control maps (each the
    # image of an instance image's name) beside the frozen model; it starts from the UNet's encoder, or `controlnet`.
    control_dir: str | None = None
    controlnet: str | None = None

    # ---- LoRA
    # 0 trains the chosen weights themselves; more adds LoRA adapters of this rank to them instead (the base
    # stays frozen) and exports output_dir/lora.safetensors in kohya's format (LyCORIS' for lora_type's other kinds).
    lora_rank: int = 0
    lora_alpha: float | None = None  # the adapters' output scale is alpha / rank; None: lora_rank
    # "lora", or a LyCORIS kind (models/adapters.py): "loha" (Hadamard product of two rank-r products), "lokr"
    # (Kronecker product), "dora" (LoRA with the weight decomposed). Those export in LyCORIS' key format.
    lora_type: str = "lora"
    lokr_factor: int = -1  # lora_type="lokr": LoKr's split of each dimension (LyCORIS' factor; -1: nearest sqrt)
    # fnmatch patterns over official module names that get adapters, among what train= names; the default is
    # kohya's SDXL set (models.adapters.KOHYA_TARGETS).
    lora_targets: list = field(default_factory=lambda: list(KOHYA_TARGETS))
    # 0: no convolution adapters; more: ResBlocks', down- and upsamplers' convolutions get them too (LoCon,
    # kohya's conv_dim), at this rank for 3x3 kernels.
    lora_conv_rank: int = 0
    # A LoRA run's frozen UNet and text encoders in fp32, bf16 or fp16 (the adapters and the VAE stay float32:
    # SDXL's VAE overflows in fp16); needs mixed_precision bf16 or fp16.
    base_dtype: str = "fp32"
    merge_lora: bool = False  # also write the base with the adapters merged in as output_dir/model.safetensors

    # ---- memory: optimizer, precision, sharding (train/optim.py)
    # "adamw", or "adafactor" (torch's; factored second moments, a few MB of state; its step is relative,
    # lr * RMS of the weight, so its lr is about 1 / RMS(w) ~ 30-50 times AdamW's).
    optimizer: str = "adamw"
    # Step each tensor inside backward as soon as its gradient is ready and free that gradient (kohya's
    # --fused_backward_pass); max_grad_norm then clips each tensor's gradient by its own norm. Needs
    # grad_accum=1 and no fp16 grad scaler.
    fused_backward: bool = False
    # "fp32", or "bf16": the trained weights are bfloat16 (needs mixed_precision=bf16), updated in float32 and
    # stochastically rounded back; a full fine-tuning then holds the UNet and text encoders in bf16, a LoRA
    # run its adapters.
    master_dtype: str = "fp32"
    # "ddp" (every process holds the whole optimizer state), "zero" (each holds 1/N of it: torch's
    # ZeroRedundancyOptimizer; not with fused_backward or master_dtype=bf16) or "fsdp" (each holds 1/N of the
    # UNet's weights, gradients and AdamW state: FSDP2's fully_shard; train=["unet"] with AdamW, not fp16).
    parallel: str = "ddp"

    def __post_init__(self):
        subsets = self.apply_dataset_config()
        choices = {"lr_schedule": ("constant", "linear", "cosine"), "mixed_precision": ("no", "fp16", "bf16"),
                   "task": ("dreambooth", "vae", "controlnet"), "lora_type": LORA_TYPES, "loss_type": ("l2", "huber", "smooth_l1"),
                   "huber_schedule": ("constant", "exponential", "snr"), "ema_export": ("beside", "model"),
                   "export_dtype": ("fp16", "bf16", "fp32"), "base_dtype": ("fp32", "bf16", "fp16"),
                   "optimizer": ("adamw", "adafactor"), "master_dtype": ("fp32", "bf16"), "parallel": ("ddp", "zero", "fsdp")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        positive = ["ema_every", "bucket_reso_steps", "batch_size", "grad_accum", "max_steps", "checkpoint_every", "validation_every",
                    "keep_checkpoints", "num_class_images", "class_steps", "class_batch_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        numbers = {  # name: (lowest allowed, whether the lowest itself is allowed, highest or None)
            "lr": (0, False, None), "max_grad_norm": (0, False, None), "weight_decay": (0, True, None),
            "prior_loss_weight": (0, True, None), "noise_offset": (0, True, None), "kl_weight": (0, True, None),
            "class_cfg": (0, True, None), "caption_dropout_rate": (0, True, 1), "caption_tag_dropout_rate": (0, True, 1),
            "warmup_steps": (0, True, None), "keep_tokens": (0, True, None), "seed": (0, True, 2**63 - 1),
            "validation_split": (0, True, 0.99), "multires_noise_iterations": (0, True, 32),
            "multires_noise_discount": (0, True, 1), "ip_noise_gamma": (0, True, None), "huber_c": (0, False, 1),
        }
        for name, (low, low_ok, high) in numbers.items():
            v = getattr(self, name)
            if not (math.isfinite(v) and (v >= low if low_ok else v > low) and (high is None or v <= high)):
                bound = f"{'at least' if low_ok else 'more than'} {low}" + (f" and at most {high}" if high else "")
                raise ConfigError(f"{name} must be a number {bound} (got {v})")
        if self.max_timestep is not None and not 1 <= self.max_timestep <= 1000:
            raise ConfigError(f"max_timestep must be between 1 and 1000, or None for all timesteps (got {self.max_timestep})")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number (got {getattr(self, name)})")
        if self.snr_gamma is not None and not (math.isfinite(self.snr_gamma) and self.snr_gamma > 0):
            raise ConfigError(f"snr_gamma must be a number more than 0, or None to turn Min-SNR off (got {self.snr_gamma})")
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), e.g. (0.9, 0.999) (got {self.adam_betas})")
        if len(self.size) != 2 or not all(isinstance(s, int) and s >= 8 and s % 8 == 0 for s in self.size):
            raise ConfigError(f"resolution must be a multiple of 8, or (width, height) of two (got {self.resolution})")
        if problem := bucket_problem(self, moved=[n for n in BUCKET_FIELDS if getattr(self, n) != default(n)]):
            raise ConfigError(problem)
        rules = subsets or [self]  # what decides flips, crops and caption changes: the subsets, or these fields
        flips = any(r.flip_aug if subsets else r.random_flip for r in rules)
        random_crops = any(r.random_crop if subsets else not r.center_crop for r in rules)
        if self.cache_latents and (flips or random_crops or self.task != "dreambooth"):
            raise ConfigError("cache_latents needs center_crop=True and random_flip=False (in a dataset_config: no "
                              "flip_aug or random_crop), so that the pixels never change between steps, and the "
                              "dreambooth task")
        if self.cache_text_embeddings and (any(r.caption_tag_dropout_rate or r.shuffle_caption for r in rules)
                                           or self.task == "vae"):
            raise ConfigError("cache_text_embeddings needs caption_tag_dropout_rate=0 and shuffle_caption=False (the "
                              "prompts must not change between steps) and the dreambooth task")
        if not self.train:
            raise ConfigError("train is empty; name what trains, e.g. train=['unet']")
        if self.cache_latents_to_disk and not self.cache_latents:
            raise ConfigError("cache_latents_to_disk keeps cache_latents' latents on disk; set cache_latents=True too")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be a number between 0 and 1, e.g. 0.999, or None (got {self.ema_decay})")
        if self.ema_decay is None and (self.ema_every != 1 or self.ema_export != "beside"):
            raise ConfigError("ema_every and ema_export apply with ema_decay; set it (e.g. 0.999), or leave them out")
        if self.zero_terminal_snr and not self.v_parameterization:
            raise ConfigError("zero_terminal_snr needs v_parameterization=True (a noise target has no signal at SNR 0)")
        if (self.masked_loss or self.mask_dir) and (not self.masked_loss or self.cache_latents):
            raise ConfigError("mask_dir needs masked_loss=True, and masked_loss works without cache_latents here")
        if self.loraplus_lr_ratio is not None and not (self.lora_rank and self.loraplus_lr_ratio > 0):
            raise ConfigError("loraplus_lr_ratio is for LoRA runs (lora_rank), a number more than 0 (e.g. 16)")
        if (self.validation_split or self.validation_dir) and (self.task != "dreambooth" or
                                                               (self.validation_split and self.validation_dir)):
            raise ConfigError("give validation_split or validation_dir, not both, and only for the dreambooth task")
        self.check_lora()
        if self.task == "controlnet" and self.train == default("train"):
            self.train = ["controlnet"]  # the task's default: the whole ControlNet
        for problem in (optimizer_problem(self), controlnet_problem(self)):  # checked beside their fields' use
            if problem:
                raise ConfigError(problem)

    def dataset(self):
        """dataset_config, read (data.kohya_config.DatasetConfig), or None without one."""
        if self.dataset_config is None:
            return None
        from data.kohya_config import read_dataset_config

        fallback = {key: not value if key == "random_crop" else value for name, key in SUBSET_FIELDS.items()
                    if (value := getattr(self, name)) != default(name)}  # set here: the TOML's last fallback
        try:
            return read_dataset_config(self.dataset_config, fallback)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def subsets(self):
        """dataset_config's subsets (data.kohya_config.Subset), or [] without one."""
        return self.dataset().subsets if self.dataset_config else []

    def apply_dataset_config(self):
        """dataset_config's dataset keys set on these fields (the file's win, as in kohya) -> its subsets."""
        dataset = self.dataset()
        if dataset is None:
            return []
        hints = typing.get_type_hints(TrainConfig)
        for name, value in dataset.settings.items():
            setattr(self, name, _check_type(name, value, hints[name]))
        if not any(s.is_reg for s in dataset.subsets):
            self.prior_loss_weight = 0.0  # kohya: prior preservation comes with regularisation subsets
        return dataset.subsets

    @property
    def size(self):
        """The resolution as (width, height)."""
        return (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)

    def bucket_flags(self):
        """data.buckets.BucketFlags of these fields, or None without enable_bucket."""
        from data.buckets import BucketFlags

        return BucketFlags(self.size, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps,
                           self.bucket_no_upscale) if self.enable_bucket else None

    def check_lora(self):
        for name in ("lora_rank", "lora_conv_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (off) or a positive rank (got {getattr(self, name)})")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ConfigError(f"lora_alpha must be a number more than 0, or None for the rank (got {self.lora_alpha})")
        if not all(isinstance(p, str) for p in self.lora_targets):
            raise ConfigError(f"lora_targets must be a list of name patterns, e.g. ['unet.*.attn2.to_k'] (got {self.lora_targets})")
        lora_only = [name for name in ("lora_alpha", "lora_type", "lokr_factor", "lora_targets", "lora_conv_rank",
                                       "base_dtype", "merge_lora")
                     if getattr(self, name) != default(name)]
        if self.lora_rank == 0 and lora_only:
            raise ConfigError(f"{lora_only[0]} applies to LoRA runs; set lora_rank (e.g. 32), or leave {lora_only[0]} out")
        if self.lokr_factor != default("lokr_factor") and self.lora_type != "lokr":
            raise ConfigError(f"lokr_factor applies to lora_type='lokr' (this run's is {self.lora_type!r}); leave it out")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ConfigError(f"lokr_factor must be -1 (each dimension split nearest its square root) or a positive "
                              f"factor, e.g. 8 (got {self.lokr_factor})")
        if self.lora_rank and self.task == "vae":
            raise ConfigError("the vae task trains the VAE itself; LoRA (lora_rank) is for the dreambooth task")
        if self.base_dtype != "fp32" and self.mixed_precision == "no":
            raise ConfigError(f"base_dtype={self.base_dtype} needs mixed_precision=bf16 or fp16 (autocast runs the "
                              "float32 adapters beside the low-precision weights)")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("lora_targets is empty; name the modules that get adapters, or leave it out for kohya's set")


SUBSET_FIELDS = {"keep_tokens": "keep_tokens", "shuffle_caption": "shuffle_caption", "random_flip": "flip_aug",
                 "caption_dropout_rate": "caption_dropout_rate", "caption_tag_dropout_rate": "caption_tag_dropout_rate",
                 "center_crop": "random_crop"}  # a field set on the command line -> the subset key it stands for


def default(name):
    """A TrainConfig field's default value."""
    f = TrainConfig.__dataclass_fields__[name]
    return f.default if f.default_factory is MISSING else f.default_factory()


class ConfigError(ValueError):
    """A bad config value; the message names the field and the fix."""


def _check_type(name, value, annotation):
    """True if value fits the field's annotation (int accepted for float; None for optional fields)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) \
        else (annotation,)
    for t in options:
        if t is type(None) and value is None:
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t in (list, tuple) and isinstance(value, (list, tuple)):
            return t(value)
        if isinstance(t, type) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
    raise ConfigError(f"{name} must be {names} (got {value!r} of type {type(value).__name__})")


def parse_value(text):
    """A Python literal if it is one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(argv):
    """argv like ['--config', 'configs/x.py', '--lr=1e-5'] -> TrainConfig. Raises ConfigError."""
    values, overrides = {}, {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            try:
                values.update(read_config_file(path))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif arg.startswith("--") and "=" in arg:
            name, text = arg[2:].split("=", 1)
            overrides[name] = parse_value(text)
        elif arg.startswith("--") and args and not args[0].startswith("--"):
            overrides[arg[2:]] = parse_value(args.pop(0))  # also accept --field value
        else:
            raise ConfigError(f"cannot read argument {arg!r}; write --field=value")
    values.update(overrides)
    known = {f.name: f for f in fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for name in values:
        if name not in known:
            close = [k for k in known if k.startswith(name[:4])]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config field {name!r}{hint}")
        values[name] = _check_type(name, values[name], hints[name])
    return TrainConfig(**values)


def save_config(config, path):
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(asdict(config), indent=2) + "\n")
