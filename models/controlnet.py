"""ControlNet (Zhang, Rao and Agrawala 2023) for SDXL: a trainable copy of the UNet's first half that reads a
control image (edges, depth, pose ...) and adds what it computes to the frozen UNet's skip connections.

    x ──► input_blocks.0 ──(+ hint)──► input_blocks.1 ... input_blocks.N ──► middle_block
               │                            │                  │                 │
          zero_convs.0                 zero_convs.1  ...  zero_convs.N   middle_block_out   1x1 convs, zero at init
               ▼                            ▼                  ▼                 ▼
        residual 0 ... residual N: added to the UNet's skips;  the last: added to its middle block's output

    hint = input_hint_block(control image (B, 3, H, W) in [0, 1]): eight 3x3 convs with SiLU, three of stride 2
    (H/8 x W/8, the latent size), channels 3 -> 16 -> 32 -> 96 -> 256 -> model_channels, the last conv zero at init.

The copy is models.unet.Encoder itself, so every name below is the official (cldm / sgm) one: a file in that
layout loads with a prefix strip ("control_model." or none), a diffusers file or folder through the same name
map as the UNet's (models/keys.py), plus the five renames of `control_names` (label_emb included: diffusers' own
single-file converter drops it for SDXL, ComfyUI maps it).
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.diffusers_layout import stored_shapes, unet_config_to_diffusers
from models.files import LoadError
from models.keys import encoder_name_from_diffusers, unet_name_to_diffusers
from models.layers import timestep_embedding
from models.loading import resolve
from models.single_file import built, encoder_shape, read_renamed
from models.text import ResidualAttentionBlock
from models.unet import Encoder, UNetConfig

PREFIX = "control_model."  # the original files' prefix (lllyasviel's cldm); many SDXL files have none


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig  # the copied encoder's: the UNet's it was trained beside (output fields unused)
    hint_channels: int = 3  # channels of the control image
    embedding_channels: tuple = (16, 32, 96, 256)  # the hint encoder's widths, 2x down between them
    global_pool: bool = False  # residuals averaged over space (shuffle ControlNets; diffusers' global_pool_conditions)
    control_types: int = 0  # ControlNet-Union's number of condition types (xinsir's: 6, ProMax: 8); 0: a plain one


# ControlNet-Union's condition types (xinsir's numbering, as ComfyUI and diffusers' control_mode take it).
CONTROL_TYPES = {"openpose": 0, "depth": 1, "hed": 2, "pidi": 2, "scribble": 2, "ted": 2, "canny": 3, "lineart": 3,
                 "anime_lineart": 3, "mlsd": 3, "normal": 4, "segment": 5, "tile": 6, "repaint": 7}


def hint_encoder(cfg: ControlNetConfig):
    """Control image (B, hint_channels, H, W) -> (B, model_channels, H / 2^k, W / 2^k), k = len(widths) - 1.
    Official indices: convs at the even ones, SiLU between; the last conv starts at zero."""
    c = cfg.embedding_channels
    layers = [nn.Conv2d(cfg.hint_channels, c[0], 3, padding=1), nn.SiLU()]
    for cin, cout in zip(c, c[1:]):
        layers += [nn.Conv2d(cin, cin, 3, padding=1), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero(nn.Conv2d(c[-1], cfg.unet.model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def zero(conv):
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNet(Encoder):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg.unet)
        self.controlnet_config = cfg
        self.input_hint_block = hint_encoder(cfg)
        self.zero_convs = nn.ModuleList(nn.Sequential(zero(nn.Conv2d(c, c, 1))) for c in self.skip_channels)
        middle = self.skip_channels[-1]
        self.middle_block_out = nn.Sequential(zero(nn.Conv2d(middle, middle, 1)))
        if cfg.control_types:
            self.add_union_layers(cfg)

    def add_union_layers(self, cfg):
        """ControlNet-Union (xinsir): which kind of condition the image is, as a learned token and as an embedding
        added to the timestep's (the sinusoids of its one-hot vector, diffusers' names)."""
        width, micro = cfg.unet.model_channels, cfg.unet.micro_cond_dim
        self.task_embedding = nn.Parameter(torch.randn(cfg.control_types, width).mul_(width**0.5))
        # One pre-LN block over the tokens, 8 heads, quick GELU (OpenCLIP's block and names: attn.in_proj_weight ...).
        block = SimpleNamespace(width=width, heads=8, mlp_dim=4 * width, act="quick_gelu", eps=1e-5)
        self.transformer_layes = nn.ModuleList([ResidualAttentionBlock(block, causal=False)])  # sic: xinsir's spelling
        self.spatial_ch_projs = nn.Linear(width, width)
        self.control_add_embedding = nn.Module()
        self.control_add_embedding.linear_1 = nn.Linear(micro * cfg.control_types, 4 * width)
        self.control_add_embedding.linear_2 = nn.Linear(4 * width, 4 * width)

    def forward(self, x, t, context, y, hint, scale=1.0, guess_mode=False, control_type=None):
        """-> the UNet's `control`: one residual per input block, then the middle block's, times `scale`.
        x, t, context, y as the UNet's (models/unet.py); hint (B, 3, H, W) the control image in [0, 1];
        control_type: a ControlNet-Union's kind of condition (an index of CONTROL_TYPES' numbering).

        guess_mode (ControlNet's "guess mode", diffusers' scaling of it): the residuals scaled from 0.1 at the
        first skip up to 1 at the middle block, log-spaced, so the control image steers the coarse levels most."""
        emb = self.embedding(t, y, x.dtype)
        union = self.controlnet_config.control_types
        if union:
            one_hot = F.one_hot(torch.full((len(x),), control_type, device=x.device), union).float()
            sinusoids = timestep_embedding(one_hot.flatten(), self.config.micro_cond_dim).reshape(len(x), -1)
            e = self.control_add_embedding
            emb = emb + e.linear_2(F.silu(e.linear_1(sinusoids.to(x.dtype))))
        h, residuals = x, []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self.run(block, h, emb, context)
            if i == 0:
                condition = self.input_hint_block(hint.to(x.dtype))
                h = h + (self.union_condition(condition, h, control_type) if union else condition)
            residuals.append(zero_conv(h))
        h = self.run(self.middle_block, h, emb, context)
        residuals.append(self.middle_block_out(h))
        global_pool = self.controlnet_config.global_pool
        if guess_mode and not global_pool:
            scales = torch.logspace(-1, 0, len(residuals), device=x.device) * scale  # float32, as diffusers
        else:
            scales = [scale] * len(residuals)
        residuals = [r * s for r, s in zip(residuals, scales)]
        return [r.mean(dim=(2, 3), keepdim=True) for r in residuals] if global_pool else residuals

    def union_condition(self, condition, h, control_type):
        """ControlNet-Union's hint: the condition's mean feature plus its type's token, and the latents' mean feature,
        through the block; the condition's token, projected, is added to the condition everywhere.
        As in xinsir's model (and diffusers'), the block's attention runs across the batch for each token, not across
        the tokens: nn.MultiheadAttention, not batch_first, given (B, tokens, C). Reproduced, so the residuals equal
        theirs; the CFG batch's rows repeat one latent and one condition, which makes that attention a no-op there."""
        tokens = torch.stack([condition.mean(dim=(2, 3)) + self.task_embedding[control_type], h.mean(dim=(2, 3))], dim=1)
        tokens = self.transformer_layes[0](tokens.transpose(0, 1)).transpose(0, 1)  # (B, 2, C), attention over B
        return condition + self.spatial_ch_projs(tokens[:, 0])[:, :, None, None]


def controlnet_from_unet(unet, hint_channels=3, embedding_channels=(16, 32, 96, 256)):
    """A new ControlNet for `unet` (models.unet.UNet): its encoder copied, the hint encoder freshly initialised,
    every zero conv at zero, so that at first it adds nothing (the start of ControlNet training)."""
    cfg = ControlNetConfig(replace(unet.config, time_cond_proj_dim=None), hint_channels, tuple(embedding_channels))
    weight = next(unet.parameters())
    controlnet = ControlNet(cfg).to(weight.device, weight.dtype)  # beside the UNet
    encoder = {n: t for n, t in unet.state_dict().items() if n.startswith(("time_embed.", "label_emb.", "input_blocks.",
                                                                          "middle_block."))}
    missing, unexpected = controlnet.load_state_dict(encoder, strict=False)
    assert not unexpected and all(n.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")) for n in missing)
    return controlnet


# ----------------------------------------------------------------------------- names


def control_names(cfg: ControlNetConfig):
    """{official name prefix: diffusers name prefix} of the parts the UNet does not have."""
    n = len(cfg.embedding_channels)
    names = {"input_hint_block.0.": "controlnet_cond_embedding.conv_in.",
             f"input_hint_block.{4 * n - 2}.": "controlnet_cond_embedding.conv_out.",
             "middle_block_out.0.": "controlnet_mid_block."}
    for k in range(2 * (n - 1)):
        names[f"input_hint_block.{2 + 2 * k}."] = f"controlnet_cond_embedding.blocks.{k}."
    return names


def name_to_diffusers(name, cfg: ControlNetConfig):
    if name.startswith("zero_convs."):  # zero_convs.N.0.weight -> controlnet_down_blocks.N.weight
        index, _, rest = name[len("zero_convs."):].split(".", 2)
        return f"controlnet_down_blocks.{index}.{rest}"
    for official, diffusers in control_names(cfg).items():
        if name.startswith(official):
            return diffusers + name[len(official):]
    return unet_name_to_diffusers(name, cfg.unet.num_res_blocks)


def name_from_diffusers(name, num_res_blocks, embedding_levels):
    """The inverse of name_to_diffusers for a file whose config is not known yet (names only); None if the name
    is no ControlNet's."""
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", name):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    names = control_names(ControlNetConfig(UNetConfig(), embedding_channels=(0,) * embedding_levels))
    for official, diffusers in names.items():
        if name.startswith(diffusers):
            return official + name[len(diffusers):]
    return encoder_name_from_diffusers(name, num_res_blocks)


def official_names(names):
    """{official name: stored name} of a ControlNet file's tensors: official (with or without "control_model.")
    or diffusers names; stored names that are neither map to themselves (and fail the shape check)."""
    if any(n.startswith("controlnet_cond_embedding.") for n in names):
        R = len({m[1] for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))})
        levels = len({m[1] for n in names if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", n))}) // 2 + 1
        return {name_from_diffusers(n, R, levels) or n: n for n in names}
    return {n.removeprefix(PREFIX): n for n in names}


def hint_shape(s):
    """(hint_channels, embedding_channels) from the official shapes of input_hint_block."""
    convs = sorted((int(n.split(".")[1]), shape) for n, shape in s.items()
                   if n.startswith("input_hint_block.") and n.endswith(".weight"))
    widths = [convs[0][1][0]] + [shape[0] for _, shape in convs[2:-1:2]]  # the stride-2 convs' outputs
    return convs[0][1][1], tuple(widths)


# ----------------------------------------------------------------------------- loading


def controlnet_config(shapes, unet: UNetConfig, where, folder_config=None):
    """The ControlNetConfig of a file's {official name: shape}, beside the UNet `unet` (whose head width,
    GroupNorm groups and micro-conditioning it shares), or LoadError saying why it cannot control that UNet."""
    if "input_hint_block.0.weight" not in shapes or "input_blocks.0.0.weight" not in shapes:
        raise LoadError(f"{where} is not a ControlNet (it has no input_hint_block and input blocks, e.g. "
                        f"{', '.join(list(shapes)[:3])}).")
    context = next((v[1] for n, v in shapes.items() if n.endswith("attn2.to_k.weight")), None)
    if "label_emb.0.0.weight" not in shapes:
        kind = "SD 1.5" if context == 768 else "SD 2.x" if context == 1024 else "a model without SDXL's vector condition"
        raise LoadError(f"{where} is a ControlNet for {kind}, not SDXL; use an SDXL ControlNet (e.g. "
                        "diffusers/controlnet-canny-sdxl-1.0 or xinsir/controlnet-union-sdxl-1.0).")
    fields = encoder_shape(shapes)
    if (fields["context_dim"], fields["adm_in_channels"]) != (unet.context_dim, unet.adm_in_channels):
        raise LoadError(f"{where} was trained beside a UNet with a {fields['context_dim']}-wide text context and "
                        f"{fields['adm_in_channels']}-wide vector condition; this model's are {unet.context_dim} and "
                        f"{unet.adm_in_channels}: use a ControlNet made for this model family.")
    hint_channels, widths = hint_shape(shapes)
    return ControlNetConfig(
        unet=replace(unet, **fields, out_channels=fields["in_channels"], transformer_depth_output=None,
                     time_cond_proj_dim=None),
        hint_channels=hint_channels, embedding_channels=widths,
        global_pool=bool((folder_config or {}).get("global_pool_conditions", False)),
        control_types=shapes["task_embedding"][0] if "task_embedding" in shapes else 0,
    )


def inspect_controlnet(source, unet: UNetConfig):
    """The header of a ControlNet (file, folder or repo id) for the UNet of config `unet`, no tensor read ->
    (path, ControlNetConfig, {file: {official name: stored name}}). LoadError for anything that is not one, or
    not one for this model."""
    path = Path(resolve(source))
    stored, folder_config = stored_shapes(path)
    names = {file: official_names(list(shapes)) for file, shapes in stored.items()}
    shapes = {official: stored[file][name] for file in stored for official, name in names[file].items()}
    if CONTROL_LORA in shapes:
        return path, control_lora_config(shapes, unet, path), names
    return path, controlnet_config(shapes, unet, path, folder_config), names


def load_controlnet(source, unet, dtype=None):
    """inspect_controlnet's ControlNet with its weights (cast to dtype), on the CPU. unet: the UNet it steers
    (models.unet.UNet), or its UNetConfig; a control-LoRA needs the UNet itself, whose weights it changes."""
    path, cfg, names = inspect_controlnet(source, unet if isinstance(unet, UNetConfig) else unet.config)
    tensors = read_renamed(names, dtype)
    if CONTROL_LORA in tensors:
        if isinstance(unet, UNetConfig):
            raise LoadError(f"{path} is a control-LoRA, which changes the base UNet's weights; load it with the model "
                            "(--controlnet, or Pipeline.load(controlnets=...)).")
        return merged_control_lora(unet, cfg, tensors, path).to(dtype or next(unet.parameters()).dtype).eval()
    return built(lambda: ControlNet(cfg), tensors, f"{path} (a ControlNet)")


# ----------------------------------------------------------------------------- control-LoRA

CONTROL_LORA = "lora_controlnet"  # the marker tensor of Stability's control-LoRA files


def control_lora_config(shapes, unet: UNetConfig, where):
    """A control-LoRA (stabilityai/control-lora) stores a ControlNet as its difference from the base UNet: rank-r
    factors `X.up` (out, r[, 1, 1]) and `X.down` (r, in[, kh, kw]) for the base's weights, whole tensors for the
    biases, norms and the ControlNet's own layers. Its architecture is the base UNet's encoder."""
    cfg = ControlNetConfig(replace(unet, time_cond_proj_dim=None), *hint_shape(shapes))
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in ControlNet(cfg).state_dict().items()}
    for name, shape in shapes.items():
        base, _, factor = name.rpartition(".")
        weight = expected.get(base + ".weight") if factor in ("up", "down") else expected.get(name)
        partner = {"up": ".down", "down": ".up"}.get(factor)
        if partner and base + partner not in shapes:
            weight = None  # half of a factor pair
        if name != CONTROL_LORA and (weight is None or (factor == "up" and shape[0] != weight[0]) or
                                     (factor == "down" and tuple(shape[1:]) != tuple(weight[1:])) or
                                     (factor not in ("up", "down") and tuple(shape) != weight)):
            raise LoadError(f"{where} is a control-LoRA for another UNet ({name} {list(shape)} does not fit this "
                            "model's); use the control-LoRA made for this model family (SDXL base).")
    return cfg


def merged_control_lora(unet, cfg, tensors, where):
    """The ControlNet a control-LoRA describes on `unet`: its encoder copied, W + up @ down for each factored
    weight (in float32), the whole tensors as they are."""
    model = controlnet_from_unet(unet, cfg.hint_channels, cfg.embedding_channels).float()
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            base, _, factor = name.rpartition(".")
            if factor == "up":
                w = weights[base + ".weight"]
                w += (t.float().flatten(1) @ tensors[base + ".down"].float().flatten(1)).reshape(w.shape)
            elif factor != "down" and name != CONTROL_LORA:
                weights[name].copy_(t.float())
    return model


def controlnet_to_diffusers(model: ControlNet):
    """{diffusers name: tensor} and config.json of a ControlNet: what diffusers' ControlNetModel.from_pretrained,
    ComfyUI and AUTOMATIC1111 load."""
    cfg = model.controlnet_config
    config = {k: v for k, v in unet_config_to_diffusers(cfg.unet).items()
              if k not in ("out_channels", "up_block_types", "reverse_transformer_layers_per_block", "sample_size")}
    config |= {"_class_name": "ControlNetModel", "conditioning_channels": cfg.hint_channels,
               "conditioning_embedding_out_channels": list(cfg.embedding_channels),
               "global_pool_conditions": cfg.global_pool, "controlnet_conditioning_channel_order": "rgb"}
    return {name_to_diffusers(n, cfg): t for n, t in model.state_dict().items()}, config
