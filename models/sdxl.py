"""The whole SDXL model: UNet, VAE and text encoders under the names the trainer's patterns use
(`unet.*`, `vae.*`, `text_encoder_1.*`, `text_encoder_2.*`), plus the official file's prefixes."""

from dataclasses import dataclass

import torch.nn as nn

from models import text, unet, vae
from models.conditioning import encode_text


@dataclass(frozen=True)
class SDXLConfig:
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    text_encoder_1: text.TextEncoderConfig | None  # CLIP-L; None for the refiner
    text_encoder_2: text.TextEncoderConfig  # OpenCLIP bigG

    def __post_init__(self):
        # The UNet's input widths are set by the text encoders; a preset that disagrees is a bug.
        widths = [te.width for te in (self.text_encoder_1, self.text_encoder_2) if te is not None]
        if self.unet.context_dim != sum(widths):
            raise ValueError(f"UNet context_dim {self.unet.context_dim} != text encoder widths {widths}")
        vector = self.text_encoder_2.projection_dim + self.num_size_numbers * self.unet.micro_cond_dim
        if self.unet.adm_in_channels != vector:
            raise ValueError(f"UNet adm_in_channels {self.unet.adm_in_channels} != pooled + size embeddings {vector}")

    @property
    def num_size_numbers(self):
        """6 for base models (orig h, w, crop top, left, target h, w); 5 for the refiner (aesthetic score)."""
        return 6 if self.text_encoder_1 is not None else 5


BASE = SDXLConfig(unet.SDXL_BASE, vae.SDXL_VAE, text.CLIP_L, text.OPENCLIP_BIGG)
REFINER = SDXLConfig(unet.SDXL_REFINER, vae.SDXL_VAE, None, text.OPENCLIP_BIGG)
TINY = SDXLConfig(unet.TINY, vae.TINY_VAE, text.TINY_CLIP_L, text.TINY_OPENCLIP_BIGG)


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

    def encode_text(self, tokens_1, tokens_2):
        """Token ids (B, 77) of each tokenizer -> context (B, 77, context_dim), pooled (B, P)."""
        return encode_text(self.text_encoder_1, self.text_encoder_2, tokens_1, tokens_2)
