"""Prompts -> SDXL conditioning, with long prompts split into 75-token chunks.

CLIP sees 77 positions: BOS, up to 75 tokens, EOS (then pads). Like AUTOMATIC1111 and ComfyUI, a
longer prompt is split into chunks of 75 tokens, each encoded as its own 77-token window, and the
windows' hidden states are concatenated along the sequence (77k positions of cross-attention
context). The pooled vector comes from the first chunk. A prompt of <= 75 tokens is one chunk,
which is exactly what diffusers computes; `truncate=True` gives diffusers' behaviour for longer ones.
"""

import torch

from models.tokenizer import MAX_LENGTH

CHUNK = MAX_LENGTH - 2  # 75 prompt tokens per window


def token_chunks(tokenizer, prompt, truncate=False):
    """One prompt -> list of (77,) id tensors: BOS + <= 75 tokens + EOS + the tokenizer's pad."""
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    if truncate:
        ids = ids[:CHUNK]
    pieces = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)] or [[]]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return [torch.tensor([bos, *p, eos] + [pad] * (CHUNK - len(p))) for p in pieces]


def encode_prompts(model, tokenizers, prompts, truncate=False, min_chunks=1):
    """Prompts (list of B strings) -> context (B, 77 * chunks, C), pooled (B, P).

    Every prompt of the batch is padded with empty chunks ("" encoded) up to the longest one, and to
    at least `min_chunks`, so that the conditional and unconditional batches can be stacked for CFG.
    """
    per_tokenizer = [[token_chunks(t, p, truncate) for p in prompts] for t in tokenizers]
    chunks = max(min_chunks, *(len(c) for rows in per_tokenizer for c in rows))
    empty = [token_chunks(t, "")[0] for t in tokenizers]
    contexts, pooled = [], None
    for k in range(chunks):
        ids = [torch.stack([c[k] if k < len(c) else e for c in rows]) for rows, e in zip(per_tokenizer, empty)]
        device = next(model.parameters()).device
        context, pool = model.encode_text(*(i.to(device) for i in ids))  # (B, 77, C), (B, P)
        contexts.append(context)
        pooled = pool if k == 0 else pooled  # the first window's pooled vector, as A1111 and ComfyUI do
    return torch.cat(contexts, dim=1), pooled


def num_chunks(tokenizers, prompt, truncate=False):
    return max(len(token_chunks(t, prompt, truncate)) for t in tokenizers)
