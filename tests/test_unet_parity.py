"""The UNet equals diffusers' UNet2DConditionModel on the same random weights (float32, <= 1e-5):
block by block first (so a failure says where), then the whole network, base- and refiner-shaped."""

import dataclasses

import pytest
import torch

from models.conditioning import vector_condition
from models.diffusers_layout import unet_config_to_diffusers
from models.keys import unet_from_diffusers
from models.unet import TINY, UNet

TOL = 1e-5
# Refiner-shaped: four levels, attention only in the middle two, so output_blocks.2 carries its
# Upsample at index .1 and the last level is attention-free.
TINY_REFINER = dataclasses.replace(
    TINY, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0), transformer_depth_middle=1,
    context_dim=64, adm_in_channels=48 + 5 * 16,
)


def make_pair(cfg, seed=0):
    """(ours, diffusers') with identical weights; every tensor is perturbed so that the ones/zeros
    of a fresh init (norm scales, biases) cannot hide a misplaced tensor."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    theirs = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), list(ours.state_dict()), cfg.num_res_blocks))
    return ours, theirs


@pytest.fixture(scope="module")
def pair():
    return make_pair(TINY)


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_time_embedding(pair):
    ours, theirs = pair
    t = torch.tensor([0.0, 1.0, 500.5, 999.0])
    from models.layers import timestep_embedding

    a = ours.time_embed(timestep_embedding(t, TINY.model_channels))
    b = theirs.time_embedding(theirs.time_proj(t))
    assert max_diff(a, b) <= TOL, f"time embedding diverges: {max_diff(a, b):.2e}"


def test_micro_conditioning_embedding(pair):
    ours, theirs = pair
    pooled = torch.randn(2, 48)
    time_ids = torch.tensor([[72.0, 56, 0, 0, 72, 56], [1024, 768, 16, 8, 1024, 768]])
    a = ours.label_emb(vector_condition(pooled, time_ids, TINY.micro_cond_dim))
    time_embeds = theirs.add_time_proj(time_ids.flatten()).reshape(2, -1)
    b = theirs.add_embedding(torch.cat([pooled, time_embeds], dim=-1))
    assert max_diff(a, b) <= TOL, f"micro-conditioning (label_emb) diverges: {max_diff(a, b):.2e}"


def test_blocks(pair):
    """ResBlock (with and without 1x1 skip), SpatialTransformer, Downsample, Upsample to an odd size."""
    ours, theirs = pair
    torch.manual_seed(1)
    emb = torch.randn(2, 4 * TINY.model_channels)
    context = torch.randn(2, 77, TINY.context_dim)
    cases = [  # (name, our module, their module, input shape, kind)
        ("input_blocks.1.0 ResBlock", ours.input_blocks[1][0], theirs.down_blocks[0].resnets[0], (2, 32, 9, 7), "res"),
        ("input_blocks.4.0 ResBlock 32->64", ours.input_blocks[4][0], theirs.down_blocks[1].resnets[0], (2, 32, 5, 4), "res"),
        ("input_blocks.4.1 SpatialTransformer", ours.input_blocks[4][1], theirs.down_blocks[1].attentions[0], (2, 64, 5, 4), "attn"),
        ("middle_block.1 SpatialTransformer", ours.middle_block[1], theirs.mid_block.attentions[0], (2, 64, 3, 2), "attn"),
        ("input_blocks.3.0 Downsample", ours.input_blocks[3][0], theirs.down_blocks[0].downsamplers[0], (2, 32, 9, 7), "down"),
        ("output_blocks.5.2 Upsample", ours.output_blocks[5][2], theirs.up_blocks[1].upsamplers[0], (2, 64, 5, 4), "up"),
    ]
    for name, a_mod, b_mod, shape, kind in cases:
        x = torch.randn(shape)
        if kind == "res":
            a, b = a_mod(x, emb), b_mod(x, emb)
        elif kind == "attn":
            a, b = a_mod(x, context), b_mod(x, encoder_hidden_states=context).sample
        elif kind == "down":
            a, b = a_mod(x), b_mod(x)
        else:
            a, b = a_mod(x, (9, 7)), b_mod(x, output_size=(9, 7))
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs diffusers {tuple(b.shape)}"
        assert max_diff(a, b) <= TOL, f"{name} diverges from diffusers: {max_diff(a, b):.2e}"


@pytest.mark.parametrize("cfg", [TINY, TINY_REFINER], ids=["base-shaped", "refiner-shaped"])
@pytest.mark.parametrize("size", [(8, 8), (9, 7), (6, 10)], ids=["8x8", "9x7", "6x10"])
def test_whole_unet(cfg, size):
    ours, theirs = make_pair(cfg)
    torch.manual_seed(2)
    n_numbers = (cfg.adm_in_channels - 48) // cfg.micro_cond_dim
    x = torch.randn(2, 4, *size)
    t = torch.tensor([999.0, 1.0])
    context = torch.randn(2, 77, cfg.context_dim)
    pooled = torch.randn(2, 48)
    numbers = torch.tensor([[64.0, 48, 0, 0, 64, 48, 6.0][:n_numbers], [1024.0, 768, 16, 8, 1024, 768, 2.5][:n_numbers]])
    with torch.no_grad():
        a = ours(x, t, context, vector_condition(pooled, numbers, cfg.micro_cond_dim))
        b = theirs(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
    assert a.shape == b.shape == x.shape
    assert max_diff(a, b) <= TOL, f"whole UNet diverges from diffusers at latent {size}: {max_diff(a, b):.2e}"
