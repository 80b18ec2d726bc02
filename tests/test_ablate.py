"""sampling.ablate on the bundled tiny model: every cell's picture equals the pipeline run with the cell's settings,
the score table pools a setting's seeds, an interrupted grid continues without redoing a cell, and a bad config is
one line before the model loads."""

import numpy as np
import pytest
from PIL import Image

from data.procedural import caption, random_character
from sampling.ablate import main
from sampling.pipeline import Pipeline, Settings

PROMPTS = [caption(random_character(np.random.default_rng(seed))) for seed in (1, 2)]  # the classifier reads these


GRID = "dict(sampler=['euler', 'dpmpp_2m'], steps=[3], cfg=[5.0], intervention=['none', 'freeu'], seed=[0, 1])"


def write_config(path, **fields):
    """A config file: PROMPTS, a grid (GRID unless given), FreeU, the classifier's score, 64x64, and `fields`
    (Python source text each)."""
    fields = dict(prompts=repr(PROMPTS), grid=GRID, interventions="dict(freeu=freeu)", score="caption_fidelity",
                  width=64, height=64) | fields
    lines = ["from data.evaluate import caption_fidelity", "from sampling.interventions import freeu",
             f"config = dict({', '.join(f'{k}={v}' for k, v in fields.items())})"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_cells_equal_the_pipeline_and_the_table_pools_seeds(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path / "ablation_x.py")), "--out", str(out)]) == 0
    names = sorted(p.name for p in (out / "cells").glob("*.png"))
    assert len(names) == 2 * 2 * 2 and "dpmpp_2m-3-cfg5-freeu-seed1.png" in names
    pipe = Pipeline.load("plainxl-tiny")
    with Image.open(out / "cells" / "euler-3-cfg5-none-seed1.png") as cell:
        assert cell.size == (2 * 64, 64) and "sampler: euler" in cell.info["parameters"]
        for i, prompt in enumerate(PROMPTS):
            want = pipe(Settings(prompt=prompt, width=64, height=64, steps=3, cfg=5.0, sampler="euler", seed=1),
                        progress=False)[0]
            assert np.array_equal(np.asarray(cell.convert("RGB"))[:, 64 * i:64 * (i + 1)], np.asarray(want))
    table = (out / "scores.md").read_text().splitlines()
    assert table[0].startswith("| sampler | steps | cfg | intervention | hair_colour") and len(table) == 2 + 4
    assert "| dpmpp_2m | 3 | 5.0 | freeu |" in "\n".join(table)
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (160 + 2 * 64, 8 * 64)


@pytest.mark.slow
def test_an_interrupted_grid_continues_without_redoing_a_cell(tmp_path, capsys):
    out = tmp_path / "out"
    # The third cell's intervention raises KeyboardInterrupt, as Ctrl-C would during its generation.
    stop = tmp_path / "ablation_stop.py"
    write_config(stop, grid="dict(sampler=['euler'], steps=[2], cfg=[5.0], intervention=['none', 'stop'], seed=[0, 1])",
                 interventions="dict(stop=lambda model: (_ for _ in ()).throw(KeyboardInterrupt))")
    assert main(["--config", str(stop), "--out", str(out)]) == 130
    assert "interrupted; 2 cell(s) are written and kept" in capsys.readouterr().err
    done = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.png")}
    assert sorted(done) == ["euler-2-cfg5-none-seed0.png", "euler-2-cfg5-none-seed1.png"]
    go_on = write_config(tmp_path / "ablation_go.py",
                         grid="dict(sampler=['euler'], steps=[2], cfg=[5.0], intervention=['none', 'freeu'], seed=[0, 1])")
    assert main(["--config", str(go_on), "--out", str(out)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.png")}
    assert len(after) == 4 and all(after[name] == t for name, t in done.items())  # the first two were not redone


@pytest.mark.parametrize("fields, fragment", [
    (dict(steps_total=3), "unknown field 'steps_total'"),
    (dict(grid="dict(sampler=['euler'], steps=[3])"), "grid needs the axes sampler, steps, cfg, intervention, seed"),
    (dict(grid="dict(sampler=['dpm_fast'], steps=[3], cfg=[5.0])"), "sampler 'dpm_fast' is unknown"),
    (dict(grid="dict(sampler=['euler'], steps=[3], cfg=[5.0], intervention=['freeu2'])"),
     "intervention 'freeu2' is not in"),
    (dict(grid="dict(sampler=['euler'], steps=[0], cfg=[5.0])"), "grid steps must be positive whole numbers"),
    (dict(model="'/nonexistent/model.safetensors'"), "/nonexistent/model.safetensors"),
])
def test_a_bad_config_is_one_line_before_the_model_loads(tmp_path, capsys, fields, fragment):
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path / "ablation_bad.py", **fields)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and fragment in err, err
    assert not out.exists()


def test_a_config_that_raises_names_its_line(tmp_path, capsys):
    path = tmp_path / "ablation_broken.py"
    path.write_text("config = dict(prompts=['1girl'])\nx = 1 / 0\n")
    assert main(["--config", str(path)]) == 2
    assert "raised ZeroDivisionError on line 2" in capsys.readouterr().err


def test_a_score_that_refuses_the_prompts_is_one_line_and_keeps_the_cells(tmp_path, capsys):
    path = write_config(tmp_path / "ablation_odd.py", grid="dict(sampler=['euler'], steps=[2], cfg=[5.0])",
                        prompts="['1girl, solo, a hat nobody knows']")
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the config's score failed" in err and "the cells are written and kept" in err
    assert len(list((tmp_path / "out" / "cells").glob("*.png"))) == 1


def test_a_folder_of_another_grid_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    grid = "dict(sampler=['euler'], steps=[2], cfg=[5.0])"
    assert main(["--config", str(write_config(tmp_path / "ablation_a.py", grid=grid)), "--out", str(out)]) == 0
    capsys.readouterr()
    other = write_config(tmp_path / "ablation_b.py", grid=grid, width=72)  # same cell names, other pictures
    assert main(["--config", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds cells of a grid with another model, prompts, negative prompt or size" in err


def test_shipped_ablation_configs_are_valid():
    from pathlib import Path

    from models.loading import inspect
    from sampling.ablate import check_cells, read_config

    paths = sorted(Path(__file__).parents[1].glob("configs/ablation_*.py"))
    assert [p.name for p in paths] == ["ablation_controlnet.py", "ablation_freeu.py", "ablation_samplers.py"]
    for path in paths:
        config = read_config(path)
        if not config["controlnets"]:  # (ablation_controlnet's ControlNet is what train.demo_controlnet writes)
            check_cells(config, inspect(config["model"]))


@pytest.mark.slow
def test_a_grid_sweeps_control_scale_and_window(tmp_path, capsys):
    """Scale 0 is the model without the ControlNet, pixel for pixel; each other cell is the pipeline's run."""
    from test_controlnet import control_image, diffusers_controlnet

    from models.diffusers_layout import save_diffusers
    from models.loading import load, save_single_file

    model = load("plainxl-tiny")
    save_single_file(model, tmp_path / "tiny.safetensors")
    save_diffusers(model, tmp_path / "tiny")  # diffusers_controlnet copies its UNet
    diffusers_controlnet(tmp_path, 1).save_pretrained(tmp_path / "controlnet")
    control_image(1).save(tmp_path / "edges.png")
    grid = ("dict(sampler=['euler'], steps=[3], cfg=[5.0], control_scale=[0.0, 1.0], control_start=[0.0], "
            "control_end=[0.5, 1.0])")
    config = write_config(tmp_path / "ablation_control.py", grid=grid, score="None",
                          model=repr(str(tmp_path / "tiny.safetensors")), controlnets=repr([str(tmp_path / "controlnet")]),
                          control_images=repr([str(tmp_path / "edges.png")]))
    out = tmp_path / "out"
    assert main(["--config", str(config), "--out", str(out)]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in (out / "cells").glob("*.png"))
    assert names == [f"euler-3-cfg5-none-control{s}-0-{e}-seed0.png" for s in (0, 1) for e in (0.5, 1)]
    plain = Pipeline.load(tmp_path / "tiny.safetensors")
    controlled = Pipeline.load(tmp_path / "tiny.safetensors", controlnets=[tmp_path / "controlnet"])
    for scale, end, pipe in [(0, 1, plain), (1, 0.5, controlled)]:
        with Image.open(out / "cells" / f"euler-3-cfg5-none-control{scale}-0-{end}-seed0.png") as cell:
            want = pipe(Settings(prompt=PROMPTS[0], width=64, height=64, steps=3, cfg=5.0, sampler="euler", seed=0,
                                 **({"control_images": [tmp_path / "edges.png"], "control_end": end}
                                    if pipe is controlled else {})), progress=False)[0]
            assert np.array_equal(np.asarray(cell.convert("RGB"))[:, :64], np.asarray(want)), (scale, end)
