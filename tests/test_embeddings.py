"""Textual-inversion embeddings (models/embeddings.py): the conditioning equals diffusers' load_textual_inversion
on the same file (both encoders), `embedding:name` and a bare name read alike, an embedding stays in one
75-token window, the PNG records AUTOMATIC1111's `TI hashes` and --from-png reloads the files; bad input is
one line before the load."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_pipeline_parity import tiny_model
from test_robustness import generate, one_line_error

from models.diffusers_layout import save_diffusers
from models.embeddings import embedding_hash
from models.tokenizer import load_tokenizers
from sampling.pipeline import Pipeline, Settings
from sampling.prompts import used_embeddings, weighted_chunks, with_embeddings

QUICK = ["--steps", "3", "--sampler", "euler", "--seed", "5", "--width", "64", "--height", "48"]


def embedding_file(path, vectors=3, widths=(32, 64), seed=0):
    """An SDXL embedding as Civitai ships one: clip_l (n, width_1) and clip_g (n, width_2) in one file."""
    g = torch.Generator().manual_seed(seed)
    save_file({"clip_l": torch.randn(vectors, widths[0], generator=g),
               "clip_g": torch.randn(vectors, widths[1], generator=g)}, str(path))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    save_diffusers(tiny_model(), root / "tiny")
    (root / "embeddings").mkdir()
    embedding_file(root / "embeddings" / "Style.safetensors")
    embedding_file(root / "embeddings" / "badhands.safetensors", vectors=2, seed=1)
    return root


def test_the_conditioning_equals_diffusers_load_textual_inversion(folder):
    """Both encoders' context equals diffusers' prompt_embeds for the prompt with the embedding's token; the pooled
    vector is bigG's at EOS (as A1111 and ComfyUI; transformers' argmax pooling would land on the new token)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    reference = StableDiffusionXLPipeline.from_pretrained(folder / "tiny", add_watermarker=False).to(torch.float32)
    vectors = load_file(folder / "embeddings" / "Style.safetensors")
    reference.load_textual_inversion(vectors["clip_l"], token="<style>", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(vectors["clip_g"], token="<style>", text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    with torch.no_grad():
        theirs, *_ = reference.encode_prompt("a photo of <style>, smiling", do_classifier_free_guidance=False)
        ids = reference.tokenizer_2("a photo of <style> <style>_1 <style>_2, smiling", padding="max_length",
                                    max_length=77, return_tensors="pt").input_ids
        hidden = reference.text_encoder_2(ids, output_hidden_states=True).last_hidden_state
        pooled = reference.text_encoder_2.text_projection(hidden[0, (ids[0] == 49407).nonzero()[0, 0]])[None]
    pipe = Pipeline.load(folder / "tiny", embeddings=[folder / "embeddings" / "Style.safetensors"])
    for prompt in ["a photo of embedding:Style, smiling", "a photo of style, smiling", "a photo of embedding:style.safetensors, smiling"]:
        (context, y), _ = pipe.conditioning(Settings(prompt=prompt, width=64, height=64, cfg=1.0))
        torch.testing.assert_close(context, theirs, rtol=1e-5, atol=1e-5, msg=f"context of {prompt!r}")
        torch.testing.assert_close(y[:, :pooled.shape[1]], pooled, rtol=1e-5, atol=1e-5, msg=f"pooled of {prompt!r}")
    (plain, _), _ = pipe.conditioning(Settings(prompt="a photo of, smiling", width=64, height=64, cfg=1.0))
    assert (plain - theirs).abs().max() > 1e-2, "the embedding changed nothing"


def test_an_embedding_stays_in_one_window():
    """A1111: an embedding that would cross the 75-token boundary starts the next window, whole."""
    tokenizer, _ = load_tokenizers()
    tokenizer.add_tokens(["<neg:0>", "<neg:1>", "<neg:2>"])
    words = {"neg": "<neg:0> <neg:1> <neg:2>"}
    chunks = weighted_chunks(tokenizer, "cat, " * 37 + "dog neg, (neg:1.5)", weighted=True, embeddings=words)
    first, second = (ids.tolist() for ids, _ in chunks)
    assert 49408 not in first and second[1:4] == [49408, 49409, 49410], "the embedding was split"
    assert first[76] == 49407 and first.count(2368) == 37, "the first window lost its tokens"
    weights = chunks[1][1].tolist()
    assert weights[1:4] == [1.0] * 3 and weights[5:8] == pytest.approx([1.5] * 3), "weights reach every vector"


def test_weighted_edited_and_literal_names_are_read_and_recorded():
    """A bare name followed by a weight, in prompt editing, or in a literal prompt (--no-prompt-weights) is the
    embedding, as A1111 matches its tokens; each counts as used for the PNG's TI hashes."""
    words = {"style": "<style:0> <style:1>", "badhands": "<badhands:0>"}
    assert with_embeddings("(style:1.2), artist:style", words) == "( <style:0> <style:1> :1.2), artist: <style:0> <style:1> "
    s = Settings(prompt="1girl, (style:1.2)", negative_prompt="[lowres:badhands:0.5]")
    assert used_embeddings(s, words) == {"style", "badhands"}
    assert used_embeddings(Settings(prompt="1girl, stylesheet"), words) == set()


def test_a_refiner_folder_takes_embeddings(tmp_path, folder):
    """A refiner folder has tokenizer_2 alone: its two tokenizers are two objects, each given the tokens once."""
    from models.sdxl import SDXL, TINY_REFINER

    torch.manual_seed(2)
    save_diffusers(SDXL(TINY_REFINER), tmp_path / "refiner")
    pipe = Pipeline.load(tmp_path / "refiner", embeddings=[folder / "embeddings" / "Style.safetensors"])
    assert pipe.tokenizers[0] is not pipe.tokenizers[1]
    assert [len(t) for t in pipe.tokenizers] == [49408 + 3] * 2
    s = Settings(prompt="a photo of embedding:style", width=64, height=64, cfg=1.0)
    (context, _), _ = pipe.conditioning(s)
    (plain, _), _ = pipe.conditioning(replace(s, prompt="a photo of"))
    assert (context - plain).abs().max() > 1e-2, "the embedding changed nothing"


def test_the_cli_records_ti_hashes_and_reloads_them(capsys, tmp_path, folder):
    args = ["--model", folder / "tiny", "--embeddings", folder / "embeddings", *QUICK]
    code, err = generate(capsys, *args, "--prompt", "1girl, embedding:Style", "--negative-prompt", "badhands, lowres",
                         "--out", tmp_path / "a")
    assert code == 0, err
    (first,) = (tmp_path / "a").iterdir()
    with Image.open(first) as png:
        parameters, pixels = png.info["parameters"], np.asarray(png)
    digest = hashlib.sha256((folder / "embeddings" / "Style.safetensors").read_bytes()).hexdigest()[:12]
    assert digest == embedding_hash(folder / "embeddings" / "Style.safetensors")
    assert f'TI hashes: "Style: {digest}, badhands: ' in parameters and "Embeddings: " in parameters, parameters
    code, err = generate(capsys, "--from-png", first, "--out", tmp_path / "b")
    assert code == 0, err
    (again,) = (tmp_path / "b").iterdir()
    with Image.open(again) as png:
        assert np.array_equal(np.asarray(png), pixels) and png.info["parameters"] == parameters
    code, err = generate(capsys, *args, "--prompt", "1girl, style", "--negative-prompt", "embedding:badhands, lowres",
                         "--out", tmp_path / "c")
    with Image.open(next((tmp_path / "c").iterdir())) as png:
        assert np.array_equal(np.asarray(png), pixels), "a bare name and embedding:name differ"
    code, err = generate(capsys, "--model", folder / "tiny", *QUICK, "--prompt", "1girl", "--out", tmp_path / "d")
    with Image.open(next((tmp_path / "d").iterdir())) as png:
        assert not np.array_equal(np.asarray(png), pixels) and "TI hashes" not in png.info["parameters"]


def test_prompt_2_reaches_bigg_alone_and_round_trips(capsys, tmp_path, folder):
    """diffusers' prompt_2: bigG reads it, CLIP-L reads prompt; images equal diffusers' on the same folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from test_pipeline_parity import assert_close_images

    reference = StableDiffusionXLPipeline.from_pretrained(folder / "tiny", add_watermarker=False).to(torch.float32)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    texts = dict(prompt="1girl, red hair", prompt_2="oil painting", negative_prompt="lowres",
                 negative_prompt_2="blurry, jpeg artifacts")
    s = Settings(**texts, width=64, height=48, steps=3, sampler="euler", seed=5)
    theirs = reference(**texts, width=64, height=48, num_inference_steps=3, guidance_scale=s.cfg,
                       generator=[torch.Generator().manual_seed(5)]).images
    pipe = Pipeline.load(folder / "tiny")
    assert_close_images(pipe(s, progress=False), [np.asarray(i) for i in theirs], "prompt_2 and negative_prompt_2")
    with torch.no_grad():  # precomputed embeddings from Python: diffusers' own, given to both
        embeds = reference.encode_prompt(texts["prompt"], prompt_2=texts["prompt_2"], negative_prompt="lowres")
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    given = Settings(prompt="", **dict(zip(names, embeds)), width=64, height=48, steps=3, sampler="euler", seed=5)
    theirs = reference(**dict(zip(names, embeds)), width=64, height=48, num_inference_steps=3,
                       generator=[torch.Generator().manual_seed(5)]).images
    assert_close_images(pipe(given, progress=False), [np.asarray(i) for i in theirs], "precomputed prompt_embeds")
    code, err = generate(capsys, "--model", folder / "tiny", *QUICK, "--prompt", "1girl", "--prompt-2", "oil painting",
                         "--negative-prompt-2", "blurry", "--negative-prompt", "x", "--out", tmp_path / "a")
    assert code == 0, err
    first = next((tmp_path / "a").iterdir())
    code, err = generate(capsys, "--from-png", first, "--out", tmp_path / "b")
    with Image.open(first) as a, Image.open(next((tmp_path / "b").iterdir())) as b:
        assert 'Prompt 2: oil painting, Negative prompt 2: blurry' in a.info["parameters"]
        assert a.info["parameters"] == b.info["parameters"] and np.array_equal(np.asarray(a), np.asarray(b))


def sd15_embedding(path):
    save_file({"emb_params": torch.randn(2, 768)}, str(path))
    return path


BAD = {  # case: (prompt, embedding file maker, fragments of the one line)
    "no such embedding": ("1girl, embedding:missing", None, ["'embedding:missing'", "no embedding named 'missing'"]),
    "SD 1.5 embedding": ("1girl", lambda d: sd15_embedding(d / "old.safetensors"), ["old.safetensors", "768 wide"]),
    "width of neither encoder": ("1girl", lambda d: embedding_file(d / "wide.safetensors", widths=(768, 1280)),
                                 ["wide.safetensors", "fits neither", "(3, 768)"]),
    "two of one name": ("1girl", lambda d: embedding_file(d / "Style.safetensors") and embedding_file(
        d / "style.safetensors") and d, ["two embeddings are named 'style'", "rename one"]),
    "pickled embedding": ("1girl", lambda d: (d / "old.pt").write_bytes(b"\x80\x02}q\x00.") and d / "old.pt",
                          ["old.pt", "pickle"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_embeddings_are_one_line_and_write_nothing(capsys, tmp_path, folder, case):
    prompt, make, fragments = BAD[case]
    extra = ["--embeddings", make(tmp_path)] if make else []
    code, err = generate(capsys, "--model", folder / "tiny", *QUICK, "--prompt", prompt, *extra, "--out", tmp_path / "out")
    one_line_error(err, code, *fragments)
    assert not (tmp_path / "out").exists()
