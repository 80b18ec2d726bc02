"""The whole SDXL model: UNet, VAE and text encoders under the names the trainer's patterns use
(`unet.*`, `vae.*`, `text_encoder_1.*`, `text_encoder_2.*`), the official file's prefixes, and the
noise schedule the model was trained with (the official scheduler config, v-prediction variants)."""

from dataclasses import dataclass

import torch.nn as nn

from models import text, unet, vae
from models.conditioning import encode_text

# The official SDXL scheduler config (spec 5.1): `scheduler/scheduler_config.json` of the base model.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "steps_offset": 1, "interpolation_type": "linear", "use_karras_sigmas": False, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0, "trained_betas": None,
}
# Marker tensors (empty) in a single file, as NoobAI-XL's v-pred releases carry them and ComfyUI and
# AUTOMATIC1111 detect them: the UNet predicts v; the betas were rescaled to zero terminal SNR.
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"


@dataclass(frozen=True)
class SDXLConfig:
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    text_encoder_1: text.TextEncoderConfig | None  # CLIP-L; None for the refiner
    text_encoder_2: text.TextEncoderConfig  # OpenCLIP bigG
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" (SDXL) or "v_prediction"
    zero_terminal_snr: bool = False  # betas rescaled so the last timestep is pure noise (Lin et al. 2024)

    def __post_init__(self):
        # The UNet's input widths are set by the text encoders; a preset that disagrees is a bug.
        widths = [te.width for te in (self.text_encoder_1, self.text_encoder_2) if te is not None]
        if self.unet.context_dim != sum(widths):
            raise ValueError(f"UNet context_dim {self.unet.context_dim} != text encoder widths {widths}")
        pooled, m = self.text_encoder_2.projection_dim, self.unet.micro_cond_dim
        if self.unet.adm_in_channels not in (pooled + 6 * m, pooled + 5 * m):
            raise ValueError(f"UNet adm_in_channels {self.unet.adm_in_channels} != pooled {pooled} + 6 size embeddings "
                             f"(a base's) or 5 with an aesthetic score (a refiner's), each {m} wide")

        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not 'epsilon' or 'v_prediction'")

    @property
    def takes_aesthetic_score(self):
        """Whether the UNet's vector condition holds 5 numbers ending in an aesthetic score (the refiner's: orig h, w,
        crop top, left, score) instead of 6 (a base's: ..., target h, w); diffusers' requires_aesthetics_score."""
        return self.unet.adm_in_channels == self.text_encoder_2.projection_dim + 5 * self.unet.micro_cond_dim


BASE = SDXLConfig(unet.SDXL_BASE, vae.SDXL_VAE, text.CLIP_L, text.OPENCLIP_BIGG)
REFINER = SDXLConfig(unet.SDXL_REFINER, vae.SDXL_VAE, None, text.OPENCLIP_BIGG)
TINY = SDXLConfig(unet.TINY, vae.TINY_VAE, text.TINY_CLIP_L, text.TINY_OPENCLIP_BIGG)
TINY_REFINER = SDXLConfig(unet.TINY_REFINER, vae.TINY_VAE, None, text.TINY_OPENCLIP_BIGG)


def scheduler_config(cfg):
    """The diffusers scheduler config the model samples with: SDXL's, with v-prediction and zero terminal
    SNR where the model has them (trailing spacing then, so the first step starts from pure noise, as
    Lin et al. 2024 and diffusers' rescale_betas_zero_snr docs prescribe)."""
    config = {**SDXL_SCHEDULER_CONFIG, "prediction_type": cfg.prediction_type}
    if cfg.zero_terminal_snr:
        config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return config


def single_file_prefixes(cfg):
    """Component -> key prefix in the official single file. The refiner's only text encoder is embedders.0."""
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
    if cfg.text_encoder_1 is None:
        prefixes["text_encoder_2"] = "conditioner.embedders.0.model."
    else:
        prefixes["text_encoder_1"] = "conditioner.embedders.0.transformer."
        prefixes["text_encoder_2"] = "conditioner.embedders.1.model."
    return prefixes


class SDXL(nn.Module):
    def __init__(self, cfg: SDXLConfig):
        super().__init__()
        self.config = cfg
        self.unet = unet.UNet(cfg.unet)
        self.vae = vae.AutoencoderKL(cfg.vae)
        self.text_encoder_1 = text.CLIPTextEncoder(cfg.text_encoder_1) if cfg.text_encoder_1 else None
        self.text_encoder_2 = text.OpenCLIPTextEncoder(cfg.text_encoder_2)
        # Tensors of the file it was loaded from that no module holds (marker keys, CLIP's position_ids
        # and logit_scale): kept so that an export loses nothing it did not change. Not parameters.
        self.extra_tensors = {}

    def encode_text(self, tokens_1, tokens_2, clip_skip=0):
        """Token ids (B, 77) of each tokenizer -> context (B, 77, context_dim), pooled (B, P)."""
        return encode_text(self.text_encoder_1, self.text_encoder_2, tokens_1, tokens_2, clip_skip)
