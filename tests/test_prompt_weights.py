"""AUTOMATIC1111's prompt weights (sampling.prompts): the parser against A1111's documented examples and
malformed input, BREAK chunks, the weighted context against a hand computation, and bit-identical images
for a prompt without weights."""

import re

import numpy as np
import pytest
import torch

from models.sdxl import SDXL, TINY
from models.tokenizer import load_tokenizers
from sampling.pipeline import Pipeline, Settings
from sampling.prompts import PromptError, encode_prompts, parse_weights, token_chunks

# modules/prompt_parser.py, parse_prompt_attention's docstring (its doctests), verbatim.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES)
def test_the_parser_reads_a1111s_documented_examples_as_a1111_does(prompt, expected):
    (chunk,) = parse_weights(prompt)
    assert [t for t, _ in chunk] == [t for t, _ in expected]
    assert [w for _, w in chunk] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize("prompt, expected", [
    ("((tag))", [[("tag", 1.1 * 1.1)]]),
    ("[tag]", [[("tag", 1 / 1.1)]]),
    ("(a (b:1.5) c)", [[("a ", 1.1), ("b", 1.5 * 1.1), (" c", 1.1)]]),
    ("(tag:1.0), x", [[("tag, x", 1.0)]]),  # weight 1 merges with its neighbours: the same text as without
    ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
    ("BREAK b", [[], [("b", 1.0)]]),  # an empty first chunk, as A1111's next_chunk makes
    ("a BREAK", [[("a", 1.0)]]),  # a trailing BREAK starts no empty chunk
    ("a \\\\ b", [[("a \\ b", 1.0)]]),  # an escaped backslash
    ("(artist:name), (text: hi:1.2)", [[("artist:name", 1.1), (", ", 1.0), ("text: hi", 1.2)]]),  # a colon is text
    ("(artist:40hara:0.8), (12:30 pm), (tag:1.2 x)", [[("artist:40hara", 0.8), (", ", 1.0),
                                                    ("12:30 pm", 1.1), (", ", 1.0), ("tag:1.2 x", 1.1)]]),
])
def test_nesting_escapes_and_break(prompt, expected):
    got = parse_weights(prompt)
    assert [[t for t, _ in c] for c in got] == [[t for t, _ in c] for c in expected]
    assert [[w for _, w in c] for c in got] == [pytest.approx([w for _, w in c]) for c in expected]


@pytest.mark.parametrize("prompt, message", [
    ("(tag:1.2", "the weight ':1.2' at character 5 is never closed by ')'"),  # A1111 reads "tag:1.2" x1.1
    ("(tag:1,2)", "the weight ':1,2' at character 5 is not a number"),
    ("(tag:1.2.3)", "the weight '1.2.3' at character 5 is not a number"),
    ("(tag:1.2, blue hair)", "the weight ':1.2' at character 5 is never closed by ')'"),
    ("(tag:" + "9" * 400 + ")", "is not a number"),  # float() gives inf
    ("(a [cat:dog:0.5] b:1.2)", "'[...:0.5]' at character 12 is AUTOMATIC1111's prompt editing"),
    ("tag:1.2)", "closes no '('"),
    ("[cat:dog:0.5]", "prompt editing, which reads only when the whole prompt does"),
])
def test_malformed_weights_are_one_clear_error(prompt, message):
    with pytest.raises(PromptError, match=re.escape(message)) as e:
        parse_weights(prompt)
    assert "\n" not in str(e.value) and "\\(" in str(e.value)  # the fix: escapes or --no-prompt-weights


def test_break_starts_a_new_75_token_chunk():
    tokenizer = load_tokenizers()[0]
    long = ", ".join(["red eyes"] * 30)  # 89 tokens: two chunks on its own
    chunks = token_chunks(tokenizer, f"{long} BREAK blue hair", weighted=True)
    assert len(chunks) == 3
    assert chunks[2][1:4].tolist() == tokenizer("blue hair", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(token_chunks(tokenizer, f"{long} BREAK blue hair")) == 2  # literally: BREAK is a word


def test_weighted_context_equals_a_hand_computation():
    torch.manual_seed(0)
    model, tokenizers = SDXL(TINY).eval(), load_tokenizers()
    with torch.no_grad():
        got, pooled = encode_prompts(model, tokenizers, ["a (cat:1.5) [dog]"], weighted=True)
        # By hand: "a cat dog" as one window (each word one token), the context of each encoder weighted
        # per position (BOS a cat dog EOS pads: 1, 1, 1.5, 1/1.1, 1, ...) and scaled back to its own mean.
        ids = [token_chunks(t, "a cat dog")[0][None] for t in tokenizers]
        assert [i[0, :5].tolist() for i in ids][0] == [tokenizers[0].bos_token_id,
                                                        *tokenizers[0]("a cat dog", add_special_tokens=False).input_ids,
                                                        tokenizers[0].eos_token_id]
        context, want_pooled = model.encode_text(*ids)  # (1, 77, 32 + 64)
    w = torch.ones(77)
    w[2], w[3] = 1.5, 1 / 1.1
    parts = []
    for part in context.split([TINY.text_encoder_1.width, TINY.text_encoder_2.width], dim=-1):
        weighted = part * w[None, :, None]
        parts.append(weighted * (part.mean() / weighted.mean()))
    torch.testing.assert_close(got, torch.cat(parts, dim=-1), rtol=0, atol=1e-6)
    assert torch.equal(pooled, want_pooled)  # the pooled vector is not weighted


def test_a_prompt_without_weights_gives_bit_identical_images(tiny_file):
    pipe = Pipeline.load(tiny_file)
    common = dict(negative_prompt="lowres", width=64, height=64, steps=3, seed=2)
    literal = np.asarray(pipe(Settings(prompt="1girl, red eyes", prompt_weights=False, **common), progress=False)[0])
    for prompt in ["1girl, red eyes", "(1girl:1.0), red eyes"]:
        image = np.asarray(pipe(Settings(prompt=prompt, **common), progress=False)[0])
        assert np.array_equal(image, literal), prompt
    weighted = np.asarray(pipe(Settings(prompt="(1girl:1.4), red eyes", **common), progress=False)[0])
    assert not np.array_equal(weighted, literal)
