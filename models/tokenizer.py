"""SDXL's two CLIP BPE tokenizers, loaded offline from the files shipped in models/tokenizer/.

vocab.json and merges.txt are generated from OpenAI's merge list by models/tokenizer/generate.py in the layout of the
files in the Hugging Face repo openai/clip-vit-large-patch14. Both SDXL text encoders (CLIP ViT-L and OpenCLIP
ViT-bigG) use this same vocabulary; the tokenizers differ only in the padding token.
"""

import shutil
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"  # vocab.json + merges.txt, installed as package data
MAX_LENGTH = 77  # CLIP's context: BOS + up to 75 tokens + EOS


def load_tokenizers(folder=None):
    """Return (tokenizer_1, tokenizer_2) as in a diffusers SDXL repo's tokenizer/ and tokenizer_2/ folders: a model
    folder's own where it has them (a refiner's tokenizer_2 serves as both), else the bundled ones."""
    # Imported here, not at the top: transformers takes ~2 s to import, which a command that refuses its
    # input before anything loads should not pay. CLIPTokenizer is the class diffusers' SDXL pipeline uses.
    from transformers import CLIPTokenizer

    if folder is not None and (Path(folder) / "tokenizer_2").is_dir():
        first, second = Path(folder) / "tokenizer", Path(folder) / "tokenizer_2"
        # Two objects even for a refiner: a pipeline adds its embeddings' tokens to each tokenizer once.
        return CLIPTokenizer.from_pretrained(first if first.is_dir() else second), CLIPTokenizer.from_pretrained(second)

    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    # tokenizer_1 (CLIP ViT-L) pads with <|endoftext|> (id 49407).
    tokenizer_1 = CLIPTokenizer.from_pretrained(
        TOKENIZER_DIR, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>", **special
    )
    # tokenizer_2 (OpenCLIP bigG) pads with "!" (id 0), as open_clip pads with zeros. The pad ids reach the text
    # encoder, so this changes the embeddings. Quirk kept for parity with diffusers: once "!" is the pad token,
    # transformers treats it as a special token, so a "!" inside a prompt also becomes id 0 here, where open_clip
    # (the original) gives 256 ("!</w>") or merges it, e.g. "!!" -> 748 (diffusers issue #4153).
    tokenizer_2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=MAX_LENGTH, pad_token="!", **special)
    return tokenizer_1, tokenizer_2


def tokenize(tokenizer, prompts):
    """Token ids (B, 77): BOS, at most 75 prompt tokens, EOS, then the tokenizer's pad id."""
    if isinstance(prompts, str):
        prompts = [prompts]
    batch = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=MAX_LENGTH,
        truncation=True,  # long prompts lose their tail; EOS is still the last non-pad token
        return_tensors="pt",
    )
    return batch.input_ids.to(torch.long)  # (B, 77)


def save_tokenizers(tokenizer_1, tokenizer_2, folder):
    """Write folder/tokenizer/ and folder/tokenizer_2/ as a diffusers SDXL repo has them (the refiner: no tokenizer_1)."""
    for name, tokenizer in [("tokenizer", tokenizer_1), ("tokenizer_2", tokenizer_2)]:
        if tokenizer is None:
            continue
        out = Path(folder) / name
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out)  # tokenizer_config.json (holds the pad token) + tokenizer.json
        # The hub folders also carry the raw vocab.json and merges.txt; copy them (from the folder the tokenizer
        # was read from: the bundled one, or a model folder's own) so the folder loads with transformers versions
        # that read only those.
        for file in ["vocab.json", "merges.txt"]:  # (a folder transformers 5 wrote has tokenizer.json alone)
            if (Path(tokenizer.name_or_path) / file).exists():
                shutil.copyfile(Path(tokenizer.name_or_path) / file, out / file)
