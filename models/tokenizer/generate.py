"""Write vocab.json and merges.txt for the CLIP BPE tokenizer from OpenAI's merge list.

The input is `bpe_simple_vocab_16e6.txt.gz`, the merge list OpenAI shipped with CLIP. Get it from the
open_clip wheel (a zip):
    pip download --no-deps -d /tmp/oc open_clip_torch
    unzip -j /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python models/tokenizer/generate.py /tmp/oc/bpe_simple_vocab_16e6.txt.gz
The vocabulary is built as in open_clip's `SimpleTokenizer.__init__` (open_clip/tokenizer.py), with the
special tokens spelled and the two files laid out as in the Hugging Face repo openai/clip-vit-large-patch14.
"""

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps only the first 48894 merges (written `49152-256-2` in its code), so that the vocab is
# 256 bytes + 256 word-final bytes + 48894 merges + 2 special tokens = 49408.
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode():
    """Map each of the 256 bytes to a printable unicode char (GPT-2's trick), in CLIP's order."""
    # Printable bytes keep their own char; the other 68 are shifted to chr(256 + n), in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main(gz_path, out_dir):
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    # Line 0 is a header, then one "left right" merge per line in priority order.
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges)

    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]  # ids 0..511: single bytes, mid-word then word-final
    vocab += ["".join(m) for m in merges]  # ids 512..49405: one token per merge, in merge order
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # ids 49406, 49407
    encoder = {token: i for i, token in enumerate(vocab)}
    assert len(encoder) == 49408, len(encoder)  # no token appears twice

    out_dir = Path(out_dir)
    # Same layout as the Hugging Face files: vocab.json is one line of JSON with raw (not \u-escaped) unicode,
    # merges.txt is a version header then one "left right" pair per line.
    (out_dir / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    print(f"wrote {len(encoder)} tokens and {len(merges)} merges to {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python models/tokenizer/generate.py path/to/bpe_simple_vocab_16e6.txt.gz")
    main(sys.argv[1], Path(__file__).parent)
