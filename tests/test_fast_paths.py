"""Ways to run a generation that trade speed for memory and leave the images as they are: --cfg-mode split
against the batched CFG pass, and --vae-tiling's blended tiles (exact on a pointwise function, close to the
untiled VAE on the tiny model, and without seams)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pipeline_parity import tiny_model

from sampling.generate import main
from sampling.pipeline import Pipeline, Settings
from sampling.tiling import tiled


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


def max_pixel_diff(a, b):
    """The largest |difference| (of 255) between the one PNG in folder a and the one in folder b."""
    from PIL import Image

    (pa,), (pb,) = (sorted(folder.glob("*.png")) for folder in (a, b))
    return np.abs(np.asarray(Image.open(pa), dtype=float) - np.asarray(Image.open(pb), dtype=float)).max()


def test_split_cfg_from_the_command_line_gives_the_same_image(tmp_path):
    """--cfg-mode split equals the batched pass; --vae-tiling with a tile as big as the image is one tile."""
    base = ["--prompt", "1girl, smile", "--steps", "3", "--seed", "5", "--width", "128", "--height", "128"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--cfg-mode", "split", "--vae-tiling", "16", "--out", str(tmp_path / "b")]) == 0
    assert max_pixel_diff(tmp_path / "a", tmp_path / "b") <= 1


def test_offload_holds_one_part_on_the_device_at_a_time_and_leaves_the_images():
    """With offload, each part moves to the device just before it runs and back to the CPU after it. Here the
    device is "cpu:0": the same memory, but a name the moves can be told apart by (in: cpu:0, out: cpu)."""
    model = tiny_model()
    pipe = Pipeline(model)
    s = Settings(prompt="1girl, smile", negative_prompt="lowres", width=64, height=64, steps=3, sampler="euler",
                 init_image=None, seed=2)
    img2img = Settings(prompt="1girl", width=64, height=64, steps=4, sampler="euler", seed=2)
    plain = [pipe(s, progress=False)[0], pipe(replace(img2img, init_image=pipe(s, progress=False)[0]), progress=False)[0]]
    events = []
    for name in ("text_encoder_1", "text_encoder_2", "unet", "vae"):
        part = getattr(model, name)
        part.to = lambda device, name=name, move=part.to, **kw: (events.append((name, str(device))), move(device, **kw))[1]
        part.register_forward_pre_hook(lambda module, args, name=name: events.append((name, "runs")))
    for method in ("encode", "decode"):  # the VAE runs through these, not forward
        setattr(model.vae, method, lambda *a, run=getattr(model.vae, method): (events.append(("vae", "runs")), run(*a))[1])
    pipe.offload = "cpu:0"
    first = pipe(s, progress=False)[0]
    offloaded = [first, pipe(replace(img2img, init_image=first), progress=False)[0]]
    for a, b in zip(plain, offloaded):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    on = set()
    for name, what in events:
        if what == "runs":
            assert name in on, f"the {name} ran before it was moved to the device"
        else:
            (on.add if what == "cpu:0" else on.discard)(name)
        assert on <= {"text_encoder_1", "text_encoder_2"} or len(on) == 1, f"on the device at once: {sorted(on)}"
    assert not on, f"left on the device: {sorted(on)}"
    assert {n for n, w in events if w == "runs"} == {"text_encoder_1", "text_encoder_2", "unet", "vae"}


def test_offload_on_the_cpu_is_one_line(tmp_path, capsys):
    assert main(["--prompt", "x", "--offload", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "with --device cpu there is nothing to offload" in err, err


@pytest.mark.slow
def test_compile_compiles_the_unet_and_leaves_the_image(tmp_path, monkeypatch):
    """--compile calls the UNet's Module.compile. Inductor takes minutes on a CPU, so the test compiles with
    dynamo's eager backend: the UNet is traced into graphs and run from them, and the image stays the same."""
    compiled, original = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: (compiled.append(type(self).__name__),
                                                                   original(self, backend="eager"))[1])
    base = ["--prompt", "1girl, smile", "--steps", "2", "--seed", "5"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--compile", "--out", str(tmp_path / "b")]) == 0
    assert compiled == ["UNet"]
    assert max_pixel_diff(tmp_path / "a", tmp_path / "b") <= 1
