"""Text-to-image with SDXL: prompts -> conditioning -> guided denoiser -> sampler -> VAE -> pixels.

Reproduces diffusers' StableDiffusionXLPipeline image for image on the same weights and seeds
(tests/test_pipeline_parity.py), and reads top to bottom from `Pipeline.__call__`:

    denoiser                the guided UNet's eps or v -> a denoiser(x, sigma) -> the denoised x in sigma space
                            (the guidance itself, CFG and PAG/APG/intervals, is sampling/guidance.py)
    Pipeline.load           a model file, folder or repo id (+ VAE, LoRAs) -> a Pipeline
      .conditioning         prompts -> (context, y) for the positive and the negative
      .__call__ / .images   settings -> PIL images, each yielded once decoded
      .latents              every stage: text-to-image / img2img / inpainting, refiner, hi-res pass
      .stage                one sampler run over the stage's window of the sampling schedule
      .hires_pass, .encode, .decode
    inpainting              the inpainting stage's start, net and per-step blend (sampling/inpainting.py)
    NonFiniteError          a NaN or inf, caught before any image is made

What a generation's settings are and what is decided from them (sizes, windows, checks) is
sampling/settings.py; the samplers are sampling/samplers.py, their sigmas sampling/schedule.py.
"""

from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

from models.conditioning import guidance_embedding
from models.controlnet import load_controlnet
from models.embeddings import load_embeddings
from models.files import DTYPES
from models.ip_adapter import attached, load_image_prompt
from models.layers import channels_last
from models.loading import load, pipeline_options, read_folder_config, resolve
from models.lora import merge_lora
from models.sdxl import scheduler_config as models_scheduler_config
from models.t2i_adapter import load_adapter
from models.tokenizer import load_tokenizers
from sampling.conditioning import check_micro_conditioning, check_tokenizers, edited_conditioning, encode_conditioning
from sampling.control import Control, check_control, with_image_tokens, with_opened_images
from sampling.guidance import guided, output_from_x0, pag_modules, x0_from_output
from sampling.images import as_image, pixels, upscale_images, upscale_latents
from sampling.inpainting import inpainting
from sampling.names import canonical_sampler
from sampling.noise import brownian_noise, generator_noise, noise_like
from sampling.prompt_editing import at_call
from sampling.samplers import NOISY, SAMPLERS, SDE, SECOND_ORDER, WITH_ETA
from sampling.schedule import consistency_boundary, make_schedule, tcd_levels
from sampling.settings import (
    Settings,
    check,
    hires_second_pass,
    is_latents,
    schedule_steps,
    size_multiple,
    window,
    with_output_size,
)
from sampling.tiling import tiled


def denoiser(net, schedule):
    """A guided net(x_in, t, sigma) -> eps or v, as a denoiser(x, sigma) -> the denoised x0 in sigma space
    (x = x0 + sigma * eps); denoiser(x, sigma, with_uncond=True) -> (x0, the unconditional x0), for CFG++.

    The UNet sees x / sqrt(sigma^2 + 1) (unit variance) and the timestep the schedule pairs with sigma.
    """

    def denoise(x, sigma, with_uncond=False):
        # sigma is a float32 scalar tensor from schedule.sigmas: float32 arithmetic, as diffusers does it.
        t = torch.full((x.shape[0],), float(schedule.timestep(sigma)), device=x.device)
        host, sigma = sigma, sigma.to(x.device)  # the net gets the host's: it reads the value (no device sync)
        x_in = x / (sigma**2 + 1) ** 0.5
        if with_uncond:
            return tuple(x0_from_output(out.float(), x, sigma, schedule.prediction_type)
                         for out in net(x_in, t, host, with_uncond=True))
        return x0_from_output(net(x_in, t, host).float(), x, sigma, schedule.prediction_type)

    return denoise


class Pipeline:
    """Generation with one model. Three ways to run that trade speed for memory and leave the images (nearly) as
    they are, set as attributes: cfg_mode "batch" (one UNet pass over [uncond, cond]) or "split" (two passes);
    vae_tiling, None or a tile size in latents (e.g. 128 = 1024 px), for VAE decodes and encodes of large images
    in overlapping, blended tiles (see tiled()); offload, None or a device (e.g. cuda) that each part of a model
    kept on the CPU visits only while it runs (see on_device())."""

    def __init__(self, model, scheduler_config=None, force_zeros_for_empty_prompt=None, requires_aesthetics_score=None,
                 tokenizers=None, embeddings=(), controlnets=(), adapters=(), ip_adapters=()):
        """force_zeros_for_empty_prompt and requires_aesthetics_score are model_index.json's (None: the official
        folders' choice: zeros without a negative prompt for a base; an aesthetic score where the UNet's vector
        condition has room for one, a refiner's); tokenizers:
        the model's own (None: the bundled ones); embeddings: textual-inversion files (models/embeddings.py);
        controlnets, adapters: ControlNet and T2I-Adapter modules (models/controlnet.py, models/t2i_adapter.py),
        each given its image by Settings.control_images / .adapter_images; ip_adapters: (IPAdapter, its CLIP vision
        encoder) pairs (models/ip_adapter.py), each given its image by Settings.ip_images."""
        self.model = model.eval()
        self.controlnets, self.adapters = ([c.to(next(model.unet.parameters()).device).eval() for c in modules]
                                           for modules in (controlnets, adapters))
        device = next(model.unet.parameters()).device
        self.ip_adapters = [(adapter.to(device).eval(), encoder.to(device).eval()) for adapter, encoder in ip_adapters]
        # Registered on the model too, so that the instruments find them by name (controlnets.0.middle_block_out).
        model.controlnets, model.adapters = nn.ModuleList(self.controlnets), nn.ModuleList(self.adapters)
        model.ip_adapters = nn.ModuleList(adapter for adapter, _ in self.ip_adapters)
        zeros, aesthetic = force_zeros_for_empty_prompt, requires_aesthetics_score
        self.force_zeros = (model.text_encoder_1 is not None) if zeros is None else zeros
        self.requires_aesthetics_score = model.config.takes_aesthetic_score if aesthetic is None else aesthetic
        check_micro_conditioning(model.config, self.requires_aesthetics_score)
        self.cfg_mode, self.vae_tiling, self.offload = "batch", None, None
        if next(model.vae.parameters()).dtype == torch.float16:
            # The SDXL VAE overflows in fp16 (NaN -> black images): keep it in float32, once (+167 MB).
            model.vae.float()
        self.tokenizers = tokenizers or load_tokenizers()
        check_tokenizers(model, self.tokenizers)
        # Textual inversion: {lowercased name: Embedding}, and the tokens each name is written as in a prompt.
        self.loaded_embeddings, self.embeddings = load_embeddings(model, self.tokenizers, embeddings)
        # A folder's own scheduler config if it has one, else the one the model was trained with (v-pred aware).
        self.scheduler_config = scheduler_config or models_scheduler_config(model.config)

    @classmethod
    def load(cls, source, dtype="fp32", device="cpu", vae=None, loras=(), config=None, embeddings=(), controlnets=(),
             adapters=(), ip_adapters=()):
        """A single file, a diffusers folder (its scheduler config, model_index.json settings and tokenizers are
        used) or a Hugging Face repo id; `vae` optionally replaces the model's VAE (a VAE file or diffusers vae/
        folder); `loras`, a list of (file, scale), are merged into the weights in order (models.lora: no cost per
        step); `config`, the architecture of a single file that lacks it (models.loading.load); `embeddings`,
        textual-inversion files; `controlnets`, `adapters`: ControlNets and T2I-Adapters (files, folders or repo ids);
        `ip_adapters`: IP-Adapter files, or (file, its image encoder) pairs (None: the one beside it)."""
        path = resolve(source)
        scheduler_config = read_folder_config(path)[1] if path.is_dir() else None
        options = pipeline_options(path) if path.is_dir() else {}
        model = load(path, dtype=dtype, device=device, vae=vae, config=config)
        for lora, scale in loras:
            merge_lora(model, resolve(lora), scale)
        paths, loaded = [resolve(c) for c in controlnets], {}  # one module per file: a ControlNet-Union given
        for p in paths:                                         # twice (two kinds of image) is loaded once
            loaded[p] = loaded.get(p) or load_controlnet(p, model.unet, DTYPES.get(dtype, dtype))
        controlnets = [loaded[p] for p in paths]
        adapters = [load_adapter(a, model.config.unet, DTYPES.get(dtype, dtype)) for a in adapters]
        ip_adapters = [load_image_prompt(a, model.unet, DTYPES.get(dtype, dtype)) for a in ip_adapters]
        if torch.device(device).type == "cpu":
            channels_last(model.unet, model.vae, *controlnets)
        return cls(model, scheduler_config, tokenizers=load_tokenizers(path) if path.is_dir() else None,
                   embeddings=embeddings, controlnets=controlnets, adapters=adapters, ip_adapters=ip_adapters, **options)

    @property
    def device(self):
        """Where the generation runs: the offload device, else where the weights are."""
        return torch.device(self.offload) if self.offload is not None else next(self.model.parameters()).device

    @contextmanager
    def on_device(self, *names):
        """With offload set, the model's parts `names` ("unet", "vae", "text_encoder_1", ...) move to that device
        for the block and back to where they were after it (also on an error). With the model kept on the CPU
        (--offload) the device holds one part at a time (the two text encoders count as one): the UNet's weights
        at most, where the whole model would need the text encoders and the VAE too (diffusers'
        enable_model_cpu_offload); the trainer's validation images bring back only what it parked on the CPU.
        Without offload, nothing moves."""
        if self.offload is None:
            yield
            return
        device = torch.device(self.offload)
        if device.type == "cuda" and device.index is None:  # "cuda" names the current GPU, as parameters report it
            device = torch.device("cuda", torch.cuda.current_device())
        with ExitStack() as undo:
            for name in names:
                part = getattr(self.model, name)
                home = None if part is None else next(part.parameters()).device
                if home is None or home == device:  # no such part, or there already (the trainer's UNet)
                    continue
                undo.callback(part.to, home)  # first: a failed move is undone too
                part.to(device, memory_format=torch.contiguous_format)  # channels-last: the CPU's (speed.md)
            yield

    @property
    def dtype(self):
        return next(self.model.unet.parameters()).dtype

    @property
    def is_refiner(self):
        return self.model.text_encoder_1 is None

    @property
    def is_inpainting(self):
        """A 9-channel UNet (latents + mask + masked-image latents), as the official SDXL inpainting model."""
        return self.model.config.unet.in_channels == 9

    def conditioning(self, s: Settings):
        """(cond, uncond) as (context, y) pairs, batch num_images; uncond is None without guidance."""
        with self.on_device("text_encoder_1", "text_encoder_2"):
            return encode_conditioning(self, s)

    def __call__(self, settings: Settings, refiner=None, progress=True, callback=None):
        """Generate settings.num_images images -> list of PIL images (image i uses seed + i).

        refiner: another Pipeline (a refiner model) that takes over at settings.refiner_start.
        callback, if given, receives the sampler's dict after every step (i, x, sigma, denoised)."""
        return list(self.images(settings, refiner, progress, callback))

    @torch.no_grad()
    def images(self, settings: Settings, refiner=None, progress=True, callback=None):
        """As __call__, but yields each image as soon as it is decoded (a caller can save it at once).

        Raises NonFiniteError, naming the likely cause, before any image with a NaN or inf is made."""
        latents = self.latents(settings, refiner, progress, callback)
        last_stage = refiner or self  # the refiner decodes its own latents, as diffusers' refiner pipeline
        for i in range(len(latents)):  # one at a time: the decode is the memory peak, and each image is kept
            yield last_stage.decode(latents[i:i + 1])[0]

    @torch.no_grad()
    def latents(self, settings: Settings, refiner=None, progress=True, callback=None):
        """Every stage of a generation -> the final latents (B, 4, h, w), ready for the VAE.

        Text-to-image, img2img or inpainting (settings.init_image, .mask), then the refiner's stage (if
        `refiner`), then the hi-res fix's second pass (if settings.hires_scale)."""
        s = settings
        if isinstance(s.init_image, (str, Path, list)):  # paths (or a list of them) read as RGB images
            s = replace(s, init_image=[as_image(i) for i in s.init_image] if isinstance(s.init_image, list)
                        else as_image(s.init_image))
        if isinstance(s.mask, (str, Path)):
            s = replace(s, mask=as_image(s.mask))
        s = with_opened_images(s)  # the control, adapter and IP-Adapter images, each read once
        check(s, self.model.config, refiner.model.config if refiner is not None else None)
        s = with_output_size(s, self.model.config)
        if self.controlnets or self.adapters or self.ip_adapters or s.control_images or s.adapter_images or s.ip_images:
            parts = [*self.controlnets, *self.adapters, *(m for pair in self.ip_adapters for m in pair)]
            if any(next(m.parameters()).device.type != self.device.type for m in parts):  # (offload moves the UNet)
                raise ValueError("offload with ControlNets or adapters is not supported yet; drop --offload")
            check_control(s, len(self.controlnets), len(self.adapters), len(self.ip_adapters))
        # Image i draws everything from its own CPU generator seeded seed + i, so it does not depend on the
        # batch size (AUTOMATIC1111's convention; diffusers with a list of generators).
        generators = [torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)]
        if refiner is None:
            latents = self.stage(s, generators, progress, callback)
        else:  # diffusers' base + refiner: the same generators, continued, across both stages
            handover = self.stage(replace(s, denoising_end=s.refiner_start), generators, progress, callback)
            latents = refiner.stage(replace(s, init_image=handover, denoising_start=s.refiner_start),
                                    generators, progress, callback)
        if s.hires_scale:
            latents = self.hires_pass(s, latents, progress, callback)
        return latents

    @torch.no_grad()
    def stage(self, s: Settings, generators, progress=True, callback=None, first_pass_steps=None):
        """One sampler run on this model: text-to-image, img2img or inpainting, or one part of a two-stage
        run. -> latents (B, 4, h, w) in VP scale (x / sqrt(sigma^2 + 1) at the last level reached).
        first_pass_steps: in the hi-res pass, the first pass's steps (prompt editing counts from its start)."""
        name = canonical_sampler(s.sampler)
        lcm_width, w = self.model.config.unet.time_cond_proj_dim, None
        if lcm_width:  # an LCM-distilled UNet takes the guidance scale as an input: no CFG pass (as diffusers)
            w, s = guidance_embedding(s.cfg, lcm_width).to(self.device), replace(s, cfg=1.0)
        # --karras turns diffusers' Karras sigmas on; without it, a folder's scheduler config may still ask for them.
        schedule = make_schedule(name, schedule_steps(s), schedule=s.schedule, spacing=s.spacing,
                                 karras=True if s.karras else None, config=self.scheduler_config)
        start, end = window(s, schedule, self.scheduler_config)
        sigmas = schedule.sigmas[start:end + 1]  # (n + 1,) the levels this stage runs through
        calls_per_step = 2 if name in SECOND_ORDER else 1  # prompt editing counts denoiser calls, as A1111
        edits = edited_conditioning(self, s, s.steps * calls_per_step, first_pass_steps and first_pass_steps * calls_per_step)
        if self.ip_adapters:
            edits = with_image_tokens(edits, self.ip_adapters, s, self.device)
        B, channels = s.num_images, self.model.config.vae.z_channels
        f = self.model.config.vae.pixels_per_latent  # image pixels per latent pixel, along each side
        shape = (channels, s.height // f, s.width // f)

        control = Control(self.controlnets, self.adapters, self.model.config.unet, s, len(schedule.timesteps) - start,
                          end - start, B, [u[0] for _, _, u in edits if u is not None],
                          self.device, sum(a.config.tokens for a, _ in self.ip_adapters)) if self.controlnets or self.adapters \
            else None

        def net(x_in, t, context, y):
            x_in, extra = x_in.to(self.dtype), {} if w is None else {"timestep_cond": w.expand(len(x_in), -1)}
            return self.model.unet(x_in, t, context, y, **extra, **(control.unet_kwargs(x_in, t, context, y)
                                                                    if control else {}))
        after_step = None
        if s.init_image is None:  # text-to-image: noise at the first level (sigma space)
            noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
            x = noise.to(self.device) * schedule.init_noise_sigma
        elif s.mask is not None:
            x, net, after_step = inpainting(self, s, self.pixel_batch(s), generators, schedule, sigmas, net)
        else:  # img2img: an image's latents (or latents given), noised to the first level of the window
            if is_latents(s.init_image):
                latents = s.init_image.to(self.device, torch.float32).expand(B, *shape)
            else:
                latents = self.encode(self.pixel_batch(s), generators)
            if s.denoising_start is not None:  # a base's partly denoised latents, as diffusers: no noise added
                x = latents * (sigmas[0].to(self.device) ** 2 + 1) ** 0.5
            else:
                x = latents + noise_like(latents, generators) * sigmas[0].to(self.device)

        prediction = schedule.prediction_type
        convert = (lambda out, x_in, sigma: x0_from_output(out, x_in * (sigma**2 + 1) ** 0.5, sigma, prediction),
                   lambda x0, x_in, sigma: output_from_x0(x0, x_in * (sigma**2 + 1) ** 0.5, sigma, prediction))
        perturbed = pag_modules(self.model.unet, s.pag_layers) if s.pag_scale else ()
        momentum = {"beta": s.apg_momentum} if s.apg and s.apg_momentum else None  # APG's, across the stage's steps
        guided_nets = [guided(net, cond, uncond, s, self.cfg_mode == "split", perturbed, *convert, momentum=momentum)
                       for _, cond, uncond in edits]
        first_call = start * calls_per_step if s.denoising_start is not None else 0  # a refiner continues the count
        denoise = denoiser(at_call(guided_nets, [last for last, _, _ in edits], first_call), schedule)
        kwargs = {"after_step": after_step}
        if name in NOISY:  # fresh noise continues each image's generator
            kwargs["noise"] = generator_noise(x, generators)
        elif name in SDE:  # one Brownian motion per image, seeded with its seed, over this stage's levels
            kwargs["noise"] = brownian_noise(x, sigmas, [s.seed + i for i in range(B)])
        if name in WITH_ETA:
            kwargs |= {"eta": s.eta, "s_noise": s.s_noise}
        if schedule.sigmas_to is not None:
            kwargs["sigmas_to"] = schedule.sigmas_to[start:end]
        if name == "tcd":
            kwargs["sigmas_s"] = tcd_levels(schedule, 0.3 if s.gamma is None else s.gamma)[start:end]
        if name == "lcm" and s.schedule == "default":  # diffusers' LCMScheduler: the consistency boundary condition
            denoise = consistency_boundary(denoise, schedule.timestep)
        # The bar is cleared when done and also on an error or Ctrl-C, so the error line starts a line.
        with self.on_device("unet"), attached(self.model.unet, [a for a, _ in self.ip_adapters], s.ip_scales or
                                              [1.0] * len(self.ip_adapters)), \
                tqdm(total=end - start, disable=not progress, desc=name, leave=False) as bar:
            kwargs["callback"] = lambda info: (bar.update(1), control and control.after_step(info["i"]),
                                               callback and callback(info))
            x = SAMPLERS[name](denoise, x, sigmas, **kwargs)

        latents = x / (sigmas[-1].to(x.device) ** 2 + 1) ** 0.5  # VP scale; = x when the last sigma is 0
        if not latents.isfinite().all():
            raise NonFiniteError(f"the latents became NaN or inf after sampling: {self.likely_cause('unet')}")
        return latents

    def pixel_batch(self, s):
        """s.init_image (one image for all outputs, or a list of one per output) -> (1 or B, 3, H, W) on the device."""
        images = s.init_image if isinstance(s.init_image, list) else [s.init_image]
        return torch.cat([pixels(image, s.width, s.height) for image in images]).to(self.device)

    def hires_pass(self, s: Settings, latents, progress=True, callback=None):
        """AUTOMATIC1111's hi-res fix: upscale the first pass (its latents bilinearly, or its decoded images
        with Lanczos) to hires_scale x the size (rounded down to size_multiple), then run exactly
        hires_steps img2img steps there, with fresh generators from the same seeds, as A1111 draws fresh noise
        from the seeds for it (with Lanczos, each generator first draws the re-encoded image's posterior
        sample, as img2img here does)."""
        second = hires_second_pass(s, multiple=size_multiple(self.model.config))
        if s.hires_upscaler == "latent":
            init = upscale_latents(latents, second.width, second.height, self.model.config.vae.pixels_per_latent)
        else:
            images = [self.decode(latents[i:i + 1])[0] for i in range(len(latents))]
            init = upscale_images(images, second.width, second.height)
        second = replace(second, init_image=init)
        generators = [torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)]
        return self.stage(second, generators, progress, callback, first_pass_steps=s.steps)

    @torch.no_grad()
    def encode(self, pixel_batch, generators):
        """Pixels (1 or B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) (8: pixels_per_latent): one posterior
        sample per generator (one image serves them all), times the scaling factor (diffusers' retrieve_latents)."""
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        pixels = pixel_batch.to(self.device, dtype)
        with self.on_device("vae"):
            f = vae.config.pixels_per_latent
            mean, logvar = tiled(vae.encode, pixels, self.vae_tiling * f, 1 / f) if self.vae_tiling else vae.encode(pixels)
        mean, logvar = mean.expand(len(generators), -1, -1, -1), logvar.expand(len(generators), -1, -1, -1)
        latents = mean + torch.exp(0.5 * logvar) * noise_like(mean, generators)
        return latents.float() * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents):
        """Latents (B, 4, h, w) -> PIL images, pixels exactly as diffusers makes them."""
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype  # float32 for fp16 models (see __init__), else the model's
        z = latents.to(self.device, dtype) / vae.config.scaling_factor
        with self.on_device("vae"):
            images = (tiled(vae.decode, z, self.vae_tiling, vae.config.pixels_per_latent) if self.vae_tiling
                      else vae.decode(z)).float()
        if not images.isfinite().all():
            raise NonFiniteError(f"the VAE decoded NaN or inf pixels: {self.likely_cause('vae')}")
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) in [0, 1]
        return [Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]

    def likely_cause(self, stage):
        """The likeliest reason for a NaN at `stage` ("unet" or "vae"), as the end of an error sentence."""
        for name in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
            module = getattr(self.model, name)
            if module is not None and not all(p.isfinite().all() for p in module.parameters()):
                return (f"the model's {name} weights contain NaN or inf, so the file is damaged or was exported "
                        "from a diverged training run; use another checkpoint.")
        dtype = next(getattr(self.model, stage).parameters()).dtype
        if dtype == torch.float16:
            return "float16 overflowed in the " + stage + "; use --dtype bf16 or --dtype fp32."
        return "the weights are finite, so the settings drove it there; try a lower --cfg, or another sampler."


class NonFiniteError(ValueError):
    """A generation produced NaN or inf; the message names the likely cause. Nothing is written."""


