"""LoRA files merged at load (models.lora) against diffusers' load_lora_weights (peft) on a small random
model: a kohya file (official names, LoCon convs, bigG's fused q/k/v, alpha != rank) at scale 0.8, a
PEFT file at 1.0, and both at once (0.7 and -0.5); bad files are one clear LoadError."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_pipeline_parity import assert_close_images, diffusers_images, tiny_model

from models.keys import unet_name_to_diffusers
from models.loading import LoadError, load, save_single_file
from models.lora import merge_lora
from models.sdxl import TINY
from sampling.pipeline import Pipeline, Settings

RANK = 4
UNET_MODULES = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
                "input_blocks.4.1.proj_in", "middle_block.1.transformer_blocks.0.ff.net.0.proj",
                "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0", "input_blocks.1.0.in_layers.2",  # a 3x3 conv
                "output_blocks.2.2.conv"]  # an upsampler conv


def lora_pair(rng, out_features, in_features, kernel=1):
    down = torch.randn(RANK, in_features, kernel, kernel, generator=rng) * 0.3
    up = torch.randn(out_features, RANK, 1, 1, generator=rng) * 0.3
    return (down.flatten(1), up.flatten(1)) if kernel == 1 else (down, up)


def kohya_file(model, path, seed=0, text_attention=False):
    """Official-name kohya LoRA over UNet (linear and conv) and text-encoder MLP modules; with text_attention,
    CLIP-L's q and bigG's q and v too (bigG's fused in_proj). diffusers 0.42.1 with transformers 5.24 drops
    text-encoder attention LoRAs (its load report lists them as unexpected), so those are checked by hand."""
    rng, tensors = torch.Generator().manual_seed(seed), {}
    modules = dict(model.unet.named_modules())
    for name in UNET_MODULES:
        w = modules[name].weight
        down, up = lora_pair(rng, w.shape[0], w.shape[1], w.shape[2] if w.ndim == 4 else 1)
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    width1, width2 = TINY.text_encoder_1.width, TINY.text_encoder_2.width
    text = {"lora_te1_text_model_encoder_layers_1_mlp_fc1": (TINY.text_encoder_1.mlp_dim, width1),
            "lora_te2_text_model_encoder_layers_1_mlp_fc2": (width2, TINY.text_encoder_2.mlp_dim)}
    if text_attention:
        text |= {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (width1, width1),
                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (width2, width2),
                 "lora_te2_text_model_encoder_layers_2_self_attn_v_proj": (width2, width2)}
    for key, (o, i) in text.items():
        down, up = lora_pair(rng, o, i)
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}  # no alpha: alpha = rank
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def peft_file(model, path, seed=1):
    """diffusers/PEFT LoRA: unet.<diffusers path>.lora_A/lora_B, over two attention projections."""
    rng, tensors = torch.Generator().manual_seed(seed), {}
    modules = dict(model.unet.named_modules())
    for name in UNET_MODULES[:2] + UNET_MODULES[4:5]:
        w = modules[name].weight
        down, up = lora_pair(rng, w.shape[0], w.shape[1])
        path_d = unet_name_to_diffusers(name + ".weight", TINY.unet.num_res_blocks)[:-len(".weight")]
        tensors |= {f"unet.{path_d}.lora_A.weight": down, f"unet.{path_d}.lora_B.weight": up}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def peft_dora_file(model, path, seed=2):
    """A PEFT DoRA file (LoraConfig(use_dora=True), as diffusers saves it): lora_A/lora_B plus each module's
    lora_magnitude_vector (out,), set off |W + B A| so the decomposition does something."""
    rng, tensors = torch.Generator().manual_seed(seed), {}
    modules = dict(model.unet.named_modules())
    for name in UNET_MODULES[:2] + UNET_MODULES[3:5]:
        w = modules[name].weight.detach()
        down, up = lora_pair(rng, w.shape[0], w.shape[1])
        path_d = unet_name_to_diffusers(name + ".weight", TINY.unet.num_res_blocks)[:-len(".weight")]
        magnitude = (w + up @ down).norm(dim=1) * (1 + 0.3 * torch.rand(w.shape[0], generator=rng))
        tensors |= {f"unet.{path_d}.lora_A.weight": down, f"unet.{path_d}.lora_B.weight": up,
                    f"unet.{path_d}.lora_magnitude_vector": magnitude}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from models.diffusers_layout import save_diffusers

    root = tmp_path_factory.mktemp("lora")
    model = tiny_model()
    save_single_file(model, root / "tiny.safetensors")
    save_diffusers(model, root / "tiny")
    kohya_file(model, root / "kohya.safetensors")
    kohya_file(model, root / "kohya_attention.safetensors", text_attention=True)
    peft_file(model, root / "peft.safetensors")
    peft_dora_file(model, root / "dora.safetensors")
    return root


def diffusers_with(files, loras):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False).to(torch.float32)
    pipe.scheduler_config_as_saved = dict(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (name, _) in enumerate(loras):
        pipe.load_lora_weights(str(files / name), adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return pipe


@pytest.mark.parametrize("loras", [[("kohya.safetensors", 0.8)], [("peft.safetensors", 1.0)],
                                   [("kohya.safetensors", 0.7), ("peft.safetensors", -0.5)]],
                         ids=["kohya 0.8", "peft 1.0", "both 0.7 -0.5"])
@pytest.mark.slow
def test_merged_loras_equal_diffusers(files, loras):
    s = Settings(prompt="1girl, red eyes", negative_prompt="lowres", width=64, height=64, steps=8, sampler="euler",
                 seed=2, num_images=2)
    ours = Pipeline.load(files / "tiny.safetensors", loras=[(files / n, w) for n, w in loras])
    plain = Pipeline.load(files / "tiny.safetensors")
    theirs = diffusers_images(diffusers_with(files, loras), s)
    got = ours(s, progress=False)
    assert_close_images(got, theirs, f"LoRA {loras}")
    assert not np.array_equal(np.asarray(got[0]), np.asarray(plain(s, progress=False)[0]))  # the LoRA did something


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_a_peft_dora_file_equals_diffusers(files, scale):
    """PEFT's DoRA (diffusers' load_lora_weights runs it through peft's DoraLinearLayer): W' = g (W + m s B A) /
    |W + m s B A| per output row, m the adapter weight."""
    from peft.tuners.lora import LoraLayer

    s = Settings(prompt="1girl, red eyes", negative_prompt="lowres", width=64, height=64, steps=8, sampler="euler",
                 seed=3)
    pipe = diffusers_with(files, [("dora.safetensors", scale)])
    dora = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer) and m.use_dora.get("a0")]
    assert len(dora) == 4  # every module of the file runs as DoRA in peft
    got = Pipeline.load(files / "tiny.safetensors", loras=[(files / "dora.safetensors", scale)])(s, progress=False)
    assert_close_images(got, diffusers_images(pipe, s), f"PEFT DoRA at {scale}")
    plain = Pipeline.load(files / "tiny.safetensors")(s, progress=False)
    assert not np.array_equal(np.asarray(got[0]), np.asarray(plain[0]))


def test_each_weight_changes_by_scale_alpha_over_rank_up_down(files):
    model, base = load(files / "tiny.safetensors"), load(files / "tiny.safetensors")
    merge_lora(model, files / "kohya_attention.safetensors", 0.5)
    from safetensors.torch import load_file

    t = load_file(files / "kohya_attention.safetensors")
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    want = base.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight + 0.5 * (2.0 / RANK) * (
        t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"])
    torch.testing.assert_close(model.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight, want)
    w = TINY.text_encoder_2.width  # bigG's v rows of layer 2's fused in_proj; alpha absent = rank: factor 1
    key = "lora_te2_text_model_encoder_layers_2_self_attn_v_proj"
    fused, fused_base = (m.text_encoder_2.transformer.resblocks[2].attn.in_proj_weight for m in (model, base))
    torch.testing.assert_close(fused[2 * w:], fused_base[2 * w:] + 0.5 * t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"])
    assert torch.equal(fused[:2 * w], fused_base[:2 * w])


def test_bad_lora_files_are_one_clear_error(files, tmp_path):
    model = load(files / "tiny.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        "unmatched": ({"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8),
                       "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 4)},
                      "none of its 1 modules match this model's (its first keys: lora_unet_nowhere_to_q)"),
        "empty": ({}, "holds no tensors, so it would change nothing"),
        "sd15 shapes": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
                         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(64, 4)},
                        "for another model family"),
        "loha without its second factor": ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "(LoHa) has no w1b"),
        "not a lora": ({"model.diffusion_model.out.2.weight": torch.zeros(2)}, "is not part of a LoRA"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(LoadError, match=message.replace("(", r"\(").replace(")", r"\)")):
            merge_lora(model, tmp_path / f"{name}.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoadError):
        merge_lora(model, tmp_path / "corrupt.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was changed


@pytest.mark.slow
def test_text_encoder_loras_equal_diffusers_embeddings(files):
    """The images of a random tiny model hardly depend on the prompt: compare the conditioning itself."""
    pipe = diffusers_with(files, [("kohya.safetensors", 0.8)])
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt("1girl, red eyes", do_classifier_free_guidance=False)
    ours = Pipeline.load(files / "tiny.safetensors", loras=[(files / "kohya.safetensors", 0.8)])
    plain = Pipeline.load(files / "tiny.safetensors")
    (our_context, y), _ = ours.conditioning(Settings(prompt="1girl, red eyes", width=64, height=64, cfg=1.0))
    torch.testing.assert_close(our_context, context, rtol=0, atol=1e-5)
    torch.testing.assert_close(y[:, :pooled.shape[1]], pooled, rtol=0, atol=1e-5)
    (plain_context, _), _ = plain.conditioning(Settings(prompt="1girl, red eyes", width=64, height=64, cfg=1.0))
    width1 = TINY.text_encoder_1.width  # both encoders' shares of the context moved
    assert (our_context - plain_context)[..., :width1].abs().max() > 1e-3
    assert (our_context - plain_context)[..., width1:].abs().max() > 1e-3


def test_the_diffusers_path_dialect_and_old_diffusers_names_merge_the_same(files, tmp_path):
    """kohya names over diffusers paths (diffusers' exporter) and .lora.down/.lora.up give the same weights."""
    from safetensors.torch import load_file

    t = load_file(files / "kohya.safetensors")
    dialects = {"kohya over diffusers paths": {}, "old diffusers": {}}
    for key, tensor in t.items():
        if not key.startswith("lora_unet_"):
            continue
        module, _, part = key.partition(".")
        official = next(n for n in UNET_MODULES if "lora_unet_" + n.replace(".", "_") == module)
        path_d = unet_name_to_diffusers(official + ".weight", TINY.unet.num_res_blocks)[:-len(".weight")]
        dialects["kohya over diffusers paths"]["lora_unet_" + path_d.replace(".", "_") + "." + part] = tensor
        if part != "alpha":
            old = {"lora_down.weight": "lora.down.weight", "lora_up.weight": "lora.up.weight"}[part]
            dialects["old diffusers"][f"unet.{path_d}.{old}"] = tensor * (2.0 / RANK if part == "lora_up.weight" else 1)
    reference = load(files / "tiny.safetensors")
    save_file({k: v for k, v in t.items() if k.startswith("lora_unet_")}, tmp_path / "official.safetensors")
    merge_lora(reference, tmp_path / "official.safetensors")
    for name, tensors in dialects.items():
        save_file(tensors, tmp_path / "d.safetensors")
        model = load(files / "tiny.safetensors")
        merge_lora(model, tmp_path / "d.safetensors")
        for (k, a), b in zip(model.unet.state_dict().items(), reference.unet.state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name}: {k}")
    with pytest.raises(LoadError, match="is not a number"):
        merge_lora(model, tmp_path / "d.safetensors", float("nan"))


def test_a_partly_matching_lora_merges_what_matches_and_says_what_it_left_out(files, tmp_path, capsys):
    from safetensors.torch import load_file

    t = load_file(files / "kohya.safetensors")
    stray = {f"lora_unet_nowhere_{i}.{part}": torch.zeros(4, 8) if part == "lora_down.weight" else torch.zeros(8, 4)
             for i in range(5) for part in ("lora_down.weight", "lora_up.weight")}
    save_file(t | stray, tmp_path / "partly.safetensors")
    reference, model = load(files / "tiny.safetensors"), load(files / "tiny.safetensors")
    merge_lora(reference, files / "kohya.safetensors", 0.8)
    capsys.readouterr()
    merge_lora(model, tmp_path / "partly.safetensors", 0.8, apply=False)  # the check before the load: quiet
    assert capsys.readouterr().err == ""
    changed = merge_lora(model, tmp_path / "partly.safetensors", 0.8)
    err = capsys.readouterr().err
    modules = len({k.split(".")[0] for k in t})
    assert changed == modules
    assert err.count("\n") == 1 and err.startswith(f"warning: {tmp_path / 'partly.safetensors'}: 5 of its "
                                                    f"{modules + 5} modules match none of this model's"), err
    assert "lora_unet_nowhere_0, lora_unet_nowhere_1, lora_unet_nowhere_2" in err
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_kohyas_text_encoder_names_without_text_model_merge_the_same(files, tmp_path):
    """kohya sd-scripts on transformers 5 writes lora_te1_encoder_layers_... (no text_model_): both spellings,
    built from the same tensors, give the same weights (the classic one equals diffusers above)."""
    from safetensors.torch import load_file

    t = load_file(files / "kohya_attention.safetensors")
    new = {k.replace("lora_te1_text_model_", "lora_te1_").replace("lora_te2_text_model_", "lora_te2_"): v
           for k, v in t.items()}
    assert sum(k.startswith(("lora_te1_encoder_", "lora_te2_encoder_")) for k in new) == 10  # 5 modules, down + up
    save_file(new, tmp_path / "new_spelling.safetensors")
    classic, spelled = load(files / "tiny.safetensors"), load(files / "tiny.safetensors")
    merge_lora(classic, files / "kohya_attention.safetensors", 0.8)
    assert merge_lora(spelled, tmp_path / "new_spelling.safetensors", 0.8) == len({k.split(".")[0] for k in t})
    for (k, a), b in zip(spelled.state_dict().items(), classic.state_dict().values()):
        assert torch.equal(a, b), k
    base = load(files / "tiny.safetensors")
    for part in ("text_encoder_1", "text_encoder_2"):  # both encoders took their adapters
        assert any(not torch.equal(a, b) for a, b in zip(getattr(spelled, part).state_dict().values(),
                                                        getattr(base, part).state_dict().values())), part
