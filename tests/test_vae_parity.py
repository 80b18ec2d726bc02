"""VAE parity: our AutoencoderKL against diffusers' on the same random weights, the diffusers <->
official key converter by round trip, and the full-size key layout against the official manifest."""

import json
from pathlib import Path

import pytest
import torch

from models.keys import vae_from_diffusers, vae_to_diffusers
from models.vae import SDXL_VAE, TINY_VAE, AutoencoderKL, sample_latent

KEYS = Path(__file__).parent / "sdxl-keys"  # copied from shared/sdxl-keys
MANIFEST = KEYS / "vae.json"  # official single file
DIFFUSERS_MANIFEST = KEYS / "diffusers_vae.json"  # diffusers vae/ folder
PREFIX = "first_stage_model."
TOL = 1e-5


def diffusers_vae(cfg, seed=0):
    """diffusers AutoencoderKL with cfg's architecture and random weights, norms and biases included."""
    diffusers = pytest.importorskip("diffusers")
    levels = len(cfg.ch_mult)
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
    )
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:  # norm weights are 1 and norm biases 0 at init: a swapped or dropped one would hide
                p.add_(0.1 * torch.randn_like(p))
    # diffusers' mid-block attention returns a channels_last view; every conv after it then takes
    # another kernel path and rounds differently (~1e-5 at the decoder output on these random
    # weights). Make it contiguous so the comparison measures the math, not the memory layout.
    for mid in (ref.encoder.mid_block, ref.decoder.mid_block):
        mid.attentions[0].register_forward_hook(lambda module, args, out: out.contiguous())
    return ref.eval()


def ours_from(ref, cfg):
    """Our model built on the meta device, then filled from diffusers' weights through the converter."""
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    sd = vae_from_diffusers(ref.state_dict(), list(ours.state_dict()))
    ours.load_state_dict(sd, strict=True, assign=True)
    return ours.eval()


@pytest.fixture(scope="module")
def pair():
    ref = diffusers_vae(TINY_VAE)
    return ref, ours_from(ref, TINY_VAE)


def max_diff(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs diffusers {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("hw", [(64, 64), (72, 56)])  # 72x56 -> a 9x7 latent
@torch.no_grad()
def test_encode_matches_diffusers(pair, hw):
    ref, ours = pair
    x = torch.rand(2, TINY_VAE.in_channels, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, logvar = ours.encode(x)
    dist = ref.encode(x).latent_dist
    assert mean.shape[-2:] == (hw[0] // 8, hw[1] // 8)
    err = max_diff(mean, dist.mean)
    assert err <= TOL, f"encoder side (encoder, quant_conv): mean differs from diffusers by {err:.2e} on {hw}"
    err = max_diff(logvar, dist.logvar)
    assert err <= TOL, f"encoder side (encoder, quant_conv, clamp): logvar differs from diffusers by {err:.2e} on {hw}"


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, hw):
    ref, ours = pair
    z = torch.randn(2, TINY_VAE.z_channels, *hw, generator=torch.Generator().manual_seed(2))
    out, expected = ours.decode(z), ref.decode(z).sample
    assert out.shape == (2, TINY_VAE.out_channels, hw[0] * 8, hw[1] * 8)
    err = max_diff(out, expected)
    assert err <= TOL, f"decoder side (post_quant_conv, decoder) differs from diffusers by {err:.2e} on a {hw} latent"


@torch.no_grad()
def test_sample_latent_matches_diffusers(pair):
    ref, ours = pair
    x = torch.rand(1, TINY_VAE.in_channels, 32, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = sample_latent(*ours.encode(x), generator=torch.Generator().manual_seed(4))
    expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(4))
    err = max_diff(z, expected)
    assert err <= TOL, f"sampled latent differs from diffusers by {err:.2e}"


def test_converter_round_trip(pair):
    ref, ours = pair
    diffusers_sd = ref.state_dict()
    back = vae_to_diffusers(vae_from_diffusers(diffusers_sd, list(ours.state_dict())))
    assert set(back) == set(diffusers_sd), f"key mismatch: {sorted(set(back) ^ set(diffusers_sd))[:5]}"
    for name, t in diffusers_sd.items():
        assert back[name].shape == t.shape and torch.equal(back[name], t), f"{name} changed in the round trip"


def test_full_size_matches_official_manifest():
    manifest = {k.removeprefix(PREFIX): tuple(v) for k, v in json.loads(MANIFEST.read_text()).items()}
    with torch.device("meta"):
        vae = AutoencoderKL(SDXL_VAE)
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    missing, extra = sorted(set(manifest) - set(ours)), sorted(set(ours) - set(manifest))
    assert not missing and not extra, f"missing from ours: {missing[:5]}; not in the official file: {extra[:5]}"
    wrong = [(k, ours[k], manifest[k]) for k in manifest if ours[k] != manifest[k]]
    assert not wrong, f"shape mismatches (name, ours, official): {wrong[:5]}"
    assert len(ours) == 248
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_full_size_converts_to_diffusers_manifest():
    """The converter maps the full-size official names and shapes onto the diffusers folder's."""
    expected = {k: tuple(v) for k, v in json.loads(DIFFUSERS_MANIFEST.read_text()).items()}
    with torch.device("meta"):
        sd = AutoencoderKL(SDXL_VAE).state_dict()
    got = {k: tuple(v.shape) for k, v in vae_to_diffusers(sd).items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing: {missing[:5]}; not in the diffusers folder: {extra[:5]}"
    wrong = [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]
    assert not wrong, f"shape mismatches (name, converted, diffusers): {wrong[:5]}"
    back = vae_from_diffusers(vae_to_diffusers(sd), list(sd))
    assert all(back[k].shape == sd[k].shape for k in sd), "shapes changed in the official -> diffusers -> official trip"
