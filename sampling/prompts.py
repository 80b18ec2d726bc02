"""Prompts -> SDXL conditioning: 75-token chunks, AUTOMATIC1111's weights `(tag:1.2)` and `BREAK`.

CLIP sees 77 positions: BOS, up to 75 tokens, EOS (then pads). Like AUTOMATIC1111 and ComfyUI, a
longer prompt is split into chunks of 75 tokens, each encoded as its own 77-token window, and the
windows' hidden states are concatenated along the sequence (77k positions of cross-attention
context). The pooled vector comes from the first chunk. A prompt of <= 75 tokens is one chunk,
which is exactly what diffusers computes; `truncate=True` gives diffusers' behaviour for longer ones.
(AUTOMATIC1111 also moves a chunk's last tag to the next chunk when a comma is within 20 tokens of
the end; we split at 75 exactly, as ComfyUI does.)

Weights follow AUTOMATIC1111's prompt_parser.py and sd_hijack_clip.py: `(tag)` x1.1, `((tag))` x1.21,
`[tag]` / 1.1, `(tag:1.3)`, `\\(` and `\\)` literal, `BREAK` starts a new chunk. Each token's context
vector is multiplied by its weight, in each encoder's output separately, and the chunk is then rescaled
so its mean equals the unweighted mean (A1111's "Original" emphasis). The pooled vector is not weighted:
it is bigG's pooled output of the first chunk, whose tokens are the prompt with the syntax removed.
Malformed input reads as A1111 reads it (an unclosed bracket weights the rest of the prompt, a stray
closing one and a colon in brackets, `(artist:name)`, are text), except where A1111 would silently read
a broken weight as text: `(tag:1.2`, `(tag:1,2)`, `(tag:1.2.3)`, `tag:1.2)` are errors. Prompt editing
(`[a:b:0.5]`, `[a|b]`) is resolved before this (sampling/prompt_editing.py): each step's text is weighted here.
"""

import math
import re

import torch

from models.tokenizer import MAX_LENGTH

CHUNK = MAX_LENGTH - 2  # 75 prompt tokens per window
# A1111's tokens: escapes, brackets, a weight ":1.3)" (closing its bracket), plain text, a lone ":".
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# After a colon in brackets: a number alone before ')', ']', ',' or the end, i.e. a weight gone wrong
# ("(tag:1,2)", "(tag:1.2, x", "[a:b:0.5]"); "(artist:40hara)" and "(12:30 pm)" stay text, as in A1111.
_NUMBER_LIKE = re.compile(r"\s*[+-]?[.\d][.,\d]*\s*(?=[)\],]|$)")


class PromptError(ValueError):
    """A prompt whose weight syntax cannot be read; the message says where and how to fix it."""


def parse_weights(prompt):
    """A prompt -> its chunks-to-be, each a list of (text, weight), split at BREAK. A1111's own example:
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))." -> [[("a ", 1.0), ("house", 1.573), (" ", 1.1),
    ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]]."""
    pieces = []  # [text, weight] in order; None marks a BREAK
    round_open, square_open = [], []  # where each open bracket's range starts in `pieces`
    kinds = []  # the open brackets' kinds, innermost last
    fix = "; write \\( \\) \\[ \\] for literal brackets, or use --no-prompt-weights"

    def multiply(start, factor):
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    def close(kind):  # the innermost open bracket of this kind is closed
        del kinds[len(kinds) - 1 - kinds[::-1].index(kind)]

    for m in _TOKENS.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])  # an escape (a lone backslash is dropped, as A1111 drops it)
        elif text in "([":
            (round_open if text == "(" else square_open).append(len(pieces))
            kinds.append(text)
        elif weight is not None:
            if not round_open:
                raise PromptError(f"the weight {text!r} at character {m.start() + 1} closes no '('" + fix)
            try:
                factor = float(weight)
            except ValueError:
                factor = math.nan
            if not math.isfinite(factor):
                raise PromptError(f"the weight {weight[:20]!r} at character {m.start() + 1} is not a number" + fix)
            multiply(round_open.pop(), factor)
            close("(")
        elif (text == ")" and round_open) or (text == "]" and square_open):
            multiply((round_open if text == ")" else square_open).pop(), 1.1 if text == ")" else 1 / 1.1)
            close("(" if text == ")" else "[")
        elif text == ":" and kinds and _NUMBER_LIKE.match(prompt, m.end()):
            # A colon in brackets is text to A1111 ("(artist:name)"), but one followed by a lone number is a
            # weight gone wrong or prompt editing ("[a:b:0.5]"): say so rather than read it as text.
            rest = _NUMBER_LIKE.match(prompt, m.end())[0]
            if kinds[-1] == "[":
                raise PromptError(f"'[...:{rest.strip()}]' at character {m.start() + 1} is AUTOMATIC1111's prompt "
                                  "editing, which reads only when the whole prompt does (a stray '|', or a bracket "
                                  "left open around it, stops it)" + fix)
            closed = prompt[m.end() + len(rest):].startswith(")")
            raise PromptError(f"the weight ':{rest.strip()}' at character {m.start() + 1} "
                              + ("is not a number" if closed else "is never closed by ')'") + fix)
        else:
            for i, part in enumerate(_BREAK.split(text)):
                if i > 0:
                    pieces.append(None)
                pieces.append([part, 1.0])
    for start in round_open:  # an unclosed bracket weights the rest of the prompt (A1111's documented reading)
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)

    chunks, current = [], []
    for piece in pieces + [None]:
        if piece is None:
            chunks.append(current)
            current = []
        elif piece[0]:
            if current and current[-1][1] == piece[1]:  # merge runs of equal weight, as A1111 does
                current[-1] = (current[-1][0] + piece[0], piece[1])
            else:
                current.append((piece[0], piece[1]))
    if len(chunks) > 1 and not chunks[-1]:
        chunks.pop()  # a trailing BREAK starts no empty chunk (A1111)
    return chunks


# ComfyUI's `embedding:name` (a file extension allowed), or a loaded embedding's bare name (AUTOMATIC1111's).
_EMBEDDING = re.compile(r"(?<![\w-])embedding:([\w.-]+?)(?:\.safetensors|\.pt|\.bin)?(?![\w.-])", re.IGNORECASE)


def with_embeddings(text, words):
    """text with each `embedding:name` and each bare loaded name replaced by the embedding's tokens (words: {lowercased
    name: "tok tok ..."}, from models.embeddings.load_embeddings). PromptError for an `embedding:name` not loaded."""
    def named(m):
        if m[1].lower() not in words:
            raise PromptError(f"{m[0]!r}: no embedding named {m[1]!r} is loaded; pass --embeddings FILE_OR_FOLDER "
                              + (f"(loaded: {', '.join(sorted(words))})" if words else "with it"))
        return f" {words[m[1].lower()]} "
    text = _EMBEDDING.sub(named, text)
    if words:  # a bare name counts only when an embedding of that name is loaded, as in A1111
        # (not inside the tokens written above, `<name:0>`; a colon after it is a weight, `(name:1.2)`, or text)
        bare = re.compile(r"(?<![\w<-])(" + "|".join(map(re.escape, words)) + r")(?![\w>-])", re.IGNORECASE)
        text = bare.sub(lambda m: f" {words[m[1].lower()]} ", text)
    return text


def used_embeddings(s, words):
    """The lowercased names of the loaded embeddings that the settings' prompts write."""
    written = " ".join(with_embeddings(text, words) for text in (s.prompt, s.negative_prompt, s.prompt_2,
                                                                   s.negative_prompt_2) if text)
    return {name for name, tokens in words.items() if tokens.split()[0] in written}


def weighted_chunks(tokenizer, prompt, truncate=False, weighted=False, embeddings=None):
    """One prompt -> list of (ids (77,), weights (77,)): BOS + <= 75 tokens + EOS + the tokenizer's pad,
    and each position's weight (1 for BOS, EOS and pads). weighted=False reads the prompt literally;
    embeddings ({name: tokens}, see with_embeddings) are written in each piece after the weights are read."""
    chunks = []
    for segment in parse_weights(prompt) if weighted else [[(prompt, 1.0)]]:
        ids, weights = [], []
        for text, weight in segment:
            text = with_embeddings(text, embeddings or {})
            tokens = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
            ids += tokens
            weights += [weight] * len(tokens)
        cuts = window_starts(tokenizer, ids) + [len(ids)]
        chunks += [(ids[a:b], weights[a:b]) for a, b in zip(cuts, cuts[1:])] or [([], [])]
    if truncate:
        chunks = chunks[:1]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return [(torch.tensor([bos, *ids, eos] + [pad] * (CHUNK - len(ids))),
             torch.tensor([1.0, *weights, 1.0] + [1.0] * (CHUNK - len(ids)))) for ids, weights in chunks]


def window_starts(tokenizer, ids):
    """Where each 75-token window of ids starts. An embedding's tokens stay in one window: one that would
    cross the end starts the next window, as in AUTOMATIC1111 (its first token is `<name:0>`)."""
    run_start = []  # for each position, where its embedding's tokens start (itself for a vocabulary token)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
        inside = i > 0 and ids[i] >= tokenizer.vocab_size and not token.endswith(":0>")
        run_start.append(run_start[-1] if inside else i)
    starts = [0]
    while starts[-1] + CHUNK < len(ids):
        end = starts[-1] + CHUNK
        starts.append(run_start[end] if run_start[end] > starts[-1] else end)
    return starts


def token_chunks(tokenizer, prompt, truncate=False, weighted=False):
    """One prompt -> list of (77,) id tensors (weighted_chunks without the weights)."""
    return [ids for ids, _ in weighted_chunks(tokenizer, prompt, truncate, weighted)]


def apply_weights(context, weights):
    """context (B, 77, C) of one encoder, weights (77,) -> weighted context with the unweighted mean
    (A1111's EmphasisOriginal). All weights 1 returns context itself, bit for bit."""
    if bool((weights == 1).all()):
        return context
    weighted = context * weights.to(context)[None, :, None]
    return weighted * (context.mean() / weighted.mean())


def encode_prompts(model, tokenizers, prompts, truncate=False, min_chunks=1, weighted=False, embeddings=None,
                   prompts_2=None, clip_skip=0):
    """Prompts (list of B strings) -> context (B, 77 * chunks, C), pooled (B, P). prompts_2, if given, is what
    the second tokenizer (bigG's) reads instead (diffusers' prompt_2); embeddings: see weighted_chunks;
    clip_skip: diffusers' (models.conditioning.encode_text).

    Every prompt of the batch is padded with empty chunks ("" encoded) up to the longest one, and to
    at least `min_chunks`, so that the conditional and unconditional batches can be stacked for CFG.
    """
    texts = [prompts, prompts if prompts_2 is None else prompts_2]
    per_tokenizer = [[weighted_chunks(t, p, truncate, weighted, embeddings) for p in rows] for t, rows in zip(tokenizers, texts)]
    chunks = max(min_chunks, *(len(c) for rows in per_tokenizer for c in rows))
    empty = [weighted_chunks(t, "")[0] for t in tokenizers]
    # Each encoder's share of the context's channels and its tokenizer: [CLIP-L | bigG], or bigG alone.
    encoders = [(te.width, i) for i, te in enumerate((model.config.text_encoder_1, model.config.text_encoder_2))
                if te is not None]
    device = next(model.text_encoder_2.parameters()).device  # (with offload, the UNet may be elsewhere)
    contexts, pooled = [], None
    for k in range(chunks):
        picked = [[c[k] if k < len(c) else e for c in rows] for rows, e in zip(per_tokenizer, empty)]
        ids = [torch.stack([i for i, _ in rows]).to(device) for rows in picked]  # per tokenizer (B, 77)
        context, pool = model.encode_text(*ids, clip_skip)  # (B, 77, C), (B, P)
        if weighted:  # per encoder and per prompt, as A1111 weights each embedder's output on its own
            parts = context.split([width for width, _ in encoders], dim=-1)
            context = torch.cat([torch.cat([apply_weights(part[b:b + 1], picked[i][b][1]) for b in range(len(prompts))])
                                 for part, (_, i) in zip(parts, encoders)], dim=-1)
        contexts.append(context)
        pooled = pool if k == 0 else pooled  # the first window's pooled vector, as A1111 and ComfyUI do
    return torch.cat(contexts, dim=1), pooled


def num_chunks(tokenizers, prompt, truncate=False, weighted=False, embeddings=None):
    return max(len(weighted_chunks(t, prompt, truncate, weighted, embeddings)) for t in tokenizers)
