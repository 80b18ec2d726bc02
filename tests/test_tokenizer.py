"""Fast tests for the offline CLIP tokenizers in models/tokenizer.py.

Reference ids come from outside this code: "a photo of a cat" is CLIP's well-known example, the others were
computed once with open_clip's own SimpleTokenizer (open_clip_torch 3.3.0, with ftfy) and pasted here.
"""

import json

import pytest
import torch
from transformers import CLIPTokenizer

from models.tokenizer import MAX_LENGTH, TOKENIZER_DIR, load_tokenizers, save_tokenizers, tokenize

BOS, EOS = 49406, 49407

# prompt -> ids from BOS to EOS (no padding), as open_clip's SimpleTokenizer gives them
REFERENCE_IDS = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, 2368, EOS],
    "An astronaut riding a green horse": [BOS, 550, 18376, 6765, 320, 1901, 4558, EOS],
    "A majestic lion jumping from a big stone at night": [
        BOS, 320, 15335, 5567, 11476, 633, 320, 1205, 2441, 536, 930, EOS
    ],
    # punctuation, digits split one per token, word-final merges
    "portrait of a woman, 85mm, f/1.8, highly detailed, 4k": [
        BOS, 5352, 539, 320, 2308, 267, 279, 276, 2848, 267, 325, 270, 272, 269, 279, 267, 5302, 12609, 267, 275, 330,
        EOS,
    ],
    "Hello   World": [BOS, 3306, 1002, EOS],  # lower-cased, runs of spaces collapsed
    "café naïve résumé": [BOS, 15304, 1097, 35689, 563, 29106, 7054, 4166, EOS],  # multi-byte UTF-8
    "日本の猫": [BOS, 39121, 44353, 21575, 163, 234, 360, EOS],  # falls back to single bytes for the last char
}


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizers()


def test_vocab_and_merges_files():
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))  # ids are dense, none repeated
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512  # bytes, word-final bytes, 1st merge
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 48894 and lines[1] == "i n"


def test_vocab_size(tokenizers):
    for tokenizer in tokenizers:
        assert len(tokenizer) == 49408
        assert tokenizer.model_max_length == MAX_LENGTH
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (BOS, EOS, EOS)


@pytest.mark.parametrize("prompt", list(REFERENCE_IDS))
def test_ids_match_reference(tokenizers, prompt):
    expected = REFERENCE_IDS[prompt]
    n = len(expected)
    ids_1, ids_2 = (tokenize(t, prompt)[0].tolist() for t in tokenizers)
    assert ids_1[:n] == expected
    assert ids_2[:n] == expected


def test_padding_differs_only_in_pad_id(tokenizers):
    tokenizer_1, tokenizer_2 = tokenizers
    prompts = list(REFERENCE_IDS)
    ids_1 = tokenize(tokenizer_1, prompts)
    ids_2 = tokenize(tokenizer_2, prompts)
    assert ids_1.shape == ids_2.shape == (len(prompts), MAX_LENGTH)
    assert ids_1.dtype == torch.long
    for prompt, row_1, row_2 in zip(prompts, ids_1, ids_2):
        n = len(REFERENCE_IDS[prompt])
        assert (row_1[:n] == row_2[:n]).all()
        assert (row_1[n:] == EOS).all()  # tokenizer_1 pads with <|endoftext|>
        assert (row_2[n:] == 0).all()  # tokenizer_2 pads with "!"


def test_exclamation_mark_quirk(tokenizers):
    # Pinned on purpose: with "!" as pad token, transformers (and so diffusers) turns a "!" inside the prompt into
    # id 0 in tokenizer_2, where open_clip gives [256, 2781, 748]. If this test fails, transformers changed it.
    tokenizer_1, tokenizer_2 = tokenizers
    assert tokenize(tokenizer_1, "hello! wow!!")[0, :6].tolist() == [BOS, 3306, 256, 2781, 748, EOS]
    assert tokenize(tokenizer_2, "hello! wow!!")[0, :7].tolist() == [BOS, 3306, 0, 2781, 0, 0, EOS]


def test_truncation_keeps_eos(tokenizers):
    long_prompt = " ".join(["cat"] * 100)  # 100 tokens of 2368
    for tokenizer in tokenizers:
        ids = tokenize(tokenizer, [long_prompt, "a cat"])
        assert ids.shape == (2, MAX_LENGTH)
        assert ids[0, 0] == BOS and ids[0, -1] == EOS
        assert (ids[0, 1:-1] == 2368).all()  # exactly 75 prompt tokens survive


def test_save_and_reload(tokenizers, tmp_path):
    save_tokenizers(*tokenizers, tmp_path)
    prompts = list(REFERENCE_IDS) + ["hello! wow!!"]
    for name, tokenizer, pad in [("tokenizer", tokenizers[0], "<|endoftext|>"), ("tokenizer_2", tokenizers[1], "!")]:
        folder = tmp_path / name
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        reloaded = CLIPTokenizer.from_pretrained(folder)
        assert reloaded.pad_token == pad
        assert reloaded.model_max_length == MAX_LENGTH
        assert torch.equal(tokenize(reloaded, prompts), tokenize(tokenizer, prompts))
