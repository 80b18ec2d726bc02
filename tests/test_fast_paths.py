"""Ways to run a generation that trade speed for memory and leave the images as they are: --cfg-mode split
against the batched CFG pass, and --vae-tiling's blended tiles (exact on a pointwise function, close to the
untiled VAE on the tiny model, and without seams)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sampling.generate import main
from sampling.pipeline import Pipeline, Settings, tiled
from test_pipeline_parity import tiny_model


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_model())


def test_split_cfg_equals_the_batched_pass(pipe):
    s = Settings(prompt="1girl, smile", negative_prompt="lowres", width=64, height=64, steps=4, cfg=5.0,
                 sampler="euler", num_images=2, seed=1)
    batched = pipe.latents(s, progress=False)
    pipe.cfg_mode = "split"
    try:
        split = pipe.latents(s, progress=False)
    finally:
        pipe.cfg_mode = "batch"
    print(f"cfg split vs batch: max |diff| {(split - batched).abs().max():.2e}")
    assert (split - batched).abs().max() <= 1e-5 * batched.abs().max()


@pytest.mark.parametrize("factor, size, tile", [(8, (37, 50), 16), (1 / 8, (296, 400), 128)])
def test_tiles_blend_to_exactly_the_untiled_result_of_a_pointwise_function(factor, size, tile):
    x = torch.randn(2, 3, *size)
    if factor > 1:  # decode-like: every input point becomes an 8 x 8 block
        fn = lambda t: (F.interpolate(t, scale_factor=8, mode="nearest") * 2, t.repeat_interleave(8, -1).repeat_interleave(8, -2))
    else:  # encode-like: every 8 x 8 block becomes one point
        fn = lambda t: (F.avg_pool2d(t, 8), -F.avg_pool2d(t, 8))
    want, got = fn(x), tiled(fn, x, tile, factor)
    for a, b in zip(want, got):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_tiled_vae_decode_is_close_to_the_whole_and_has_no_seams(pipe):
    """Two tiles a side (32 of 48 latents). Close, not equal: each tile's GroupNorms and attention see that tile."""
    vae = pipe.model.vae
    g = torch.Generator().manual_seed(0)
    z = F.interpolate(torch.randn(1, 4, 12, 12, generator=g), size=(48, 48), mode="bicubic")  # smooth latents
    with torch.no_grad():
        whole = vae.decode(z).clamp(-1, 1)
        parts = tiled(vae.decode, z, 32, 8).clamp(-1, 1)
    diff = (parts - whole).abs() * 127.5  # in 0..255 pixel units
    print(f"tiled VAE decode: mean |diff| {diff.mean():.3f}, max {diff.max():.1f} of 255")
    assert diff.mean() <= 3.0
    # A seam would be a jump between neighbouring pixel columns (rows) larger than the image itself has.
    for dim in (-1, -2):
        jump = lambda img: img.diff(dim=dim).abs().mean(dim=(0, 1, -1 if dim == -2 else -2))  # per column (row)
        assert jump(parts).max() <= 1.25 * jump(whole).max()


def test_a_tile_size_below_8_latents_is_one_line(tmp_path, capsys):
    assert main(["--prompt", "x", "--vae-tiling", "4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--vae-tiling 4 is too small" in err, err
    assert not (tmp_path / "o").exists()


def test_split_cfg_from_the_command_line_gives_the_same_image(tmp_path):
    """--cfg-mode split equals the batched pass; --vae-tiling with a tile as big as the image is one tile."""
    from PIL import Image

    base = ["--prompt", "1girl, smile", "--steps", "3", "--seed", "5", "--width", "128", "--height", "128"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--cfg-mode", "split", "--vae-tiling", "16", "--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = sorted((tmp_path / "a").glob("*.png")), sorted((tmp_path / "b").glob("*.png"))
    pa, pb = (np.asarray(Image.open(p), dtype=float) for p in (a, b))
    assert np.abs(pa - pb).max() <= 1
