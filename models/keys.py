"""The official (sgm / "ldm") <-> diffusers tensor-name maps: pure functions over names and tensors.

Our modules use the official names, so the official file loads with a prefix strip. A diffusers folder
stores the same tensors under other names; each component below has one function mapping an official
name to its diffusers name, and conversion in the other direction inverts that map over the names our
module has. Only three tensors change shape on the way: the VAE's attention weights (1x1 conv <->
linear), OpenCLIP's fused q/k/v projection (one tensor <-> three), and OpenCLIP's text_projection
(used as x @ P, a Linear weight is P transposed).
"""

import re

import torch

# ----------------------------------------------------------------------------- UNet

_RESBLOCK_TO_DIFFUSERS = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_FIXED_TO_DIFFUSERS = {
    "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
    "time_cond_proj.": "time_embedding.cond_proj.",
    "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
    "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
    "middle_block.2.": "mid_block.resnets.1.",
}


def unet_name_to_diffusers(name, num_res_blocks):
    """output_blocks.5.2.conv.weight -> up_blocks.1.upsamplers.0.conv.weight, and so on (spec section 6)."""
    per_level = num_res_blocks + 1  # blocks per level: R ResBlocks plus a Downsample (in) / R + 1 (out)
    for old, new in _RESBLOCK_TO_DIFFUSERS.items():
        name = name.replace(f".{old}.", f".{new}.")
    for old, new in _FIXED_TO_DIFFUSERS.items():
        if name.startswith(old):
            return new + name[len(old):]
    if m := re.match(r"input_blocks\.(\d+)\.0\.op\.(.*)", name):
        return f"down_blocks.{(int(m[1]) - 1) // per_level}.downsamplers.0.conv.{m[2]}"
    if m := re.match(r"input_blocks\.(\d+)\.(0|1)\.(.*)", name):
        level, j = divmod(int(m[1]) - 1, per_level)
        return f"down_blocks.{level}.{'resnets' if m[2] == '0' else 'attentions'}.{j}.{m[3]}"
    if m := re.match(r"output_blocks\.(\d+)\.\d\.conv\.(weight|bias)$", name):  # the Upsample
        return f"up_blocks.{int(m[1]) // per_level}.upsamplers.0.conv.{m[2]}"
    if m := re.match(r"output_blocks\.(\d+)\.(0|1)\.(.*)", name):
        level, j = divmod(int(m[1]), per_level)
        return f"up_blocks.{level}.{'resnets' if m[2] == '0' else 'attentions'}.{j}.{m[3]}"
    raise ValueError(f"not a UNet tensor name: {name}")


def encoder_name_from_diffusers(name, num_res_blocks):
    """down_blocks.1.attentions.0.norm.weight -> input_blocks.4.1.norm.weight: unet_name_to_diffusers inverted
    over the encoder (embeddings, input and middle blocks), for a file whose config is not known before its
    names are read (a ControlNet in diffusers names). None for any other name."""
    per_level = num_res_blocks + 1
    resnet = {new: old for old, new in _RESBLOCK_TO_DIFFUSERS.items()}
    for old, new in _FIXED_TO_DIFFUSERS.items():
        if name.startswith(new) and not new.startswith("mid_block."):
            return old + name[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.match(r"(down_blocks\.(\d+)|mid_block)\.(resnets|attentions)\.(\d+)\.([^.]+)(.*)", name):
        if m[2] is not None:
            block = f"input_blocks.{1 + int(m[2]) * per_level + int(m[4])}.{0 if m[3] == 'resnets' else 1}"
        else:
            block = f"middle_block.{1 if m[3] == 'attentions' else 2 * int(m[4])}"
        return f"{block}.{resnet.get(m[5], '?') if m[3] == 'resnets' else m[5]}{m[6]}"
    return None


def unet_to_diffusers(sd, num_res_blocks):
    return {unet_name_to_diffusers(name, num_res_blocks): t for name, t in sd.items()}


def unet_from_diffusers(sd, official_names, num_res_blocks):
    return {name: sd[unet_name_to_diffusers(name, num_res_blocks)] for name in official_names}


# ----------------------------------------------------------------------------- VAE


def vae_name_to_diffusers(name, levels):
    """encoder.down.1.block.0.nin_shortcut.weight -> encoder.down_blocks.1.resnets.0.conv_shortcut.weight."""
    n = name
    n = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", n)
    n = n.replace("mid.attn_1.norm", "mid_block.attentions.0.group_norm")
    n = re.sub(r"mid\.attn_1\.(q|k|v)\.", r"mid_block.attentions.0.to_\1.", n)
    n = n.replace("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0")
    n = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", n)
    n = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", n)
    # The decoder's ldm levels are numbered by resolution (up.0 is the full-resolution one, run
    # last); diffusers numbers them in execution order.
    n = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", n)
    n = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", n)
    n = n.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
    return n


def _vae_levels(names):
    return 1 + max(int(m[1]) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n)))


def _is_vae_attention_matrix(name):
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name) is not None


def vae_to_diffusers(sd):
    levels = _vae_levels(sd)
    out = {}
    for name, t in sd.items():
        if _is_vae_attention_matrix(name):
            t = t[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        out[vae_name_to_diffusers(name, levels)] = t
    return out


def vae_from_diffusers(sd, official_names):
    levels = _vae_levels(official_names)
    out = {}
    for name in official_names:
        t = sd[vae_name_to_diffusers(name, levels)]
        if _is_vae_attention_matrix(name) and t.ndim == 2:
            t = t[:, :, None, None]  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[name] = t
    return out


# ----------------------------------------------------------------------------- text encoders
# CLIP-L is stored in transformers' layout in both files (text_model.*): nothing to convert.
# OpenCLIP bigG is stored in open_clip's layout in the official file and in transformers' layout
# (CLIPTextModelWithProjection) in a diffusers folder.


def openclip_name_to_hf(name):
    """transformer.resblocks.3.mlp.c_fc.weight -> text_model.encoder.layers.3.mlp.fc1.weight (not for in_proj)."""
    n = re.sub(r"^transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1.", name)
    n = n.replace(".ln_1.", ".layer_norm1.").replace(".ln_2.", ".layer_norm2.")
    n = n.replace(".attn.out_proj.", ".self_attn.out_proj.")
    n = n.replace(".mlp.c_fc.", ".mlp.fc1.").replace(".mlp.c_proj.", ".mlp.fc2.")
    n = n.replace("ln_final.", "text_model.final_layer_norm.")
    if n == "token_embedding.weight":
        n = "text_model.embeddings.token_embedding.weight"
    if n == "positional_embedding":
        n = "text_model.embeddings.position_embedding.weight"
    return n


def openclip_to_hf(sd):
    out = {}
    for name, t in sd.items():
        if name == "logit_scale":
            continue  # CLIP's contrastive temperature; unused by SDXL and absent from transformers' class
        if name == "text_projection":
            out["text_projection.weight"] = t.T.contiguous()  # used as x @ P; a Linear weight is P^T
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name):
            q, k, v = t.chunk(3, dim=0)  # rows [q; k; v], each (width, ...) 
            for proj, part in zip("qkv", (q, k, v)):
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{proj}_proj.{m[2]}"] = part.contiguous()
        else:
            out[openclip_name_to_hf(name)] = t
    return out


def openclip_from_hf(sd, official_names):
    out = {}
    for name in official_names:
        if name == "text_projection":
            out[name] = sd["text_projection.weight"].T.contiguous()
        elif m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name):
            prefix = f"text_model.encoder.layers.{m[1]}.self_attn"
            out[name] = torch.cat([sd[f"{prefix}.{p}_proj.{m[2]}"] for p in "qkv"], dim=0)
        else:
            out[name] = sd[openclip_name_to_hf(name)]
    return out
