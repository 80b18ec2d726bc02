"""What a generation depends on besides the models, and everything decided from it before a sampler runs.

    Settings            the settings of one generation (written into each PNG by sampling.generate)
    size_multiple       what every output side is a multiple of: 8, and the VAE's pixels per latent
    with_output_size    the output size when none is given: the init image's, else the model's
    schedule_steps      how many steps a stage's sampling schedule has
    hires_second_pass   the hi-res fix's second pass, as the Settings of an img2img stage
    window              which steps of the sampling schedule a stage runs (img2img, two-stage handover)
    check_sampler       the sampler, schedule, eta and s_noise fit together
    check               settings a model cannot run, refused in one sentence before the weights load
    memory_estimate     roughly how many bytes a generation needs (checked before the load)

Terms: the *noise schedule* is the model's (alpha_bar_t over the 1000 training timesteps, fixed by training);
a *sampling schedule* (sampling.schedule.Schedule) is the sigmas and timesteps one run steps through.
"""

import math
from dataclasses import dataclass, replace

import torch
from PIL import Image

from models.sdxl import SDXL_SCHEDULER_CONFIG
from sampling.conditioning import check_embeds
from sampling.control import read_control_image
from sampling.images import UPSCALERS, as_image, default_size
from sampling.names import SAMPLER_NAMES, SCHEDULE_NAMES, SPACED_SAMPLERS, WITH_ETA, canonical_sampler


@dataclass
class Settings:
    """What a generation depends on (besides the models); written into each PNG by sampling.generate."""

    prompt: str
    negative_prompt: str | None = None  # None: zero negative conditioning; "": the empty prompt, encoded
    prompt_2: str | None = None  # what bigG reads (diffusers' prompt_2); None: prompt
    negative_prompt_2: str | None = None  # None: negative_prompt
    # Precomputed conditioning instead of text (diffusers' prompt_embeds ...; Python only): context (1 or B, 77k, C)
    # and pooled (1 or B, P) tensors, with prompt "" (sampling/conditioning.py).
    prompt_embeds: object = None
    pooled_prompt_embeds: object = None
    negative_prompt_embeds: object = None
    negative_pooled_prompt_embeds: object = None
    width: int | None = None  # None: the init image's size, else the model's (1024 for SDXL, 64 for plainxl-tiny)
    height: int | None = None
    steps: int = 28
    cfg: float = 5.0
    sampler: str = "euler_ancestral"  # a name of sampling.samplers.SAMPLERS (ComfyUI's), or "euler_a"
    schedule: str = "default"  # "default" (diffusers' scheduler's, or normal) or a name of sampling.sigmas.SCHEDULES
    karras: bool = False  # diffusers' Karras sigmas (timesteps rounded as diffusers): the default schedule only
    eta: float = 1.0  # ancestral and SDE samplers: the share of fresh noise per step
    s_noise: float = 1.0  # ancestral and SDE samplers: a scale on the fresh noise
    gamma: float | None = None  # tcd: the share of each step that is renoised (0: deterministic); None: 0.3, TCD's
    spacing: str | None = None  # the default schedule's timestep spacing (leading, trailing, linspace); None: the model's
    guidance_rescale: float = 0.0
    # Guidance beyond CFG (sampling/guidance.py): perturbed-attention guidance on the self-attention of pag_layers,
    # adaptive projected guidance (APG: its eta, norm threshold and momentum), guidance only for sigma in
    # (cfg_interval[0], cfg_interval[1]].
    pag_scale: float = 0.0
    pag_layers: tuple = ("mid",)
    apg: bool = False
    apg_eta: float = 0.0
    apg_norm_threshold: float = 2.5
    apg_momentum: float = -0.75
    cfg_interval: tuple | None = None
    seed: int = 0
    num_images: int = 1
    original_size: tuple | None = None  # (height, width); None: the output size
    crop_top_left: tuple = (0, 0)
    target_size: tuple | None = None  # (height, width); None: the output size
    # The negative conditioning's own sizes (diffusers' negative_original_size / _crops_coords_top_left /
    # _target_size): used when both sizes are given, else the negative takes the positive's, as diffusers.
    negative_original_size: tuple | None = None
    negative_crop_top_left: tuple = (0, 0)
    negative_target_size: tuple | None = None
    truncate_prompt: bool = False
    # diffusers' clip_skip: the context from k layers fewer in both text encoders (hidden_states[-(k + 2)]), the
    # pooled vector unchanged; None: SDXL's penultimate layer. Applied to the negative prompt too (diffusers
    # 0.42.1 encodes its negative at the penultimate layer whatever clip_skip says; ComfyUI's CLIPSetLastLayer
    # sets both). AUTOMATIC1111 does not apply its "Clip skip" to SDXL, so --from-png leaves it alone.
    clip_skip: int | None = None
    prompt_weights: bool = True  # A1111's (tag:1.2), [tag], BREAK; False reads the prompt literally (diffusers)
    aesthetic_score: float = 6.0  # models whose UNet takes one (refiners), as diffusers' defaults
    negative_aesthetic_score: float = 2.5
    # Image-conditioned generation. init_image: a path or PIL image (img2img; inpainting with `mask`, white
    # = repaint), a list of one PIL image per output, or latents (1 or num_images, 4, h, w) from a stage.
    init_image: object = None
    mask: object = None
    strength: float = 0.75  # the share of the schedule that runs on the init image, in (0, 1]
    img2img_steps: str = "diffusers"  # or "exact": see window()
    # diffusers' two-stage cut, as fractions of the schedule: a base stops at denoising_end and returns its
    # latents, a refiner given them as init_image starts at denoising_start (no noise added).
    denoising_start: float | None = None
    denoising_end: float | None = None
    refiner_start: float = 0.8  # with a refiner: where the base hands over (both of the above)
    # AUTOMATIC1111's hi-res fix: a second, img2img pass at hires_scale x the size.
    hires_scale: float | None = None
    hires_strength: float = 0.7
    hires_steps: int | None = None  # None: steps
    hires_upscaler: str = "latent"  # "latent" (bilinear on the latents) or "lanczos" (on the decoded image)
    # Conditioning adapters (sampling/control.py): one control image (path or PIL image) per ControlNet the pipeline
    # holds, in order, and its scale (() : 1 each); they act on the fractions [control_start, control_end] of the
    # schedule; guess_mode: ControlNet's guess mode (the conditional pass only, coarse levels weighted most).
    control_images: tuple = ()
    control_scales: tuple = ()
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False
    control_types: tuple = ()  # ControlNet-Union: each image's kind (canny, depth, openpose ...), "none" for a plain one
    # T2I-Adapters (models/t2i_adapter.py): one image per adapter the pipeline holds, its scale (() : 1 each), and
    # the share of the stage's first steps they act on (diffusers' adapter_conditioning_factor).
    adapter_images: tuple = ()
    adapter_scales: tuple = ()
    adapter_factor: float = 1.0
    # IP-Adapters (models/ip_adapter.py): one image (path or PIL image) per IP-Adapter the pipeline holds, read as a
    # prompt, and its scale (() : 1 each).
    ip_images: tuple = ()
    ip_scales: tuple = ()


def size_multiple(config):
    """8 (diffusers' check on every size) and the VAE's pixels per latent (8 for SDXL's VAE; 16 for a VAE with
    one level more, whose latents would otherwise silently round the image size down)."""
    return math.lcm(8, config.vae.pixels_per_latent)


def with_output_size(s: Settings, config):
    """s with a width and height left at None set: the init image's size (rounded down to size_multiple), or
    the latents' where it is latents, else the first control image's (as diffusers: a T2I-Adapter's rounded down
    to multiples of 16), else the model's native size (UNet sample_size x pixels per latent)."""
    f = config.vae.pixels_per_latent
    if s.init_image is None and (s.control_images or s.adapter_images):
        first, multiple = (s.control_images or s.adapter_images)[0], 8 if s.control_images else 16
        size = default_size(read_control_image(first), math.lcm(multiple, size_multiple(config)))
    elif s.init_image is None:
        size = (config.unet.sample_size * f,) * 2
    elif is_latents(s.init_image):
        size = (s.init_image.shape[-1] * f, s.init_image.shape[-2] * f)
    else:
        image = s.init_image[0] if isinstance(s.init_image, list) else as_image(s.init_image)
        size = default_size(image, size_multiple(config))
    return replace(s, width=s.width or size[0], height=s.height or size[1])


def is_latents(init_image):
    return isinstance(init_image, torch.Tensor)


def schedule_steps(s: Settings):
    """How many steps the stage's schedule has: `steps`, or int(steps / strength) for the "exact" rule."""
    exact = s.init_image is not None and s.img2img_steps == "exact"
    return int(s.steps / min(s.strength, 0.999)) if exact else s.steps


def hires_second_pass(s: Settings, init_image="the first pass, upscaled", multiple=8):
    """The hi-res fix's second pass: img2img at hires_scale x the size (rounded down to multiples of `multiple`,
    size_multiple) that runs exactly hires_steps steps (default: steps). The default init_image only marks it
    as img2img, for checks before the first pass exists."""
    width, height = (int(side * s.hires_scale) // multiple * multiple for side in (s.width, s.height))
    return replace(s, width=width, height=height,
                   init_image=init_image, strength=s.hires_strength, steps=s.hires_steps or s.steps,
                   img2img_steps="exact", hires_scale=None)


def window(s: Settings, schedule, scheduler_config=None):
    """The steps of `schedule` a stage runs: sigmas[start] down to sigmas[end] -> (start, end).

    Text-to-image runs them all. img2img follows diffusers' get_timesteps: int(steps * strength) steps, the
    tail of the `steps`-step schedule; with img2img_steps="exact", exactly `steps` steps, the tail of an
    int(steps / strength)-step schedule (AUTOMATIC1111's hi-res fix; its img2img tab runs
    int(steps x min(strength, 0.999)) + 1). A refiner's stage (denoising_start) keeps the timesteps below
    round(T (1 - start)); a base's stage (denoising_end) stops before the first timestep below
    round(T (1 - end))."""
    T = {**SDXL_SCHEDULER_CONFIG, **(scheduler_config or {})}["num_train_timesteps"]
    n = len(schedule.timesteps)
    start = 0
    if s.denoising_start is not None:
        start = n - int((schedule.timesteps < round(T - s.denoising_start * T)).sum())
    elif s.init_image is not None:
        start = n - min(int(n * s.strength), n) if s.img2img_steps == "diffusers" else n - s.steps
    end = n
    if s.denoising_end is not None:
        end = start + int((schedule.timesteps[start:] >= round(T - s.denoising_end * T)).sum())
    if end <= start and (s.denoising_start is not None or s.denoising_end is not None):
        raise ValueError(f"with {s.steps} steps, the switch point leaves no step to one stage; move the switch "
                         "point or raise the steps")
    if end <= start:
        raise ValueError(f"{s.steps} steps at strength {s.strength} run no step (img2img runs int(steps x strength), "
                         "as diffusers); raise the steps or the strength")
    return start, end


def check_sampler(s):
    """The sampler, schedule, eta and s_noise of Settings s fit together, or ValueError with the fix."""
    sampler = canonical_sampler(s.sampler)
    if sampler not in SAMPLER_NAMES or s.schedule not in ("default", *SCHEDULE_NAMES):
        raise ValueError(f"sampler {s.sampler!r} / schedule {s.schedule!r}: use one of {', '.join(SAMPLER_NAMES)} / "
                         f"default, {', '.join(SCHEDULE_NAMES)}")
    if s.karras and (s.schedule != "default" or sampler not in ("euler", "euler_ancestral", "dpmpp_2m")):
        raise ValueError(f"--karras is diffusers' Karras schedule for euler, euler_ancestral and dpmpp_2m; with "
                         f"{s.sampler} use --schedule karras (k-diffusion's and ComfyUI's) instead")
    if s.gamma is not None and not (math.isfinite(s.gamma) and 0 <= s.gamma <= 1 and sampler == "tcd"):
        raise ValueError(f"--gamma {s.gamma} is TCD's stochasticity, in [0, 1] and for --sampler tcd only")
    if s.spacing is not None and (s.spacing not in ("leading", "trailing", "linspace") or s.schedule != "default"
                                  or sampler not in SPACED_SAMPLERS):
        raise ValueError(f"--spacing {s.spacing} is the timestep spacing of diffusers' schedule (--schedule default) "
                         f"for {', '.join(SPACED_SAMPLERS)}: leading, trailing or linspace")
    if not (math.isfinite(s.pag_scale) and s.pag_scale >= 0):
        raise ValueError(f"--pag-scale {s.pag_scale} is not a number >= 0; e.g. 3 (0 turns PAG off)")
    if s.cfg_interval is not None and not (0 <= s.cfg_interval[0] < s.cfg_interval[1]):
        raise ValueError(f"--cfg-interval {s.cfg_interval[0]},{s.cfg_interval[1]} is not LOW,HIGH with 0 <= LOW < "
                         "HIGH (sigmas); e.g. 0.28,5.42, the paper's for SDXL")
    for name in ("apg_eta", "apg_norm_threshold", "apg_momentum"):
        if not math.isfinite(getattr(s, name)):
            raise ValueError(f"{name} {getattr(s, name)} is not a finite number")
    for flag, value in [("--eta", s.eta), ("--s-noise", s.s_noise)]:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} {value} is not a number >= 0; e.g. 1 (the default)")
        if value != 1.0 and sampler not in WITH_ETA:
            raise ValueError(f"{flag} applies to the ancestral and SDE samplers ({', '.join(sorted(WITH_ETA))}), "
                             f"not {s.sampler}; drop it or pick one of those")


def check(s: Settings, config, refiner_config=None):
    """ValueError, in one sentence with the fix, for settings the models `config` (and `refiner_config`, a
    refiner's SDXLConfig) cannot run. sampling.generate calls it before the weights load."""
    check_sampler(s)
    check_embeds(s, config, refiner_config)
    encoders = [config.text_encoder_1, config.text_encoder_2] + ([refiner_config.text_encoder_1,
                                                                   refiner_config.text_encoder_2] if refiner_config else [])
    layers = min(te.layers for te in encoders if te is not None)
    if s.clip_skip is not None and not 0 <= s.clip_skip <= layers - 2:
        raise ValueError(f"clip skip {s.clip_skip} is outside 0 .. {layers - 2} (this model's text encoders have "
                         f"{layers} layers or more); e.g. 1 reads the layer before SDXL's penultimate")
    ranges = [("strength", s.strength, "1 repaints the image fully"), ("hi-res strength", s.hires_strength, "e.g. 0.7")]
    for name, value, hint in ranges:
        if not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"{name} {value} is not in (0, 1]; {hint}")
    if s.hires_scale is not None and not (math.isfinite(s.hires_scale) and s.hires_scale > 1):
        raise ValueError(f"hi-res scale {s.hires_scale} must be more than 1 (e.g. 1.5 or 2)")
    if s.hires_upscaler not in UPSCALERS or s.img2img_steps not in ("diffusers", "exact"):
        raise ValueError(f"hi-res upscaler {s.hires_upscaler!r} / img2img_steps {s.img2img_steps!r}: use one of "
                         f"{UPSCALERS} / 'diffusers' or 'exact'")
    if s.mask is not None and (s.init_image is None or is_latents(s.init_image)):
        raise ValueError("a mask needs an init image (the image to inpaint)")
    if s.hires_scale is not None and s.init_image is not None:
        raise ValueError("hi-res fix is a text-to-image pass (as in AUTOMATIC1111); drop the init image, or upscale "
                         "the image yourself and run img2img on it")
    if isinstance(s.init_image, list) and len(s.init_image) != s.num_images:
        raise ValueError(f"{len(s.init_image)} init images for {s.num_images} outputs; give one, or one per output")
    images = s.init_image if isinstance(s.init_image, list) else [s.init_image]
    for image in images if isinstance(s.mask, Image.Image) else []:
        if isinstance(image, Image.Image) and s.mask.size != image.size:
            (mw, mh), (iw, ih) = s.mask.size, image.size
            raise ValueError(f"the mask is {mw}x{mh} but the init image is {iw}x{ih}; give a mask of the image's size")
    multiple = size_multiple(config)
    for name, side in (("width", s.width), ("height", s.height)):
        if side is not None and side % multiple:
            raise ValueError(f"{name} {side} is not a multiple of {multiple} (sizes are multiples of 8, as in diffusers, "
                             f"and of this VAE's {config.vae.pixels_per_latent} pixels per latent); use "
                             f"{side - side % multiple or multiple} or {side - side % multiple + multiple}")
    if config.unet.in_channels == 9:
        if refiner_config is not None:
            raise ValueError("an inpainting model (9 input channels) cannot hand over to a refiner here; drop the refiner")
        if s.mask is None or is_latents(s.init_image):
            raise ValueError("this is an inpainting model (9 input channels); give it an init image and a mask")
    if refiner_config is not None:
        if config.text_encoder_1 is None:
            raise ValueError("the model is a refiner (one text encoder); give a base model, and the refiner as the refiner")
        if (refiner_config.vae.z_channels, refiner_config.vae.pixels_per_latent) != (config.vae.z_channels,
                                                                                  config.vae.pixels_per_latent):
            raise ValueError("the refiner has another latent space than the model; use the base's own refiner")
        if not (math.isfinite(s.refiner_start) and 0 < s.refiner_start < 1):
            raise ValueError(f"the refiner switch point {s.refiner_start} is not in (0, 1); e.g. 0.8")
        if s.mask is not None or s.hires_scale is not None:
            raise ValueError("a refiner runs after text-to-image and img2img here, not with a mask or the hi-res fix")


def memory_estimate(config, settings, parameters, dtype_bytes):
    """Bytes a generation needs, roughly: the weights, the UNet's activations for the CFG batch (its skip
    connections and working set, about 12 model-width feature maps at latent resolution per sample), and
    one image's float32 VAE decode (about 3 full-resolution maps as wide as the decoder's second level:
    the upsampled input, the ResBlock's output and a norm). Attention is taken as memory-efficient (linear
    in tokens), as SDPA's kernels are. SDXL in fp16 at 1024²: 9.7 GiB (published peak: 10.5 GiB)."""
    latent = (settings.height // config.vae.pixels_per_latent) * (settings.width // config.vae.pixels_per_latent)
    batch = settings.num_images * (2 if settings.cfg > 1 else 1)
    unet = batch * latent * config.unet.model_channels * 12 * dtype_bytes
    top = config.vae.ch * max(config.vae.ch_mult[:2])  # the decoder's two full- and half-resolution levels
    vae = settings.height * settings.width * top * 3 * 4
    return parameters * dtype_bytes + unet + vae
