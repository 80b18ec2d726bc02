"""IP-Adapter (Ye et al. 2023) for SDXL: an image as a prompt. A CLIP vision encoder reads the image
(models/clip_vision.py), a small projection turns what it reads into a few tokens as wide as the text context,
and every cross-attention of the UNet attends to those tokens with keys and values of its own:

    base  (ip-adapter_sdxl, _vit-h):  image_embeds (B, E)          -> Linear, LayerNorm -> 4 tokens (B, 4, 2048)
    plus  (ip-adapter-plus*_vit-h):   penultimate states (B, 257, W) -> Resampler: 16 learned queries attend to the
                                      image features over 4 layers -> 16 tokens (B, 16, 2048)

    attn2(x, text) = to_out( attention(q, to_k(text), to_v(text)) + scale * attention(q, to_k_ip(img), to_v_ip(img)) )

The tokens ride at the end of the context tensor (the original implementation's way), so the negative prompt's
context carries the unconditional image's tokens and CFG needs nothing else; each attn2 reads them off the end
(models.unet.CrossAttention.image_prompts). Names are the files': image_proj.* and ip_adapter.{N}.to_k_ip, N = 1,
3, 5, ... numbering the cross-attentions in diffusers' order (input blocks, output blocks, then the middle block).
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from models.clip_vision import load_image_encoder, vision_config
from models.diffusers_layout import stored_shapes
from models.files import LoadError
from models.layers import attention
from models.loading import resolve
from models.single_file import built, read_renamed


@dataclass(frozen=True)
class IPAdapterConfig:
    plus: bool  # a Resampler over the penultimate hidden states (else a projection of image_embeds)
    image_dim: int  # what it reads: the encoder's projection_dim (base) or its width (plus)
    tokens: int  # image tokens it adds: 4 (base) or 16 (plus)
    context_dim: int = 2048  # the UNet's cross-attention width
    widths: tuple = ()  # each cross-attention's width, in file order
    resampler_dim: int = 1280
    resampler_depth: int = 4
    resampler_heads: int = 20


class ImageProjection(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.image_dim, cfg.tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, image_embeds):  # (B, E) -> (B, tokens, context_dim)
        return self.norm(self.proj(image_embeds).unflatten(-1, (self.tokens, -1)))


class PerceiverAttention(nn.Module):
    """The latents attend to the image features and to themselves (keys and values over both)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.resampler_dim
        self.latents = nn.Parameter(torch.randn(1, cfg.tokens, d).mul_(d**-0.5))
        self.proj_in = nn.Linear(cfg.image_dim, d)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(d, cfg.resampler_heads),
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False)),
        ]) for _ in range(cfg.resampler_depth))
        self.proj_out = nn.Linear(d, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)

    def forward(self, features):  # (B, 257, W) -> (B, tokens, context_dim)
        x, latents = self.proj_in(features), self.latents.expand(len(features), -1, -1)
        for attend, feed_forward in self.layers:
            latents = attend(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImagePromptAttention(nn.Module):
    """One cross-attention's keys and values for the image tokens."""

    def __init__(self, context_dim, width):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)
        self.attend = attention  # swappable, as every attention's (models.layers.attention)


class IPAdapter(nn.Module):
    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.config = cfg
        self.image_proj = Resampler(cfg) if cfg.plus else ImageProjection(cfg)
        self.ip_adapter = nn.ModuleDict({str(2 * k + 1): ImagePromptAttention(cfg.context_dim, width)
                                         for k, width in enumerate(cfg.widths)})

    def tokens(self, encoder, pixels):
        """pixels (1, 3, 224, 224) from models.clip_vision.clip_pixels -> (its tokens, the unconditional tokens),
        each (1, tokens, context_dim): diffusers' negative is the projection of zero image_embeds (base) or of
        the features of an all-zero pixel tensor (plus)."""
        image_embeds, features = encoder(torch.cat([pixels, torch.zeros_like(pixels)]))
        if self.config.plus:
            return self.image_proj(features.to(self.dtype)).chunk(2)
        embeds = image_embeds[:1].to(self.dtype)
        return self.image_proj(embeds), self.image_proj(torch.zeros_like(embeds))

    @property
    def dtype(self):
        return next(self.parameters()).dtype


def cross_attentions(unet):
    """The UNet's cross-attentions (attn2) in diffusers' order: input blocks, output blocks, the middle block."""
    names = sorted((n for n, _ in unet.named_modules() if n.endswith(".attn2")),
                   key=lambda n: (("input_blocks", "output_blocks", "middle_block").index(n.split(".")[0]),
                                  [int(p) for p in re.findall(r"\.(\d+)", n)]))
    return [unet.get_submodule(n) for n in names]


@contextmanager
def attached(unet, adapters, scales):
    """For the block, each cross-attention of `unet` also attends to the image tokens of `adapters` (in order, at
    the end of the context, as image_prompts reads them), weighted by `scales`."""
    modules = cross_attentions(unet)
    try:
        for adapter, scale in zip(adapters, scales):
            for k, module in enumerate(modules):
                module.image_prompts.append((adapter.ip_adapter[str(2 * k + 1)], scale, adapter.config.tokens))
        yield
    finally:
        for module in modules:
            module.image_prompts.clear()


# ----------------------------------------------------------------------------- loading


def ip_adapter_config(shapes, where):
    """IPAdapterConfig from the file's {name: shape}, or LoadError for what is not an SDXL IP-Adapter."""
    widths = [shapes[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] for k in range(len(shapes))
              if f"ip_adapter.{2 * k + 1}.to_k_ip.weight" in shapes]
    if not widths or not any(n.startswith("image_proj.") for n in shapes):
        raise LoadError(f"{where} is not an IP-Adapter (no image_proj.* and ip_adapter.N.to_k_ip tensors).")
    context_dim = widths[0][1]
    if context_dim in (768, 1024):
        raise LoadError(f"{where} is an IP-Adapter for SD {'1.x' if context_dim == 768 else '2.x'} (its image tokens "
                        f"are {context_dim} wide, SDXL's 2048); use an SDXL one (h94/IP-Adapter/sdxl_models/...).")
    if "image_proj.latents" in shapes:
        tokens, dim = shapes["image_proj.latents"][1:]
        return IPAdapterConfig(plus=True, image_dim=shapes["image_proj.proj_in.weight"][1], tokens=tokens,
                               context_dim=context_dim, widths=tuple(w[0] for w in widths), resampler_dim=dim,
                               resampler_depth=len({n.split(".")[2] for n in shapes if n.startswith("image_proj.layers.")}),
                               resampler_heads=shapes["image_proj.layers.0.0.to_q.weight"][0] // 64)
    if "image_proj.proj.weight" not in shapes:
        raise LoadError(f"{where} is an IP-Adapter kind plainxl does not load yet (FaceID or full-face: it has "
                        f"{', '.join(n for n in list(shapes)[:3])}); use a base or plus SDXL IP-Adapter.")
    projection = shapes["image_proj.proj.weight"]
    return IPAdapterConfig(plus=False, image_dim=projection[1], tokens=projection[0] // context_dim,
                           context_dim=context_dim, widths=tuple(w[0] for w in widths))


def inspect_ip_adapter(source, unet):
    """The header of an IP-Adapter file (or repo path) for `unet` (models.unet.UNet, built or on the meta device)
    -> (path, IPAdapterConfig). LoadError if it is none, or its cross-attentions are not this UNet's."""
    path = Path(resolve(source))
    if path.is_dir():
        raise LoadError(f"{path} is a folder; pass the IP-Adapter's .safetensors file (e.g. ip-adapter_sdxl.safetensors).")
    stored, _ = stored_shapes(path)
    cfg = ip_adapter_config(stored[path], path)
    wanted = tuple(m.to_k.weight.shape[0] for m in cross_attentions(unet))
    if cfg.widths != wanted or unet.config.context_dim != cfg.context_dim:
        raise LoadError(f"{path} has {len(cfg.widths)} cross-attentions' image keys; this model's UNet has "
                        f"{len(wanted)} of other widths: use an IP-Adapter made for this model family.")
    return path, cfg


def image_encoder_for(source, cfg: IPAdapterConfig, given=None):
    """The CLIP vision encoder an IP-Adapter reads with -> its local path (file or folder): `given`, else where
    h94/IP-Adapter keeps it beside the adapter file (sdxl_models/image_encoder for ViT-bigG, models/image_encoder
    for ViT-H), locally or on the hub. LoadError naming the encoder when none is found or it does not fit."""
    vit_h = cfg.plus or cfg.image_dim == 1024  # the plus adapters read ViT-H's 1280-wide states; base: its 1024
    kind = "ViT-H/14 (h94/IP-Adapter/models/image_encoder)" if vit_h else "ViT-bigG/14 (h94/IP-Adapter/sdxl_models/image_encoder)"
    path = Path(resolve(source))
    candidates = [given] if given is not None else [
        path.parent / "image_encoder", path.parent.parent / "models" / "image_encoder"][::-1 if vit_h else 1]
    if given is None and re.fullmatch(r"[\w.-]+/[\w.-]+/.+\.safetensors", str(source)) and not Path(source).exists():
        repo, folder = "/".join(str(source).split("/")[:2]), "/".join(str(source).split("/")[2:-1])
        candidates.append(f"{repo}/{'models' if vit_h else folder or 'sdxl_models'}/image_encoder/model.safetensors")
    for candidate in candidates:
        if given is None and isinstance(candidate, Path) and not candidate.exists():
            continue
        encoder = Path(resolve(candidate))
        stored, folder_config = stored_shapes(encoder)
        shapes = {n: v for file_shapes in stored.values() for n, v in file_shapes.items()}
        vision = vision_config(shapes, folder_config, encoder)
        if (vision.width if cfg.plus else vision.projection_dim) != cfg.image_dim:
            if given is not None:
                raise LoadError(f"the image encoder {encoder} gives {vision.width if cfg.plus else vision.projection_dim}"
                                f"-wide features; {path} reads {cfg.image_dim}: it needs {kind}.")
            continue
        return encoder
    raise LoadError(f"{path} needs its CLIP vision encoder, {kind}, which is not beside it; give it with --ip-encoder "
                    "(the image_encoder folder or its model.safetensors).")


def load_ip_adapter(source, unet, dtype=None):
    """inspect_ip_adapter's IP-Adapter with its weights (cast to dtype), on the CPU."""
    path, cfg = inspect_ip_adapter(source, unet)
    names = {path: {n: n for n in stored_shapes(path)[0][path]}}
    return built(lambda: IPAdapter(cfg), read_renamed(names, dtype), f"{path} (an IP-Adapter)")


def load_image_prompt(source, unet, dtype=None):
    """An IP-Adapter file (or (file, image encoder) pair; encoder None: image_encoder_for's) -> (IPAdapter, its
    models.clip_vision.CLIPVisionEncoder), both on the CPU."""
    adapter_source, encoder_source = source if isinstance(source, (tuple, list)) else (source, None)
    adapter = load_ip_adapter(adapter_source, unet, dtype)
    return adapter, load_image_encoder(image_encoder_for(adapter_source, adapter.config, encoder_source), dtype)
