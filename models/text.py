"""SDXL's two text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers.

Both are pre-LN causal transformers over 77 tokens. SDXL conditions the UNet on the output of the
second-to-last layer of each (no final LayerNorm), concatenated to 77 x 2048, and on bigG's pooled,
projected EOS feature (1280). Attribute paths equal the official single-file keys after stripping
`conditioner.embedders.0.transformer.` (CLIP-L, transformers' layout) and `conditioner.embedders.1.model.`
(bigG, open_clip's layout), so each loads with `load_state_dict(strict=True)`.
Not here: `position_ids` (a buffer in the CLIP-L file; we use an arange) and bigG's `logit_scale`
(CLIP's contrastive temperature); loaders drop both.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import attention


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int  # token embeddings (49408 for CLIP's tokenizer)
    context_length: int  # number of positions; prompts are padded / truncated to this
    width: int  # channels of the residual stream
    layers: int  # transformer layers (SDXL reads the penultimate one's output)
    heads: int  # attention heads per layer
    mlp_dim: int  # hidden width of each layer's MLP
    act: str  # MLP activation: "quick_gelu" (CLIP-L) or "gelu" (exact erf GELU, bigG)
    projection_dim: int | None  # size of the pooled embedding; None = no text_projection
    eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self):
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextEncoderConfig.act is {self.act!r}; use 'quick_gelu' or 'gelu'.")
        sizes = dict(vocab_size=self.vocab_size, context_length=self.context_length, width=self.width,
                     mlp_dim=self.mlp_dim, heads=self.heads)
        if any(v < 1 for v in sizes.values()) or self.layers < 2:  # SDXL reads the second-to-last layer
            raise ValueError(f"a text encoder needs positive sizes and at least 2 layers (got {sizes}, "
                             f"layers={self.layers})")
        if self.width % self.heads:
            raise ValueError(f"a text encoder's {self.heads} heads do not divide its width {self.width}")


CLIP_L = TextEncoderConfig(49408, 77, 768, 12, 12, 3072, "quick_gelu", None)
OPENCLIP_BIGG = TextEncoderConfig(49408, 77, 1280, 32, 20, 5120, "gelu", 1280)
# Tiny versions for tests. The vocabulary stays full size because tests feed real token ids;
# the projection is not square so that a missing transpose cannot go unnoticed.
TINY_CLIP_L = TextEncoderConfig(49408, 77, 32, 3, 4, 128, "quick_gelu", None)
TINY_OPENCLIP_BIGG = TextEncoderConfig(49408, 77, 64, 3, 4, 256, "gelu", 48)


def check_clip_skip(clip_skip, cfg):
    """clip_skip k reads hidden_states[-(k + 2)]: at least one layer must run."""
    if not 0 <= clip_skip <= cfg.layers - 2:
        raise ValueError(f"clip skip {clip_skip} is outside 0 .. {cfg.layers - 2} for a {cfg.layers}-layer text encoder")


def mlp_activation(x, act):
    """quick_gelu x * sigmoid(1.702 x) is the original CLIP's cheap GELU approximation."""
    return x * torch.sigmoid(1.702 * x) if act == "quick_gelu" else F.gelu(x)


def embedding(num, width):
    """nn.Embedding(num, width), left uninitialised on the meta device (where the loaders build models): a meta
    tensor has no values to draw, and Embedding's normal_ there imports torch._dynamo, ~2 s per process. (For
    the same reason the parameters below scale their random start in place: `randn() * s` on meta imports it too.)"""
    if torch.empty(0).is_meta:
        return nn.Embedding(num, width, _weight=torch.empty(num, width))
    return nn.Embedding(num, width)


def check_tokens(tokens, cfg):
    if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length or tokens.is_floating_point():
        raise ValueError(
            f"Text encoder expects integer token ids of shape (B, <= {cfg.context_length}), got "
            f"{tuple(tokens.shape)} {tokens.dtype}; tokenize with padding='max_length', truncation=True."
        )


# ----------------------------------------------------------------------------- CLIP ViT-L/14


class CLIPAttention(nn.Module):
    """Self-attention with separate q/k/v projections (transformers' CLIPAttention names); causal in the text
    towers, not in the vision tower (models/clip_vision.py)."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        self.attend = attention  # swappable: see models.layers.attention

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(self.attend(q, k, v, self.heads, causal=self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(mlp_activation(self.fc1(x), self.act))


class CLIPLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEncoder(nn.Module):
    """CLIP ViT-L/14 text tower: tokens (B, 77) -> penultimate hidden states (B, 77, width).

    Follows transformers' CLIPTextModel; the containers below only reproduce its key nesting
    (text_model.embeddings.*, text_model.encoder.layers.N.*, text_model.final_layer_norm.*).
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=embedding(cfg.vocab_size, cfg.width),
                position_embedding=embedding(cfg.context_length, cfg.width),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers)))),
            final_layer_norm=nn.LayerNorm(cfg.width, eps=cfg.eps),  # in the checkpoint; unused by SDXL
        ))

    def forward(self, tokens, clip_skip=0):
        """tokens (B, T) long -> (B, T, width): hidden_states[-2], the second-to-last layer's output (diffusers'
        clip_skip k: hidden_states[-(k + 2)], k layers fewer)."""
        check_tokens(tokens, self.config)
        emb = self.text_model.embeddings
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        x = emb.token_embedding(tokens) + emb.position_embedding(positions)  # (B, T, width)
        # SDXL uses only the penultimate layer's output, so the last layer is never run: that saves
        # its compute, and it means the last layer and final_layer_norm get no gradient. Under DDP,
        # keep them frozen (requires_grad False) or DDP will wait forever for their gradients.
        check_clip_skip(clip_skip, self.config)
        for layer in self.text_model.encoder.layers[:len(self.text_model.encoder.layers) - 1 - clip_skip]:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- OpenCLIP ViT-bigG/14


class Projection(nn.Module):
    """F.linear with the weight passed in, as a module of its own: bigG's fused in_proj keeps
    nn.MultiheadAttention's parameter names (attn.in_proj_weight) and still has a module name,
    attn.in_proj, for hooks and LoRA adapters to attach to. It holds no parameters."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)


class OpenCLIPAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameters: one fused in_proj, rows [q; k; v]; causal in the
    text tower, not in ControlNet-Union's condition transformer (models/controlnet.py)."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # (3W, W)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.in_proj = Projection()
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        self.attend = attention  # swappable: see models.layers.attention

    def forward(self, x):
        q, k, v = self.in_proj(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, W)
        return self.out_proj(self.attend(q, k, v, self.heads, causal=self.causal))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.act
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_dim)
        self.c_proj = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.c_proj(mlp_activation(self.c_fc(x), self.act))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block (open_clip's ResidualAttentionBlock): same math as CLIPLayer."""

    def __init__(self, cfg, causal=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = OpenCLIPAttention(cfg, causal)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP ViT-bigG/14 text tower: tokens (B, 77) -> (penultimate (B, 77, W), pooled (B, proj)).

    Follows open_clip's TextTransformer / CLIP.encode_text (text_projection is used as x @ P).
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        W = cfg.width
        self.token_embedding = embedding(cfg.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, W).mul_(0.01))  # (77, W)
        blocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))
        self.transformer = nn.ModuleDict(dict(resblocks=blocks))
        self.ln_final = nn.LayerNorm(W, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.randn(W, cfg.projection_dim).mul_(W**-0.5))  # (W, proj)

    def forward(self, tokens, clip_skip=0):
        """tokens (B, T) long -> hidden_states[-2] (B, T, W) (clip_skip k: hidden_states[-(k + 2)]) and the
        projected EOS feature (B, proj), which always comes from the last layer."""
        check_tokens(tokens, self.config)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, T, W)
        check_clip_skip(clip_skip, self.config)
        *body, last = self.transformer.resblocks
        for i, block in enumerate(body):
            x = block(x)
            if i == len(body) - 1 - clip_skip:
                penultimate = x  # hidden_states[-(2 + clip_skip)]
        # Unlike CLIP-L, the last layer does run here: the pooled vector comes from its output.
        x = self.ln_final(last(x))
        # The pooled feature sits at the EOS token: 49407 is the vocabulary's largest id and argmax returns the
        # first occurrence, so this is the first EOS even where pads are also 49407 (bigG pads with 0). Tokens
        # added after the vocabulary (textual inversion, models/embeddings.py) are passed over, as AUTOMATIC1111
        # and ComfyUI pool at EOS; transformers' argmax would land on them (diffusers' pooled vector with one).
        vocabulary = torch.where(tokens < self.config.vocab_size, tokens, -1)
        eos = x[torch.arange(x.shape[0], device=x.device), vocabulary.argmax(dim=-1)]  # (B, W)
        return penultimate, eos @ self.text_projection  # (B, proj)
