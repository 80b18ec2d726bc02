"""sampling/instruments.py and sampling/interventions.py on random tiny SDXL: with nothing active, and after every
instrument, images are bit-identical to the plain model's; taps record each step in the batch layout of both CFG
modes; interventions equal the same change made by hand; FreeU equals diffusers' enable_freeu; softmax attention
equals SDPA within float noise and records the probabilities a by-hand softmax gives; --save-attention writes a
heatmap grid."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_parity import assert_close_images, diffusers_images, files, reference, tiny_model  # noqa: F401

from models.conditioning import vector_condition
from models.layers import attention, softmax_attention
from sampling.instruments import attention_maps, intervene, level_size, tap, token_heatmaps
from sampling.interventions import classic_attention, freeu, skipped, zero_micro_conditioning
from sampling.pipeline import Pipeline, Settings

S = Settings(prompt="1girl, solo, blue hair, smile", negative_prompt="lowres", width=64, height=56, steps=4, cfg=5.0,
             sampler="euler", seed=3, num_images=2)


def pixels(pipe, s=S):
    return [np.asarray(image) for image in pipe(s, progress=False)]


def unet_inputs(model, n=2, seed=0):
    cfg = model.config.unet
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, model.config.text_encoder_2.projection_dim, generator=g)
    numbers = torch.tensor([[56.0, 64, 0, 0, 56, 64]] * n)
    return (torch.randn(n, 4, 7, 8, generator=g), torch.tensor([900.0, 100.0][:n]),
            torch.randn(n, 77, cfg.context_dim, generator=g), vector_condition(pooled, numbers, cfg.micro_cond_dim))


def test_nothing_active_and_every_instrument_undone_leave_images_bit_identical():
    pipe = Pipeline(tiny_model())
    plain = pixels(pipe)
    with tap(pipe.model, "unet.*"), intervene(pipe.model, "unet.output_blocks.*", lambda name, step, out: out):
        recorded = pixels(pipe)  # recording and an identity change alter nothing
    for instrument in (freeu, classic_attention, zero_micro_conditioning,
                       lambda m: skipped(m, "unet.*transformer_blocks.0"), lambda m: attention_maps(m, "*attn*")):
        with instrument(pipe.model):
            pixels(pipe)
    after = pixels(pipe)
    for a, b, c in zip(plain, recorded, after):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in pipe.model.modules())


def test_a_tap_records_every_step_in_the_batch_layout_of_both_cfg_modes():
    pipe = Pipeline(tiny_model())
    records = {}
    for mode in ("batch", "split"):
        pipe.cfg_mode = mode
        with tap(pipe.model, ["unet.middle_block", "unet.out.2"]) as records[mode]:
            pixels(pipe)
    batch, split = records["batch"], records["split"]
    assert set(batch) == set(split) == {"unet.middle_block", "unet.out.2"}
    assert sorted(batch["unet.out.2"]) == list(range(S.steps))
    for name in batch:
        for step, out in batch[name].items():
            assert out.shape[0] == 2 * S.num_images  # [uncond, cond]
            torch.testing.assert_close(split[name][step], out, rtol=0, atol=1e-4)
    assert not torch.allclose(batch["unet.out.2"][0][:2], batch["unet.out.2"][0][2:])  # uncond rows differ


def test_interventions_equal_the_change_made_by_hand():
    model = tiny_model()
    x, t, context, y = unet_inputs(model)
    with torch.no_grad():
        plain = model.unet(x, t, context, y)
        with intervene(model, "unet.out", lambda name, step, out: 2 * out):
            doubled = model.unet(x, t, context, y)
        torch.testing.assert_close(doubled, 2 * plain, rtol=0, atol=0)

        with zero_micro_conditioning(model):
            zeroed = model.unet(x, t, context, y)
        P = model.config.text_encoder_2.projection_dim
        by_hand = model.unet(x, t, context, torch.cat([y[:, :P], torch.zeros_like(y[:, P:])], dim=1))
        assert torch.equal(zeroed, by_hand) and not torch.allclose(zeroed, plain)

        # A skipped transformer block returns its input: what the block with its three output layers zeroed does.
        name = "unet.input_blocks.4.1.transformer_blocks.0"
        silent = copy.deepcopy(model)
        block = silent.get_submodule(name)
        for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[2]):
            layer.weight.zero_(), layer.bias.zero_()
        with skipped(model, name):
            skipping = model.unet(x, t, context, y)
        torch.testing.assert_close(skipping, silent.unet(x, t, context, y), rtol=0, atol=1e-6)
        assert not torch.allclose(skipping, plain)


def test_freeu_equals_diffusers_enable_freeu(files, reference):
    pipe = Pipeline.load(files / "tiny.safetensors")
    s = replace(S, sampler="dpmpp_2m", steps=6, width=64, height=64)
    reference.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4)
    try:
        theirs = diffusers_images(reference, s)
    finally:
        reference.disable_freeu()
    with freeu(pipe.model):
        ours = pixels(pipe, s)
    assert_close_images(ours, theirs, "FreeU")
    # It acts: the parity above means something (measured here: the UNet's output moves by about its own mean size).
    assert all(np.abs(a.astype(int) - b.astype(int)).mean() > 0.3 for a, b in zip(pixels(pipe, s), ours))
    x, t, context, y = unet_inputs(pipe.model)
    with torch.no_grad(), freeu(pipe.model):
        changed = pipe.model.unet(x, t, context, y)
    plain = pipe.model.unet(x, t, context, y)
    assert (changed - plain).abs().max() > 0.5 * plain.abs().mean()


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_attention_equals_sdpa_and_records_the_probabilities(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 12, generator=g) for _ in range(3))
    chunks = []
    out = softmax_attention(q, k, v, heads=3, causal=causal, record=lambda p, start: chunks.append((start, p)), chunk=3)
    torch.testing.assert_close(out, attention(q, k, v, 3, causal), rtol=0, atol=1e-6)
    assert [start for start, _ in chunks] == [0, 3, 6]
    probs = torch.cat([p for _, p in chunks], dim=1)  # (2, 7, 7), heads averaged
    scores = q.unflatten(-1, (3, 4)).transpose(1, 2) @ k.unflatten(-1, (3, 4)).transpose(1, 2).transpose(-1, -2) / 2
    if causal:
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1).mean(1), rtol=0, atol=1e-6)


def test_classic_attention_equals_sdpa_everywhere():
    model = tiny_model()
    x, t, context, y = unet_inputs(model)
    tokens = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    run = lambda: (model.unet(x, t, context, y), *model.encode_text(tokens, tokens), model.vae.decode(z))
    with torch.no_grad():
        plain = run()
        with classic_attention(model, "*"):  # the UNet's, both text encoders' (causal) and the VAE's
            classic = run()
    for a, b in zip(plain, classic):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_attention_maps_cover_every_cross_attention_and_give_heatmaps():
    pipe = Pipeline(tiny_model())
    plain = pixels(pipe)
    with attention_maps(pipe.model) as maps:
        mapped = pixels(pipe)
    for a, b in zip(plain, mapped):  # softmax attention instead of SDPA: float noise only
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    names = {n for n, _ in pipe.model.named_modules() if n.startswith("unet.") and n.endswith("attn2")}
    assert set(maps) == names and all(sorted(by_step) == list(range(S.steps)) for by_step in maps.values())
    for by_step in maps.values():
        probs = by_step[0]  # (2B, h * w, 77)
        assert probs.shape[0] == 4 and probs.shape[2] == 77
        level_size(7, 8, probs.shape[1])  # a level of the 56x64 image's 7x8 latent
        torch.testing.assert_close(probs.float().sum(-1), torch.ones(probs.shape[:2]), rtol=0, atol=1e-2)
    heat = token_heatmaps(maps, S.height, S.width, rows=slice(2, 4))
    assert heat.shape == (2, 77, S.height, S.width)
    assert torch.allclose(heat.amax((2, 3)), torch.ones(2, 77)) and heat.amin((2, 3)).eq(0).all()  # each min to max


def test_a_pattern_that_matches_nothing_is_one_sentence():
    with pytest.raises(ValueError, match=r"matches no module of the model; names are the official ones"):
        with tap(tiny_model(), "unet.input_block.*"):  # input_blocks
            pass
    with pytest.raises(ValueError, match="matches no attention module"):
        with classic_attention(tiny_model(), "unet.out"):
            pass


def test_save_attention_writes_a_heatmap_grid_per_image(tmp_path, capsys):
    from sampling.generate import main

    common = ["--prompt", "1girl, smile", "--steps", "3", "--width", "64", "--height", "64", "--num-images", "2",
              "--out", str(tmp_path / "out")]
    assert main(common + ["--save-attention", str(tmp_path / "maps")]) == 0
    images = sorted((tmp_path / "out").glob("*.png"))
    grids = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.name for p in grids] == [p.name for p in images] and len(images) == 2
    from models.tokenizer import load_tokenizers
    from sampling.instruments import prompt_tokens

    positions, labels = prompt_tokens(load_tokenizers()[0], "1girl, smile")
    assert "smile" in labels and len(positions) == len(labels) >= 3
    with Image.open(grids[0]) as grid:  # the image, then one 128-px panel per token, 6 to a row
        assert grid.size == (min(6, 1 + len(labels)) * 128, -(-(1 + len(labels)) // 6) * (128 + 14))
    assert main(common + ["--save-attention", str(tmp_path / "m2"), "--hires-scale", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --save-attention maps one pass of one model at one size")
    assert not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_interventions_and_taps_from_the_command_line(tmp_path, capsys):
    from safetensors.torch import load_file

    from sampling.generate import main

    out = tmp_path / "out"
    common = ["--prompt", "1girl, smile", "--steps", "3", "--width", "64", "--height", "64", "--seed", "4"]
    skip = "skip=unet.output_blocks.3.1.transformer_blocks.0"
    assert main(common + ["--intervention", "freeu", "--intervention", skip, "--tap", "unet.middle_block",
                          "--tap-out", str(tmp_path / "taps.safetensors"), "--out", str(out)]) == 0
    png = sorted(out.glob("*.png"))[0]
    pipe = Pipeline.load("plainxl-tiny")
    s = Settings(prompt="1girl, smile", steps=3, width=64, height=64, seed=4)
    with freeu(pipe.model), skipped(pipe.model, skip.removeprefix("skip=")), tap(pipe.model, "unet.middle_block") as taps:
        want = pixels(pipe, s)[0]
    assert np.array_equal(np.asarray(Image.open(png)), want)
    recorded = load_file(tmp_path / "taps.safetensors")
    assert sorted(recorded) == [f"unet.middle_block/step{i:03d}" for i in range(3)]
    assert all(torch.equal(recorded[f"unet.middle_block/step{i:03d}"], taps["unet.middle_block"][i]) for i in range(3))
    # The PNG records the interventions, and --from-png runs them again.
    assert main(["--from-png", str(png), "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(np.asarray(Image.open(sorted((tmp_path / "again").glob("*.png"))[0])), want)
    for extra, fragment in [(["--intervention", "skip=unet.nothing.*"], "matches no module of the model"),
                            (["--tap", "unet.out"], "--tap and --tap-out go together"),
                            (["--intervention", "freeU"], "is not an intervention; use freeu")]:
        try:
            code = main(common + extra + ["--out", str(tmp_path / "bad")])
        except SystemExit as e:  # argparse's errors: one line, exit 2, as main's
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and fragment in err, err
        assert not (tmp_path / "bad").exists()
