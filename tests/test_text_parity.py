"""Text encoders against transformers on the same random weights, plus key/shape parity with the official file.

transformers is the oracle only: it is imported here, never in models/. Weights travel through the layout a
diffusers folder has on disk (save_pretrained -> model.safetensors, `text_model.*` keys), because that is
what our loaders read.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.keys import openclip_from_hf, openclip_to_hf
from models.text import CLIP_L, OPENCLIP_BIGG, TINY_CLIP_L, TINY_OPENCLIP_BIGG, CLIPTextEncoder, OpenCLIPTextEncoder

BOS, EOS = 49406, 49407
TOL = 1e-5
# Key manifests generated from the official modules (name -> shape), copied from shared/sdxl-keys.
MANIFEST_DIRS = [Path(__file__).parent / "sdxl-keys"]


def prompt_tokens(pad, seed=0):
    """(3, 77) ids as the tokenizers produce them: BOS, words, EOS, pads. Empty, short and full prompts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (0, 7, 75):  # 75 words + BOS + EOS fill all 77 positions: no pads
        words = torch.randint(256, BOS, (n,), generator=g)  # never BOS or EOS
        rows.append(torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS]), torch.full((75 - n,), pad)]))
    return torch.stack(rows)


def hf_model(cfg, tmp_path):
    """transformers' CLIP text model for cfg with random parameters, and its state dict in diffusers-folder layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length, hidden_size=cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_dim,
        hidden_act=cfg.act, layer_norm_eps=cfg.eps, projection_dim=cfg.projection_dim or 512,
        eos_token_id=2,  # SDXL's legacy config value: transformers then pools at input_ids.argmax(-1)
        attn_implementation="eager",  # plain matmul-softmax attention, independent of our SDPA path
    )
    torch.manual_seed(0)
    model = (CLIPTextModel if cfg.projection_dim is None else CLIPTextModelWithProjection)(config).eval()
    with torch.no_grad():  # transformers inits LayerNorms to (1, 0) and biases to 0; perturb all of them
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    # Hub diffusers folders (saved by transformers 4.x) have text_model.* keys in both text encoders, and
    # CLIPTextModelWithProjection still writes them. transformers 5 flattens CLIPTextModel and writes its
    # keys without the prefix (it re-adds it on load); put it back to get the layout real folders have.
    return model, {k if k.startswith("text_model.") or k == "text_projection.weight" else f"text_model.{k}": v
                   for k, v in sd.items()}


def run_recording(model, blocks, tokens):
    """model(tokens), plus the first block's input and every block output that ran (hidden_states order)."""
    seen = []
    handles = [blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
    handles += [b.register_forward_hook(lambda m, args, out: seen.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            out = model(tokens)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_layers_match(name, ours, theirs):
    """Walk hidden states from the embeddings up and report the first one that diverges."""
    assert len(ours) <= len(theirs), f"{name}: we produced {len(ours)} hidden states, transformers {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        where = "the embeddings (token + position)" if i == 0 else f"the output of layer {i - 1}"
        err = max_diff(a, b)
        assert err <= TOL, f"{name}: first divergence at {where}: max abs diff {err:.2e} > {TOL}"


def test_clip_l_matches_transformers(tmp_path):
    hf, sd = hf_model(TINY_CLIP_L, tmp_path)
    with torch.device("meta"):  # built and loaded the way the loaders do it: no allocation, then assign
        ours = CLIPTextEncoder(TINY_CLIP_L)
    # Older transformers saved the position_ids buffer; the official file has it too. Loaders drop it.
    ours.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=True, assign=True)

    tokens = prompt_tokens(pad=EOS)  # CLIP-L's tokenizer pads with <|endoftext|>
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True).hidden_states
    assert len(ref) == TINY_CLIP_L.layers + 1, "transformers' hidden_states should be embeddings + one per layer"
    out, seen = run_recording(ours, ours.text_model.encoder.layers, tokens)
    assert len(seen) == TINY_CLIP_L.layers, "the last CLIP-L layer should not run"
    assert_layers_match("CLIP-L", seen, ref)
    assert out.shape == (3, 77, TINY_CLIP_L.width)
    err = max_diff(out, ref[-2])
    assert err <= TOL, f"CLIP-L hidden_states[-2]: max abs diff {err:.2e} > {TOL}"


def test_openclip_bigg_matches_transformers(tmp_path):
    hf, sd = hf_model(TINY_OPENCLIP_BIGG, tmp_path)
    with torch.device("meta"):
        ours = OpenCLIPTextEncoder(TINY_OPENCLIP_BIGG)
    ours.load_state_dict(openclip_from_hf(sd, list(ours.state_dict())), strict=True, assign=True)

    tokens = prompt_tokens(pad=0)  # bigG's tokenizer pads with "!" = 0, like open_clip.tokenize
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
    assert len(ref.hidden_states) == TINY_OPENCLIP_BIGG.layers + 1
    (penultimate, pooled), seen = run_recording(ours, ours.transformer.resblocks, tokens)
    assert_layers_match("OpenCLIP bigG", seen, ref.hidden_states)
    err = max_diff(penultimate, ref.hidden_states[-2])
    assert err <= TOL, f"bigG hidden_states[-2]: max abs diff {err:.2e} > {TOL}"
    assert pooled.shape == (3, TINY_OPENCLIP_BIGG.projection_dim)
    err = max_diff(pooled, ref.text_embeds)
    assert err <= TOL, f"bigG pooled text_embeds (ln_final -> EOS -> text_projection): max abs diff {err:.2e} > {TOL}"


def test_openclip_conversion_round_trip(tmp_path):
    _, sd = hf_model(TINY_OPENCLIP_BIGG, tmp_path)
    names = list(OpenCLIPTextEncoder(TINY_OPENCLIP_BIGG).state_dict())
    official = openclip_from_hf(sd, names)
    back = openclip_to_hf(official)
    assert back.keys() == sd.keys(), f"keys lost or invented: {sorted(back.keys() ^ sd.keys())}"
    for k in sd:
        assert torch.equal(back[k], sd[k]), f"{k} changed on the round trip diffusers -> official -> diffusers"
    # The other way, starting from an official state dict that still carries logit_scale (dropped).
    again = openclip_from_hf(openclip_to_hf({**official, "logit_scale": torch.tensor(4.6)}), names)
    for k in official:
        assert torch.equal(again[k], official[k]), f"{k} changed on the round trip official -> diffusers -> official"


@pytest.mark.parametrize("cls, cfg, manifest, prefix, dropped, params", [
    (CLIPTextEncoder, CLIP_L, "text_encoder_l.json", "conditioner.embedders.0.transformer.",
     "text_model.embeddings.position_ids", 123_060_480),
    (OpenCLIPTextEncoder, OPENCLIP_BIGG, "text_encoder_g.json", "conditioner.embedders.1.model.",
     "logit_scale", 694_659_840),
])
def test_full_size_matches_official_keys(cls, cfg, manifest, prefix, dropped, params):
    path = next((d / manifest for d in MANIFEST_DIRS if (d / manifest).exists()), None)
    assert path is not None, f"{manifest} not found in {[str(d) for d in MANIFEST_DIRS]}; copy sdxl-keys/ there."
    manifest = json.loads(path.read_text())
    assert all(k.startswith(prefix) for k in manifest), f"{path} has keys without the prefix {prefix}"
    expected = {k.removeprefix(prefix): tuple(v) for k, v in manifest.items()}
    del expected[dropped]  # in the official file, not in our module (loaders drop it)

    with torch.device("meta"):
        model = cls(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert not ours.keys() - expected.keys(), f"not in the official file: {sorted(ours.keys() - expected.keys())[:5]}"
    assert not expected.keys() - ours.keys(), f"missing from our module: {sorted(expected.keys() - ours.keys())[:5]}"
    wrong = {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]}
    assert not wrong, f"shape mismatches (ours, official): {wrong}"
    assert len(list(model.buffers())) == 0, "no buffers: positions are an arange in forward"
    count = sum(p.numel() for p in model.parameters())
    assert count == params, f"{cls.__name__}: {count:,} parameters, spec section 1 says {params:,}"


def test_last_clip_layer_gets_no_gradient():
    """The DDP-relevant fact documented in CLIPTextEncoder.forward: the skipped layer has no gradient."""
    torch.manual_seed(0)
    model = CLIPTextEncoder(TINY_CLIP_L)
    model(prompt_tokens(pad=EOS)).square().mean().backward()
    last, final_ln = model.text_model.encoder.layers[-1], model.text_model.final_layer_norm
    skipped = [*last.parameters(), *final_ln.parameters()]
    assert all(p.grad is None for p in skipped), "the skipped last layer / final LN got a gradient"
    assert all(p.grad is not None for p in model.text_model.encoder.layers[0].parameters()), "layer 0 got no gradient"


@pytest.mark.parametrize("cls, cfg", [(CLIPTextEncoder, TINY_CLIP_L), (OpenCLIPTextEncoder, TINY_OPENCLIP_BIGG)])
def test_bfloat16_forward(cls, cfg):
    """Half precision runs end to end, keeps its dtype and stays near the float32 result."""
    torch.manual_seed(0)
    model = cls(cfg)
    tokens = prompt_tokens(pad=0)
    with torch.no_grad():
        ref, out = model(tokens), model.to(torch.bfloat16)(tokens)
    ref, out = (x if isinstance(x, tuple) else (x,) for x in (ref, out))  # CLIP-L returns one tensor, bigG two
    for r, o in zip(ref, out):
        assert o.dtype == torch.bfloat16
        err = max_diff(o.float(), r)
        assert err <= 0.05 * r.abs().max().item(), f"bfloat16 drifted from float32 by {err:.3g}"
