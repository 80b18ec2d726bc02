"""python -m models.merge: weighted sum and add-difference equal A1111's formulas tensor for tensor, per-block
weights follow supermerger's SDXL blocks, the output keeps every key, dtype and metadata of the primary model
and records the recipe, a LoRA baked in equals the loader's merge, and an extracted LoRA rebuilds the fine-tune."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora import kohya_file
from test_robustness import one_line_error

from models.loading import load, save_single_file
from models.lora import merge_lora
from models.merge import block_of, main
from models.sdxl import SDXL, TINY, TINY_REFINER


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for i, name in enumerate("abc"):
        torch.manual_seed(i)
        save_single_file(SDXL(TINY), root / f"{name}.safetensors", dtype="fp16" if name == "a" else None)
    torch.manual_seed(9)
    save_single_file(SDXL(TINY_REFINER), root / "refiner.safetensors")
    kohya_file(SDXL(TINY), root / "style.safetensors")
    return root


def run(capsys, *args):
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def test_sum_and_add_difference_are_a1111s(capsys, tmp_path, files):
    a, b, c = (load_file(files / f"{n}.safetensors") for n in "abc")
    assert run(capsys, "sum", files / "a.safetensors", files / "b.safetensors", "--alpha", "0.3", "-o", tmp_path / "s.safetensors")[0] == 0
    assert run(capsys, "add-difference", *(files / f"{n}.safetensors" for n in "abc"), "--alpha", "0.7",
               "-o", tmp_path / "d.safetensors")[0] == 0
    summed, difference = load_file(tmp_path / "s.safetensors"), load_file(tmp_path / "d.safetensors")
    assert list(summed) == list(a) and all(summed[k].dtype == a[k].dtype for k in a), "keys or dtypes changed"
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(summed[key], (0.7 * a[key].float() + 0.3 * b[key]).to(a[key].dtype))
            torch.testing.assert_close(difference[key], (a[key].float() + 0.7 * (b[key] - c[key])).to(a[key].dtype))
        else:
            assert torch.equal(summed[key], a[key])
    with safe_open(tmp_path / "d.safetensors", "pt") as f, safe_open(files / "a.safetensors", "pt") as g:
        metadata, original = f.metadata(), g.metadata()
    assert {k: metadata[k] for k in original} == original, "A's metadata was not kept"
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["interp_method"] == "add-difference" and recipe["multiplier"] == 0.7 and recipe["tertiary_model_hash"]
    load(tmp_path / "d.safetensors")  # and the loader reads it


def test_block_weights_follow_supermergers_sdxl_blocks(capsys, tmp_path, files):
    blocks = ["0"] * 20
    blocks[1] = "1"  # IN00: input_blocks.0, time_embed, label_emb from B; everything else A's
    code, err = run(capsys, "sum", files / "a.safetensors", files / "b.safetensors", "--alpha", "0.5",
                    "--blocks", ",".join(blocks), "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    a, b, merged = (load_file(p) for p in (files / "a.safetensors", files / "b.safetensors", tmp_path / "m.safetensors"))
    for key in a:
        want = b[key].to(a[key].dtype) if block_of(key) == 1 else a[key]
        assert torch.equal(merged[key], want), key
    assert block_of("model.diffusion_model.out.2.weight") == 19 and block_of("first_stage_model.x") == 0
    assert sum(block_of(k) == 1 for k in a) > 4


@pytest.mark.parametrize("case", ["families", "blocks", "destination"])
def test_bad_merges_are_one_line_and_write_nothing(capsys, tmp_path, files, case):
    args = {"families": ["sum", files / "a.safetensors", files / "refiner.safetensors", "--alpha", "0.5"],
            "blocks": ["sum", files / "a.safetensors", files / "b.safetensors", "--alpha", "0.5", "--blocks", "1,2"],
            "destination": ["sum", files / "a.safetensors", files / "b.safetensors", "--alpha", "0.5"]}[case]
    out = files / "c.safetensors" if case == "destination" else tmp_path / "out.safetensors"
    before = out.read_bytes() if out.exists() else None
    code, err = run(capsys, *args, "-o", out)
    one_line_error(err, code, {"families": "different families", "blocks": "SDXL takes 20", "destination": "exists"}[case])
    assert (out.read_bytes() if out.exists() else None) == before


def test_a_baked_lora_equals_the_loaders_merge(capsys, tmp_path, files):
    code, err = run(capsys, "bake", files / "b.safetensors", "--lora", f"{files / 'style.safetensors'}:0.8",
                    "-o", tmp_path / "baked.safetensors")
    assert code == 0, err
    expected = load(files / "b.safetensors")
    merge_lora(expected, files / "style.safetensors", 0.8)
    baked = load(tmp_path / "baked.safetensors")
    for (name, got), want in zip(baked.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), name


def test_an_extracted_lora_rebuilds_the_fine_tune(capsys, tmp_path, files):
    """tuned = b + a rank-RANK LoRA (linear and conv); extracting at that rank (or by energy) and merging it back gives
    tuned again."""
    from test_lora import RANK

    assert run(capsys, "bake", files / "b.safetensors", "--lora", files / "style.safetensors", "-o", tmp_path / "t.safetensors")[0] == 0
    for flag in (["--rank", str(RANK), "--conv-rank", str(RANK)], ["--energy", "0.999999", "--conv-rank", str(RANK)]):
        out = tmp_path / f"extracted{flag[0]}.safetensors"
        code, err = run(capsys, "extract", files / "b.safetensors", tmp_path / "t.safetensors", *flag, "-o", out)
        assert code == 0, err
        rebuilt, tuned = load(files / "b.safetensors"), load(tmp_path / "t.safetensors")
        merge_lora(rebuilt, out)
        for (name, got), want in zip(rebuilt.state_dict().items(), tuned.state_dict().values()):
            assert (got - want).norm() <= 1e-5 * want.norm() + 1e-7, f"{flag}: {name}"
