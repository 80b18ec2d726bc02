"""The command line: long-prompt chunking, PNG parameters round trip through --from-png, bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from models.sdxl import TINY
from sampling.generate import main
from sampling.pipeline import Pipeline, Settings
from sampling.pnginfo import format_parameters, parse_parameters
from sampling.prompts import encode_prompts, token_chunks


@pytest.fixture(scope="module")
def model_file(tiny_file):
    return tiny_file


# ----------------------------------------------------------------------------- long prompts


def test_long_prompt_is_split_into_75_token_windows(model_file):
    pipe = Pipeline.load(model_file)
    tok_1, tok_2 = pipe.tokenizers
    words = [f"tag{i}" for i in range(60)]  # "tagN" is several tokens: well over 75
    prompt = ", ".join(words)
    ids = tok_1(prompt, add_special_tokens=False).input_ids
    assert len(ids) > 150
    chunks = token_chunks(tok_1, prompt)
    assert len(chunks) == -(-len(ids) // 75)
    assert all(c.shape == (77,) and c[0] == tok_1.bos_token_id for c in chunks)
    assert torch.equal(torch.cat([c[1:76] for c in chunks])[: len(ids)], torch.tensor(ids))
    assert chunks[-1][1 + len(ids) % 75] == tok_1.eos_token_id

    with torch.no_grad():
        context, pooled = encode_prompts(pipe.model, pipe.tokenizers, [prompt])
        assert context.shape == (1, 77 * len(chunks), TINY.unet.context_dim)
        # Each window is encoded on its own: window k equals encoding its tokens as a prompt of their own.
        second_1, second_2 = token_chunks(tok_1, prompt)[1], token_chunks(tok_2, prompt)[1]
        alone, _ = pipe.model.encode_text(second_1[None], second_2[None])
        assert torch.equal(context[:, 77:154], alone)
        first, first_pooled = pipe.model.encode_text(chunks[0][None], token_chunks(tok_2, prompt)[0][None])
        assert torch.equal(context[:, :77], first) and torch.equal(pooled, first_pooled)


def test_short_negative_is_padded_to_the_prompts_windows(model_file):
    pipe = Pipeline.load(model_file)
    prompt = ", ".join(f"tag{i}" for i in range(40))
    s = Settings(prompt=prompt, negative_prompt="lowres", width=64, height=64)
    with torch.no_grad():
        cond, uncond = pipe.conditioning(s)
    assert cond[0].shape == uncond[0].shape and cond[0].shape[1] % 77 == 0 and cond[0].shape[1] > 77


# ----------------------------------------------------------------------------- PNG parameters


def test_parameters_round_trip():
    s = Settings(prompt="1girl, solo,\nsecond line: with colon", negative_prompt="", width=832, height=1216,
                 steps=28, cfg=5.5, sampler="dpmpp_2m", karras=True, guidance_rescale=0.7, seed=42,
                 original_size=(1024, 768), crop_top_left=(16, 8), target_size=(1216, 832), truncate_prompt=True)
    text = format_parameters(s, 42, "some/model, with comma")
    assert "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 42, Size: 832x1216" in text
    parsed, recorded = parse_parameters(text)
    assert parsed == s and recorded == {"Model": "some/model, with comma"}
    parsed, _ = parse_parameters(format_parameters(Settings(prompt="x", width=64, height=64), 0, "m"))
    assert parsed.negative_prompt is None  # no negative line: zero conditioning, not ""


def test_a1111_written_parameters_parse():
    text = "masterpiece, 1girl\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, " \
           "Seed: 1234, Size: 512x768, Model hash: abcdef, Model: animagine-xl-4.0, Version: v1.10.0"
    s, recorded = parse_parameters(text)
    assert (s.prompt, s.negative_prompt, s.steps, s.sampler, s.schedule, s.karras, s.cfg, s.seed, s.width, s.height) == \
        ("masterpiece, 1girl", "lowres", 20, "dpmpp_2m", "karras", False, 7.0, 1234, 512, 768)  # k-diffusion's Karras
    assert recorded == {"Model": "animagine-xl-4.0", "Model hash": "abcdef"}


def test_cli_batch_then_from_png_reproduces_an_image(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", str(model_file), "--prompt", "1girl, blue hair", "--negative-prompt", "lowres",
            "--width", "64", "--height", "56", "--steps", "4", "--sampler", "euler_a", "--seed", "7",
            "--num-images", "2", "--out", str(out)]
    assert main(args) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    text = Image.open(files[1]).info["parameters"]
    assert text.startswith("1girl, blue hair\nNegative prompt: lowres\nSteps: 4, Sampler: Euler a, CFG scale: 5.0, "
                           "Seed: 8, Size: 64x56")
    assert main(["--from-png", str(files[1]), "--out", str(out)]) == 0
    again = sorted(out.iterdir())[-1]
    assert again.name == "00002-8.png"
    # Same noise, same settings; a batch of 1 instead of 2 may round differently (convolution algorithms
    # are chosen per batch size: 2e-5 in the VAE decode here), so up to one level of 255.
    diff = np.abs(np.asarray(Image.open(again), dtype=int) - np.asarray(Image.open(files[1]), dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert Image.open(again).info["parameters"] == text


# ----------------------------------------------------------------------------- bad input


def run_cli(args):
    return subprocess.run([sys.executable, "-m", "sampling.generate", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, fragment", [
    (["--width", "100"], "--width 100 is not a positive multiple of 8; use 96 or 104"),
    (["--height", "0"], "--height 0 is not a positive multiple of 8; use 8"),
    (["--height", "-64"], "--height -64 is not a positive multiple of 8; use 8"),
    (["--sampler", "dpm_fast"], "invalid choice: 'dpm_fast'"),
    (["--schedule", "turbo"], "invalid choice: 'turbo'"),
    (["--sampler", "euler", "--eta", "0.5"], "--eta applies to the ancestral and SDE samplers"),
    (["--sampler", "euler_ancestral", "--s-noise", "-1"], "--s-noise -1.0 is not a number >= 0"),
    (["--sampler", "heun", "--karras"], "with heun use --schedule karras"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--sampler", "ddim", "--karras"], "--karras is diffusers' Karras schedule for euler, euler_ancestral and dpmpp_2m"),
])
def test_bad_settings(model_file, tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    try:
        code = main(["--model", str(model_file), "--prompt", "x", "--out", str(out), *args])
    except SystemExit as e:  # argparse's own checks (choices) end here
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_missing_model_one_line_no_traceback(tmp_path):
    r = run_cli(["--model", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()  # nothing made, not even the folder


@pytest.mark.parametrize("content", [b"not a png", None])
def test_unreadable_from_png(tmp_path, capsys, content):
    png = tmp_path / "in.png"
    if content is None:
        Image.new("RGB", (8, 8)).save(png)  # a valid PNG without parameters
    else:
        png.write_bytes(content)
    assert main(["--from-png", str(png), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--from-png {png} cannot be used" in err


# ----------------------------------------------------------------------------- the bundled model


@pytest.mark.slow
def test_readme_first_command_uses_the_bundled_model_offline(tmp_path):
    """No --model, no size, no network: the bundled plainxl-tiny at its own 64x64."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "sampling.generate", "--prompt", "1girl, blue hair, red eyes",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    (png,) = tmp_path.iterdir()
    image = Image.open(png)
    import hashlib

    from models.loading import BUNDLED

    # AUTOMATIC1111's Model hash: sha256 of the whole file, first 10 hex digits.
    digest = hashlib.sha256(BUNDLED["plainxl-tiny"].read_bytes()).hexdigest()[:10]
    assert image.size == (64, 64)
    assert f"Size: 64x64, Timesteps: diffusers, Model hash: {digest}, Model: plainxl-tiny" in image.info["parameters"]


def test_bundled_model_file():
    """Small, fp16, the tiny architecture, with its own VAE scaling factor."""
    from dataclasses import replace

    from models.loading import BUNDLED, load

    path = BUNDLED["plainxl-tiny"]
    assert path.stat().st_size <= 40 * 2**20
    model = load("plainxl-tiny", dtype=None)
    assert next(model.unet.parameters()).dtype == torch.float16
    assert replace(model.config, vae=replace(model.config.vae, scaling_factor=TINY.vae.scaling_factor)) == TINY
    assert model.config.vae.scaling_factor != TINY.vae.scaling_factor  # derived from its own latents


def test_bundled_refiner_file_shares_the_base_vae_and_reads_its_prompts():
    """The refiner layout at the tiny scale; the base's VAE (it takes over the base's latents) and bigG."""
    from dataclasses import replace

    from models.loading import BUNDLED, load
    from models.sdxl import TINY_REFINER

    assert BUNDLED["plainxl-tiny-refiner"].stat().st_size <= 40 * 2**20
    base, refiner = load("plainxl-tiny", dtype=None), load("plainxl-tiny-refiner", dtype=None)
    assert replace(refiner.config, vae=TINY_REFINER.vae) == TINY_REFINER
    for name in ("vae", "text_encoder_2"):
        ours, theirs = getattr(refiner, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert refiner.config.vae == base.config.vae


@pytest.mark.slow
def test_the_two_stage_command_runs_offline_on_the_bundled_pair(tmp_path):
    import hashlib

    from models.loading import BUNDLED

    run = subprocess.run([sys.executable, "-m", "sampling.generate", "--prompt", "1girl, blue hair", "--steps", "8",
                          "--refiner", "plainxl-tiny-refiner", "--out", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (png,) = tmp_path.iterdir()
    digest = hashlib.sha256(BUNDLED["plainxl-tiny-refiner"].read_bytes()).hexdigest()[:10]
    assert f"Refiner: plainxl-tiny-refiner [{digest}], Refiner switch at: 0.8" in Image.open(png).info["parameters"]
