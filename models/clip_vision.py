"""The CLIP vision tower the IP-Adapters read images with (OpenCLIP ViT-H/14 or ViT-bigG/14), as plain PyTorch.

    image -> clip_pixels: shortest side to 224 (bicubic), centre crop 224 x 224, CLIP's mean and std
          -> 14 x 14 patches, a learned class token, positions (257 tokens) -> pre-LN -> `layers` CLIP layers
          -> hidden states (B, 257, width) of every layer; the class token after the last one, LayerNormed and
             projected: image_embeds (B, projection_dim)

An IP-Adapter takes image_embeds (the base adapters) or the penultimate layer's hidden states (the plus ones).
The layers are the text towers' CLIPLayer (models/text.py), not causal. Attribute paths equal the keys of
transformers' CLIPVisionModelWithProjection (h94/IP-Adapter's image_encoder/model.safetensors, ComfyUI's
clip_vision files), so its file loads with `load_state_dict(strict=True)`; a `position_ids` buffer is dropped.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from models.diffusers_layout import read_json, stored_shapes
from models.files import LoadError
from models.loading import resolve
from models.single_file import built, read_renamed
from models.text import CLIPLayer, embedding

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, which OpenCLIP kept
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Head counts shapes do not give, for the towers IP-Adapters use (a config.json, when present, says).
KNOWN_HEADS = {1280: 16, 1664: 16, 1024: 16, 768: 12}


@dataclass(frozen=True)
class VisionConfig:
    width: int
    layers: int
    heads: int
    mlp_dim: int
    projection_dim: int
    image_size: int = 224
    patch_size: int = 14
    act: str = "gelu"  # OpenCLIP's towers: exact GELU (transformers' default, quick_gelu, is OpenAI CLIP's)
    eps: float = 1e-5


VIT_H = VisionConfig(width=1280, layers=32, heads=16, mlp_dim=5120, projection_dim=1024)  # h94 models/image_encoder
VIT_BIGG = VisionConfig(width=1664, layers=48, heads=16, mlp_dim=8192, projection_dim=1280)  # sdxl_models/image_encoder


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, 256, width)
        cls = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 257, width)


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # sic: transformers' spelling
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPLayer(cfg, causal=False) for _ in range(cfg.layers))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, pixels):
        """pixels (B, 3, 224, 224) from clip_pixels -> (image_embeds (B, projection_dim), the penultimate
        layer's hidden states (B, 257, width): transformers' hidden_states[-2])."""
        v = self.vision_model
        x = v.pre_layrnorm(v.embeddings(pixels.to(self.visual_projection.weight.dtype)))
        for i, layer in enumerate(v.encoder.layers):
            if i == len(v.encoder.layers) - 1:
                penultimate = x
            x = layer(x)
        return self.visual_projection(v.post_layernorm(x[:, 0])), penultimate


def clip_pixels(image, size=224):
    """A PIL image -> (1, 3, size, size): CLIPImageProcessor's steps (RGB, shortest side to `size` with PIL's
    bicubic, centre crop, / 255, CLIP's mean and std)."""
    image = image.convert("RGB")
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)  # the short side exactly `size`
    image = image.resize(new, Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    array = (array - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def vision_config(shapes, folder_config, where):
    """VisionConfig from transformers' {name: shape} (and its config.json, for the head count)."""
    if "vision_model.embeddings.class_embedding" not in shapes or "visual_projection.weight" not in shapes:
        raise LoadError(f"{where} is not a CLIP vision encoder with a projection (transformers' "
                        "CLIPVisionModelWithProjection layout, e.g. h94/IP-Adapter's image_encoder/model.safetensors).")
    width = shapes["vision_model.embeddings.class_embedding"][0]
    heads = folder_config.get("num_attention_heads") or KNOWN_HEADS.get(width)
    if heads is None:
        raise LoadError(f"{where} is {width} wide, not a known CLIP vision tower, and has no config.json to give its "
                        "attention heads; give its folder with config.json.")
    patch = shapes["vision_model.embeddings.patch_embedding.weight"]
    layers = len({n.split(".")[3] for n in shapes if n.startswith("vision_model.encoder.layers.")})
    return VisionConfig(
        width=width, layers=layers, heads=heads, mlp_dim=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=shapes["visual_projection.weight"][0], patch_size=patch[-1],
        image_size=round((shapes["vision_model.embeddings.position_embedding.weight"][0] - 1) ** 0.5) * patch[-1],
        act=folder_config.get("hidden_act", "gelu"), eps=folder_config.get("layer_norm_eps", 1e-5),
    )


def load_image_encoder(source, dtype=None):
    """A CLIP vision encoder: transformers' model.safetensors, its folder (config.json beside it), or a repo id."""
    path = Path(resolve(source))
    stored, folder_config = stored_shapes(path)
    if path.is_dir():
        folder_config = folder_config.get("vision_config", folder_config)  # a CLIPModel's config nests it
    elif (path.parent / "config.json").exists():
        folder_config = read_json(path.parent / "config.json")
    shapes = {n: s for file_shapes in stored.values() for n, s in file_shapes.items() if not n.endswith("position_ids")}
    cfg = vision_config(shapes, folder_config, path)
    names = {file: {n: n for n in file_shapes if n in shapes} for file, file_shapes in stored.items()}
    return built(lambda: CLIPVisionEncoder(cfg), read_renamed(names, dtype), f"{path} (a CLIP vision encoder)")
