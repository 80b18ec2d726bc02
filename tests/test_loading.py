"""Loading and saving: both layouts agree with each other and with diffusers' own readers,
full-size models match the official manifests, and every bad input gets one clear sentence."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import keys
from models.diffusers_layout import save_diffusers, unet_config_to_diffusers, vae_config_to_diffusers
from models.loading import LoadError, load, save_single_file
from models.sdxl import BASE, REFINER, SDXL, TINY, single_file_prefixes
from models.single_file import infer_config

MANIFESTS = Path(__file__).parent / "sdxl-keys"
IGNORED = ("position_ids", "logit_scale")  # in the official file; loaders drop them, exports omit them


def manifest(name):
    return {k: tuple(v) for k, v in json.loads((MANIFESTS / f"{name}.json").read_text()).items()}


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{k} differs"


# ----------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny SDXL pipeline built and saved by diffusers/transformers themselves (save_pretrained)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from models.tokenizer import load_tokenizers

    torch.manual_seed(0)
    strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}
    te = lambda c, cls: cls(CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, max_position_embeddings=c.context_length, hidden_act=c.act,
        projection_dim=c.projection_dim or c.width))
    tok_1, tok_2 = load_tokenizers()
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**strip(vae_config_to_diffusers(TINY.vae))),
        text_encoder=te(TINY.text_encoder_1, CLIPTextModel),
        text_encoder_2=te(TINY.text_encoder_2, CLIPTextModelWithProjection),
        tokenizer=tok_1, tokenizer_2=tok_2,
        unet=UNet2DConditionModel(**strip(unet_config_to_diffusers(TINY.unet))),
        scheduler=EulerDiscreteScheduler(),
    )
    with torch.no_grad():  # no init-time ones and zeros left to hide a misplaced tensor
        for p in pipe.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-sdxl"
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.mark.slow
def test_diffusers_folder_and_single_file_load_identical_models(diffusers_folder, tmp_path):
    folder, pipe = diffusers_folder
    from_folder = load(folder)
    single = tmp_path / "tiny.safetensors"
    save_single_file(from_folder, single)
    same_weights(from_folder, load(single))

    # diffusers' own single-file reader, an independent converter, must find the original weights in it.
    from diffusers import StableDiffusionXLPipeline

    again = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert want.keys() == got.keys(), f"{name}: key sets differ"
        assert all(torch.equal(want[k], got[k]) for k in want), f"{name}: diffusers reads other weights from our file"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_single_file_to_folder_to_single_file_is_bit_exact(tmp_path, dtype):
    torch.manual_seed(0)
    model = SDXL(TINY)
    first, folder, second = tmp_path / "a.safetensors", tmp_path / "folder", tmp_path / "b.safetensors"
    save_single_file(model, first, dtype=dtype)
    assert subprocess.run([sys.executable, "-m", "models.convert", first, folder]).returncode == 0
    assert subprocess.run([sys.executable, "-m", "models.convert", folder, second]).returncode == 0
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.slow
def test_load_casts_to_the_requested_dtype(tmp_path):
    torch.manual_seed(0)
    model = SDXL(TINY)
    save_single_file(model, tmp_path / "half.safetensors", dtype="fp16")
    loaded = load(tmp_path / "half.safetensors", dtype="fp32")
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, model.state_dict()[k].half().float()), k


def test_refiner_layout_round_trip(tmp_path):
    """Refiner-shaped model: one text encoder, stored at conditioner.embedders.0.model."""
    from dataclasses import replace

    cfg = replace(TINY, text_encoder_1=None, unet=replace(TINY.unet, context_dim=64, adm_in_channels=48 + 5 * 16))
    torch.manual_seed(0)
    model = SDXL(cfg)
    save_single_file(model, tmp_path / "r.safetensors")
    names = load_file(tmp_path / "r.safetensors").keys()
    assert any(n.startswith("conditioner.embedders.0.model.") for n in names)
    assert not any(n.startswith("conditioner.embedders.1.") for n in names)
    save_diffusers(load(tmp_path / "r.safetensors"), tmp_path / "folder")
    same_weights(model, load(tmp_path / "folder"))


# ----------------------------------------------------------------------------- --config: a bare file's architecture


@pytest.fixture(scope="module")
def bare_file(diffusers_folder, tmp_path_factory):
    """The diffusers folder's (narrow) model as a single file without plainxl.config metadata."""
    folder, _ = diffusers_folder
    path = tmp_path_factory.mktemp("bare") / "bare.safetensors"
    save_single_file(load(folder), path)
    save_file(load_file(path), path)  # the same tensors, the metadata gone
    return path


def configs_only(folder, dst):
    """A copy of a diffusers folder's JSON files only: --config reads no weights."""
    for f in folder.rglob("*.json"):
        (dst / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        (dst / f.relative_to(folder)).write_text(f.read_text())
    return dst


@pytest.mark.slow
def test_config_gives_a_bare_single_file_its_architecture(diffusers_folder, bare_file, tmp_path):
    """As diffusers' from_single_file(config=...): the folder, any of its JSON files, or plainxl's own config;
    every weight equals the folder's, and diffusers' own reader finds the same ones in the bare file."""
    from dataclasses import asdict

    from diffusers import StableDiffusionXLPipeline

    folder, pipe = diffusers_folder
    with pytest.raises(LoadError, match="with --config FOLDER_OR_CONFIG_JSON"):
        load(bare_file)
    reference = load(folder)
    configs = configs_only(folder, tmp_path / "configs")
    (tmp_path / "plainxl.json").write_text(json.dumps(asdict(reference.config)))
    for config in (folder, configs, configs / "model_index.json", configs / "unet" / "config.json",
                   configs / "vae" / "config.json", tmp_path / "plainxl.json"):
        model = load(bare_file, config=config)
        assert model.config == reference.config, config
        same_weights(model, reference)
    theirs = StableDiffusionXLPipeline.from_single_file(str(bare_file), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # the folder's weights, as ours are
        want, got = getattr(pipe, name).state_dict(), getattr(theirs, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_a_unet_config_alone_gives_the_unet_and_the_rest_is_read_from_the_shapes(diffusers_folder, bare_file, tmp_path):
    folder, _ = diffusers_folder
    (tmp_path / "unet_config.json").write_text((folder / "unet" / "config.json").read_text())
    with pytest.raises(LoadError) as e:  # this model's text encoders are narrow too: they are named
        load(bare_file, config=tmp_path / "unet_config.json")
    assert "the config gives the UNet only, and its OpenCLIP is 64 wide" in str(e.value) and "\n" not in str(e.value)
    assert "give the model's whole diffusers folder" in str(e.value)
    from models.loading import architecture

    unet = architecture(tmp_path / "unet_config.json", bare_file)
    assert unet == load(folder).config.unet


@pytest.mark.parametrize("config, fragment", [
    ("other_width.json", "has shape"),
    ("list.json", "is not a config plainxl reads"),
    ("broken.json", "cannot be read as a model config"),
    ("empty_folder", "is a folder but not a diffusers model"),
    ("nowhere.json", "--config {tmp}/nowhere.json does not exist; give the model's diffusers folder"),
    ("lone/model_index.json", "is a model_index.json away from its folder's unet/config.json"),
    ("lone/vae_config.json", "is a VAE's config"),
    ("huge.safetensors", "bytes, not a config JSON"),
    ("nested/unet/custom.json", "is not a config plainxl reads"),
])
def test_a_config_that_does_not_describe_the_file_is_one_line(bare_file, diffusers_folder, tmp_path, config, fragment):
    """Each refused in one line naming --config; a JSON file is read as itself, never as the folder around it
    (nested/unet/custom.json sits in a model folder whose own configs would fit the file)."""
    from dataclasses import asdict, replace

    folder, _ = diffusers_folder
    wide = replace(TINY, unet=replace(TINY.unet, model_channels=64))
    (tmp_path / "other_width.json").write_text(json.dumps(asdict(wide)))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text('{"unet": {}, "text_encoder_2": {}}')
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "model_index.json").write_text((folder / "model_index.json").read_text())
    (tmp_path / "lone" / "vae_config.json").write_text((folder / "vae" / "config.json").read_text())
    (tmp_path / "huge.safetensors").write_bytes(bare_file.read_bytes())
    configs_only(folder, tmp_path / "nested")
    (tmp_path / "nested" / "unet" / "custom.json").write_text("{}")
    with pytest.raises(LoadError) as e:
        load(bare_file, config=tmp_path / config)
    message = str(e.value)
    assert fragment.format(tmp=tmp_path) in message and "--config" in message and "\n" not in message, message


def test_a_config_that_is_a_fifo_is_refused_not_waited_on(bare_file, tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(LoadError, match="is not a regular file"):
        load(bare_file, config=tmp_path / "config.json")


def test_config_with_a_folder_model_is_refused(diffusers_folder):
    folder, _ = diffusers_folder
    with pytest.raises(LoadError, match="is for a single file; .* is a diffusers folder"):
        load(folder, config=folder)


@pytest.mark.slow
def test_convert_and_generate_take_config(diffusers_folder, bare_file, tmp_path, capsys):
    from models.convert import main as convert
    from sampling.generate import main as generate

    folder, _ = diffusers_folder
    assert convert([str(bare_file), str(tmp_path / "full.safetensors"), "--config", str(folder)]) == 0
    same_weights(load(tmp_path / "full.safetensors"), load(folder))
    quick = ["--prompt", "a", "--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]
    assert generate(["--model", str(bare_file), "--config", str(folder), "--out", str(tmp_path / "a"), *quick]) == 0
    assert generate(["--model", str(tmp_path / "full.safetensors"), "--out", str(tmp_path / "b"), *quick]) == 0
    (a,), (b,) = (list((tmp_path / d).iterdir()) for d in "ab")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert generate(["--model", str(bare_file), "--out", str(tmp_path / "c"), *quick]) == 2
    assert "--config FOLDER_OR_CONFIG_JSON" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_init_writes_each_dtype_from_the_same_draw(tmp_path):
    from models.init import main as init

    for dtype in ("fp32", "fp16", "bf16"):
        assert init(["tiny", str(tmp_path / f"{dtype}.safetensors"), "--dtype", dtype]) == 0
    full = load_file(tmp_path / "fp32.safetensors")
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        cast = load_file(tmp_path / f"{dtype}.safetensors")
        assert cast.keys() == full.keys()
        assert all(cast[k].dtype == torch_dtype and torch.equal(cast[k], full[k].to(torch_dtype))
                   for k in full if full[k].is_floating_point())


# ----------------------------------------------------------------------------- full size, on meta


@pytest.mark.parametrize("cfg, name", [(BASE, "sd_xl_base_single_file"), (REFINER, "sd_xl_refiner_single_file")])
def test_full_size_names_and_shapes_equal_the_official_manifest(cfg, name):
    with torch.device("meta"):
        model = SDXL(cfg)
    ours = {prefix + k: tuple(v.shape) for c, prefix in single_file_prefixes(cfg).items()
            for k, v in getattr(model, c).state_dict().items()}
    official = {k: v for k, v in manifest(name).items() if not k.endswith(IGNORED)}
    assert ours.keys() - official.keys() == set(), sorted(ours.keys() - official.keys())[:5]
    assert official.keys() - ours.keys() == set(), sorted(official.keys() - ours.keys())[:5]
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert infer_config(manifest(name)) == cfg, "the architecture inferred from the official shapes differs"


def test_full_size_parameter_counts_equal_the_spec():
    with torch.device("meta"):
        base, refiner = SDXL(BASE), SDXL(REFINER)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(base.unet) == 2_567_463_684
    assert count(refiner.unet) == 2_259_526_660
    assert count(base.vae) == 83_653_863
    assert count(base.text_encoder_1) == 123_060_480
    assert count(base.text_encoder_2) == 694_659_840  # + logit_scale = 694,659,841 in the file


def test_key_maps_give_the_diffusers_manifests():
    """models.convert on the full-size official names gives exactly diffusers' names and shapes."""
    meta = lambda m: {k: torch.empty(v, device="meta") for k, v in m.items()}
    strip = lambda m, p: {k[len(p):]: v for k, v in m.items() if k.startswith(p)}
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    unet = keys.unet_to_diffusers(strip(manifest("unet"), "model.diffusion_model."), 2)
    assert unet == manifest("diffusers_unet")
    refiner = keys.unet_to_diffusers(strip(manifest("unet_refiner"), "model.diffusion_model."), 2)
    assert refiner == manifest("diffusers_unet_refiner")
    vae = keys.vae_to_diffusers(meta(strip(manifest("vae"), "first_stage_model.")))
    assert shapes(vae) == manifest("diffusers_vae")
    bigg = keys.openclip_to_hf(meta(strip(manifest("text_encoder_g"), "conditioner.embedders.1.model.")))
    assert shapes(bigg) == manifest("diffusers_text_encoder_2")
    clip_l = strip(manifest("text_encoder_l"), "conditioner.embedders.0.transformer.")
    assert {k: v for k, v in clip_l.items() if not k.endswith(IGNORED)} == manifest("diffusers_text_encoder")


# ----------------------------------------------------------------------------- bad input


def fake(path, names, shape=(2, 2)):
    save_file({n: torch.zeros(shape) for n in names}, path)
    return path


def edited(tiny_file, path, edit, keep_metadata=True):
    """A copy of the tiny file, edited; with its config metadata (the checks run against the stored
    architecture), or without it, like a file from the wild."""
    from safetensors import safe_open

    with safe_open(tiny_file, "pt") as f:
        metadata = f.metadata() if keep_metadata else None
    tensors = load_file(tiny_file)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)
    return path


def expect_error(source, *fragments):
    with pytest.raises(LoadError) as e:
        load(source)
    message = str(e.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_sd1_checkpoint(tmp_path):
    expect_error(fake(tmp_path / "sd15.safetensors", ["model.diffusion_model.input_blocks.0.0.weight",
                                                       "cond_stage_model.transformer.text_model.final_layer_norm.weight"]),
                 "SD 1.x checkpoint", "loads SDXL")


def test_sd2_checkpoint(tmp_path):
    expect_error(fake(tmp_path / "sd21.safetensors", ["model.diffusion_model.input_blocks.0.0.weight",
                                                       "cond_stage_model.model.ln_final.weight"]),
                 "SD 2.x checkpoint")


def test_other_model(tmp_path):
    expect_error(fake(tmp_path / "flux.safetensors", ["double_blocks.0.img_attn.qkv.weight"]),
                 "not an SDXL checkpoint", "double_blocks.0.img_attn.qkv.weight")


def test_lora(tmp_path):
    expect_error(fake(tmp_path / "lora.safetensors", ["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"]),
                 "LoRA")


def test_sd1_diffusers_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    expect_error(tmp_path, "SD 1.x model")


def test_missing_tensors(tiny_file, tmp_path):
    gone = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    expect_error(edited(tiny_file, tmp_path / "m.safetensors", lambda t: t.pop(gone)), "missing 1 tensors", gone)


def test_unexpected_tensors(tiny_file, tmp_path):
    extra = "model.diffusion_model.extra_head.weight"
    expect_error(edited(tiny_file, tmp_path / "u.safetensors", lambda t: t.update({extra: torch.zeros(3)})),
                 "1 tensors an SDXL model does not have", extra)


def test_wrong_shape(tiny_file, tmp_path):
    name = "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    expect_error(edited(tiny_file, tmp_path / "w.safetensors", lambda t: t.update({name: torch.zeros(64, 7)})),
                 name, "[64, 7]", "[64, 96]")


def test_wrong_shape_against_stored_config(tiny_file, tmp_path):
    path = edited(tiny_file, tmp_path / "w.safetensors",
                  lambda t: t.update({"first_stage_model.decoder.conv_out.bias": torch.zeros(4)}))
    expect_error(path, "first_stage_model.decoder.conv_out.bias", "[4]", "[3]")


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "t.safetensors", "truncated or not a valid safetensors file", "download it again")


def test_corrupt_header(tmp_path):
    (tmp_path / "c.safetensors").write_bytes((200).to_bytes(8, "little") + b"{not json" + b" " * 191)
    expect_error(tmp_path / "c.safetensors", "not a valid safetensors file")


class _Exploit:
    """Unpickling this would create a marker file; the loader must never unpickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin", "disguised.safetensors"])
def test_pickle_is_refused_unopened(tmp_path, name):
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps({"state_dict": _Exploit(str(marker))}))
    expect_error(tmp_path / name, "pickle checkpoint", ".safetensors")
    assert not marker.exists()


def test_torch_zip_checkpoint_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    expect_error(tmp_path / "model.pt", "pickle checkpoint")


def test_path_that_does_not_exist(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "does not exist")


@pytest.mark.slow
def test_cli_bad_input_one_line_no_traceback_nothing_written(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({}))
    dst = tmp_path / "out.safetensors"
    r = subprocess.run([sys.executable, "-m", "models.convert", tmp_path / "model.ckpt", dst],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.slow
def test_cli_refuses_to_overwrite(tiny_file, tmp_path):
    dst = tmp_path / "taken.safetensors"
    dst.write_bytes(b"precious")
    r = subprocess.run([sys.executable, "-m", "models.convert", tiny_file, dst], capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert dst.read_bytes() == b"precious"


# ----------------------------------------------------------------------------- Hugging Face ids


def run_offline(source, hf_home):
    code = f"from models.loading import load, LoadError\ntry:\n    load({str(source)!r}); print('LOADED')\n" \
           f"except LoadError as e:\n    print('ERROR', e)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout


@pytest.mark.slow
def test_repo_id_offline_and_not_cached_says_so(tmp_path):
    out = run_offline("cagliostrolab/animagine-xl-4.0", tmp_path)
    assert out.startswith("ERROR") and "nor in the Hugging Face cache" in out and "HF_HUB_OFFLINE" in out, out


@pytest.mark.slow
def test_repo_id_offline_from_the_cache(tiny_file, tmp_path):
    """A file already in huggingface_hub's cache loads with the hub unreachable (the default file of the repo)."""
    repo = tmp_path / "hub" / "models--cagliostrolab--animagine-xl-4.0"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "animagine-xl-4.0.safetensors").write_bytes(tiny_file.read_bytes())
    assert run_offline("cagliostrolab/animagine-xl-4.0", tmp_path).startswith("LOADED")
