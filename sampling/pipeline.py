"""Text-to-image with SDXL: prompts -> conditioning -> guided denoiser -> sampler -> VAE -> pixels.

Reproduces diffusers' StableDiffusionXLPipeline image for image on the same weights and seeds
(tests/test_pipeline_parity.py), and reads top to bottom in `Pipeline.__call__`.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from models.conditioning import size_numbers, vector_condition
from models.loading import load, read_folder_config, resolve
from models.sdxl import scheduler_config as models_scheduler_config
from models.tokenizer import load_tokenizers
from sampling.prompts import encode_prompts, num_chunks
from sampling.samplers import SAMPLERS
from sampling.schedule import make_schedule


@dataclass
class Settings:
    """What a generation depends on (besides the model); written into each PNG by sampling.generate."""

    prompt: str
    negative_prompt: str | None = None  # None: zero negative conditioning; "": the empty prompt, encoded
    width: int | None = None  # None: the size the model was trained at (1024 for SDXL, 64 for plainxl-tiny)
    height: int | None = None
    steps: int = 28
    cfg: float = 5.0
    sampler: str = "euler_a"
    karras: bool = False
    guidance_rescale: float = 0.0
    seed: int = 0
    num_images: int = 1
    original_size: tuple | None = None  # (height, width); None: the output size
    crop_top_left: tuple = (0, 0)
    target_size: tuple | None = None  # (height, width); None: the output size
    truncate_prompt: bool = False
    aesthetic_score: float = 6.0  # refiner only, as diffusers' defaults
    negative_aesthetic_score: float = 2.5


def with_native_size(s: Settings, unet_config):
    """s with a width and height left at None set to the model's native size (UNet sample_size x 8)."""
    side = unet_config.sample_size * 8
    return replace(s, width=s.width or side, height=s.height or side)


def guided(net, cond, uncond, scale, rescale=0.0):
    """Classifier-free guidance (Ho & Salimans 2022) around net(x, t, context, y) -> model output.

    cond/uncond are (context, y) pairs. A scale <= 1 runs the conditional pass only (as diffusers).
    `rescale` is Lin et al. 2023's guidance rescale: match the per-sample std of the conditional output.
    """
    if scale <= 1:
        return lambda x, t: net(x, t, *cond)

    context = torch.cat([uncond[0], cond[0]])  # CFG batch order [uncond, cond], as diffusers
    y = torch.cat([uncond[1], cond[1]])

    def guided_net(x, t):
        out_uncond, out_cond = net(torch.cat([x, x]), torch.cat([t, t]), context, y).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            dims = list(range(1, out.ndim))
            rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = rescale * rescaled + (1 - rescale) * out
        return out

    return guided_net


def denoiser(net, schedule):
    """net(x_in, t) -> eps or v, as a denoiser(x, sigma) -> x0 in sigma space (x = x0 + sigma * eps).

    The UNet sees x / sqrt(sigma^2 + 1) (unit variance) and the timestep the schedule pairs with sigma.
    """

    def x0(x, sigma):
        # sigma is a float32 scalar tensor from schedule.sigmas: float32 arithmetic, as diffusers does it.
        t = torch.full((x.shape[0],), float(schedule.timestep(sigma)), device=x.device)
        sigma = sigma.to(x.device)
        out = net(x / (sigma**2 + 1) ** 0.5, t).float()
        if schedule.prediction_type == "epsilon":
            return x - sigma * out
        if schedule.prediction_type == "v_prediction":  # v = alpha * eps - s * x0 in VP space
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        raise ValueError(f"prediction_type {schedule.prediction_type!r} is not supported; "
                         "use 'epsilon' or 'v_prediction'.")

    return x0


class Pipeline:
    def __init__(self, model, scheduler_config=None):
        self.model = model.eval()
        if next(model.vae.parameters()).dtype == torch.float16:
            # The SDXL VAE overflows in fp16 (NaN -> black images): keep it in float32, once (+167 MB).
            model.vae.float()
        self.tokenizers = load_tokenizers()
        # A folder's own scheduler config if it has one, else the one the model was trained with (v-pred aware).
        self.scheduler_config = scheduler_config or models_scheduler_config(model.config)

    @classmethod
    def load(cls, source, dtype="fp32", device="cpu", vae=None):
        """A single file, a diffusers folder (its scheduler config is used) or a Hugging Face repo id;
        `vae` optionally replaces the model's VAE (a VAE file or diffusers vae/ folder)."""
        path = resolve(source)
        scheduler_config = read_folder_config(path)[1] if path.is_dir() else None
        return cls(load(path, dtype=dtype, device=device, vae=vae), scheduler_config)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.unet.parameters()).dtype

    def with_size(self, s: Settings):
        return with_native_size(s, self.model.config.unet)

    def conditioning(self, s: Settings):
        """(cond, uncond) as (context, y) pairs, batch num_images; uncond is None without guidance."""
        B, refiner = s.num_images, self.model.text_encoder_1 is None
        chunks = max(num_chunks(self.tokenizers, p, s.truncate_prompt) for p in [s.prompt, s.negative_prompt or ""])
        # One prompt for the whole batch: encode it once, repeat it B times.
        context, pooled = encode_prompts(self.model, self.tokenizers, [s.prompt], s.truncate_prompt, chunks)
        context, pooled = context.repeat(B, 1, 1), pooled.repeat(B, 1)
        size = (s.height, s.width)
        numbers = size_numbers(s.original_size or size, s.crop_top_left, s.target_size or size,
                               s.aesthetic_score if refiner else None)
        dim = self.model.config.unet.micro_cond_dim
        cond = (context, vector_condition(pooled, numbers, dim))
        if s.cfg <= 1:
            return cond, None
        if s.negative_prompt is None and not refiner:
            # SDXL's force_zeros_for_empty_prompt: no negative prompt means zero conditioning,
            # not the encoding of "" (AUTOMATIC1111 and ComfyUI encode "" instead).
            neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        else:
            neg_context, neg_pooled = encode_prompts(
                self.model, self.tokenizers, [s.negative_prompt or ""], s.truncate_prompt, chunks)
            neg_context, neg_pooled = neg_context.repeat(B, 1, 1), neg_pooled.repeat(B, 1)
        neg_numbers = size_numbers(s.original_size or size, s.crop_top_left, s.target_size or size,
                                   s.negative_aesthetic_score if refiner else None)
        return cond, (neg_context, vector_condition(neg_pooled, neg_numbers, dim))

    def __call__(self, settings: Settings, progress=True, callback=None):
        """Generate settings.num_images images -> list of PIL images (image i uses seed + i).

        callback, if given, receives the sampler's dict after every step (i, x, sigma, denoised)."""
        return list(self.images(settings, progress, callback))

    @torch.no_grad()
    def images(self, settings: Settings, progress=True, callback=None):
        """As __call__, but yields each image as soon as it is decoded (a caller can save it at once).

        Raises NonFiniteError, naming the likely cause, before any image with a NaN or inf is made."""
        s = self.with_size(settings)
        # --karras turns Karras sigmas on; without it, a folder's scheduler config may still ask for them.
        schedule = make_schedule(s.sampler, s.steps, karras=True if s.karras else None, config=self.scheduler_config)
        cond, uncond = self.conditioning(s)

        # Initial noise: image i draws float32 N(0, 1) from its own CPU generator seeded seed + i,
        # so it does not depend on the batch size (AUTOMATIC1111's convention; diffusers with a list).
        generators = [torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)]
        shape = (self.model.config.unet.in_channels, s.height // 8, s.width // 8)
        noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
        x = noise.to(self.device) * schedule.init_noise_sigma  # sigma space, float32

        net = lambda x_in, t, context, y: self.model.unet(x_in.to(self.dtype), t, context, y)
        guided_net = guided(net, cond, uncond, s.cfg, s.guidance_rescale)
        x0 = denoiser(guided_net, schedule)
        sampler = SAMPLERS[s.sampler]
        kwargs = {}
        if s.sampler in ("euler_a", "ddpm"):
            kwargs["generator"] = generators  # the ancestral noise continues each image's generator
        if schedule.sigmas_to is not None:
            kwargs["sigmas_to"] = schedule.sigmas_to
        # The bar is cleared when done and also on an error or Ctrl-C, so the error line starts a line.
        with tqdm(total=s.steps, disable=not progress, desc=s.sampler, leave=False) as bar:
            kwargs["callback"] = lambda info: (bar.update(1), callback and callback(info))
            x = sampler(x0, x, schedule.sigmas, **kwargs)

        latents = x / (schedule.sigmas[-1].to(x.device) ** 2 + 1) ** 0.5  # VP scale; = x when the last sigma is 0
        if not latents.isfinite().all():
            raise NonFiniteError(f"the latents became NaN or inf after sampling: {self.likely_cause('unet')}")
        for i in range(len(latents)):  # one at a time: the decode is the memory peak, and each image is kept
            yield self.decode(latents[i:i + 1])[0]

    def decode(self, latents):
        """Latents (B, 4, h, w) -> PIL images, pixels exactly as diffusers makes them."""
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype  # float32 for fp16 models (see __init__), else the model's
        images = vae.decode(latents.to(dtype) / vae.config.scaling_factor).float()
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


def memory_estimate(config, settings, parameters, dtype_bytes):
    """Bytes a generation needs, roughly: the weights, the UNet's activations for the CFG batch (its skip
    connections and working set, about 12 model-width feature maps at latent resolution per sample), and
    one image's float32 VAE decode (about 3 full-resolution maps as wide as the decoder's second level:
    the upsampled input, the ResBlock's output and a norm). Attention is taken as memory-efficient (linear
    in tokens), as SDPA's kernels are. SDXL in fp16 at 1024²: 9.7 GiB (published peak: 10.5 GiB)."""
    latent = (settings.height // 8) * (settings.width // 8)
    batch = settings.num_images * (2 if settings.cfg > 1 else 1)
    unet = batch * latent * config.unet.model_channels * 12 * dtype_bytes
    top = config.vae.ch * max(config.vae.ch_mult[:2])  # the decoder's two full- and half-resolution levels
    vae = settings.height * settings.width * top * 3 * 4
    return parameters * dtype_bytes + unet + vae
