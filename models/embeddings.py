"""Textual inversion (Gal et al. 2022, https://arxiv.org/abs/2208.01618): learned token vectors loaded beside
the vocabulary and written into prompts by name.

An SDXL embedding is one safetensors file holding `clip_l` (n, 768) and `clip_g` (n, 1280): n vectors for each
encoder (Civitai's files, kohya's sdxl_train_textual_inversion). Loading one, as diffusers' load_textual_inversion
does: n new tokens go into both tokenizers (ids after the vocabulary, 49408, 49409, ...) and the vectors become
the new rows of each encoder's token-embedding table, so the prompt's text reaches them as ordinary tokens.
The prompt names them `embedding:name` (ComfyUI) or just `name` (AUTOMATIC1111), the file's stem being the
name (sampling/prompts.py rewrites either into the new tokens).
"""

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.files import LoadError, open_safetensors, read_tensors

SDXL_KEYS = ("clip_l", "clip_g")  # the two encoders' vectors, in the order of the model's text encoders
SD1_KEYS = ("emb_params", "string_to_param.*")  # SD 1.x/2.x files: one encoder's vectors


@dataclass
class Embedding:
    name: str  # the file's stem: what a prompt writes
    path: Path
    vectors: dict  # {"clip_l": (n, 768), "clip_g": (n, 1280)} float32 (a refiner's file may lack clip_l)

    @property
    def count(self):
        return self.vectors["clip_g"].shape[0]


def embedding_files(path):
    """--embeddings PATH -> the embedding files: the file itself, or a folder's *.safetensors (sub-folders too,
    as AUTOMATIC1111 scans them). A folder's pickled .pt/.bin files are named in one warning and left out."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"--embeddings {path}: no such file or folder")
    if path.is_file():
        return [path]
    pickled = sorted(p for p in path.rglob("*") if p.suffix in (".pt", ".bin", ".ckpt"))
    if pickled:
        print(f"warning: {path}: {len(pickled)} pickled embeddings left out (plainxl never unpickles a file), "
              f"e.g. {pickled[0].name}; convert them to safetensors", file=sys.stderr)
    return sorted(path.rglob("*.safetensors"))


def read_embedding(path, widths):
    """An embedding file -> Embedding. widths: {"clip_l": 768 or None (a refiner), "clip_g": 1280}, the model's
    encoder widths. LoadError (one sentence) for a file that is not an SDXL embedding or does not fit."""
    with open_safetensors(path) as f:  # refuses pickles and damaged headers in one line
        names = list(f.keys())
    tensors = dict(read_tensors(path, names, torch.float32))
    if not set(SDXL_KEYS) <= set(tensors):
        single = next(iter(tensors.values()), None)
        if single is not None and single.ndim == 2 and len(tensors) == 1:
            raise LoadError(f"{path} holds one encoder's vectors ({single.shape[1]} wide, an SD 1.x/2.x embedding); "
                            "an SDXL embedding holds clip_l (n, 768) and clip_g (n, 1280)")
        raise LoadError(f"{path} is not an SDXL embedding: it has {', '.join(names[:3]) or 'no tensors'}, where one "
                        "holds clip_l (n, 768) and clip_g (n, 1280)")
    vectors = {key: tensors[key] for key in SDXL_KEYS if widths[key] is not None}
    for key, vector in vectors.items():
        if vector.ndim != 2 or vector.shape[1] != widths[key] or vector.shape[0] != tensors["clip_g"].shape[0]:
            raise LoadError(f"{path}: its {key} is {tuple(vector.shape)}, which fits neither of this model's text "
                            f"encoders ({widths['clip_l']} and {widths['clip_g']} wide)" if widths["clip_l"] else
                            f"{path}: its {key} is {tuple(vector.shape)}; this model's encoder is {widths[key]} wide")
        if not torch.isfinite(vector).all():
            raise LoadError(f"{path}: its {key} holds NaN or infinite numbers; the file is damaged")
    return Embedding(path.stem, Path(path), vectors)


def embedding_hash(path):
    """AUTOMATIC1111's `TI hashes` value: sha256 of the whole file, its first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def encoder_widths(config):
    return {"clip_l": config.text_encoder_1.width if config.text_encoder_1 else None, "clip_g": config.text_encoder_2.width}


def read_embeddings(paths, widths):
    """Each file read (read_embedding) -> {lowercased name: Embedding}; LoadError for two of one name, in any case
    (a prompt's names are matched in any case)."""
    embeddings = {}
    for path in paths:
        embedding = read_embedding(path, widths)
        twin = embeddings.setdefault(embedding.name.lower(), embedding)
        if twin is not embedding:
            raise LoadError(f"two embeddings are named {embedding.name!r} ({twin.path} and {path}); rename one")
    return embeddings


def load_embeddings(model, tokenizers, paths):
    """Read each file and add it to the model and its tokenizers -> {lowercased name: Embedding}, and the tokens
    each name becomes, {lowercased name: "tok tok ..."} (what sampling.prompts writes in its place)."""
    embeddings = read_embeddings(paths, encoder_widths(model.config))
    return embeddings, add_tokens(model, tokenizers, embeddings.values())


def add_tokens(model, tokenizers, embeddings):
    """Each embedding's n vectors as n new tokens `<name:i>`: ids after each tokenizer's vocabulary, rows after
    each encoder's token-embedding table (both grow by n)."""
    tables = [model.text_encoder_1.text_model.embeddings.token_embedding if model.text_encoder_1 else None,
              model.text_encoder_2.token_embedding]
    words = {}
    for embedding in embeddings:
        tokens = [f"<{embedding.name.lower()}:{i}>" for i in range(embedding.count)]
        for tokenizer, table, key in zip(tokenizers, tables, SDXL_KEYS):
            # (a refiner's first tokenizer has no encoder: it gets the tokens only, so both tokenize alike)
            if table is not None and len(tokenizer) != table.num_embeddings:
                raise LoadError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder {table.num_embeddings}"
                                "; they are not a pair")
            tokenizer.add_tokens(tokens)
            if table is not None:
                rows = embedding.vectors[key].to(table.weight)
                table.weight = torch.nn.Parameter(torch.cat([table.weight.detach(), rows]), requires_grad=False)
                table.num_embeddings = table.weight.shape[0]
        words[embedding.name.lower()] = " ".join(tokens)
    return words
