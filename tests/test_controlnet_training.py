"""task="controlnet" in the DreamBooth loop: the control maps are cropped and flipped with their images, a fresh
ControlNet changes nothing at first, only it trains (the UNet stays bit-identical), two processes equal one,
SIGKILL + resume is bit-identical, the export loads in plainxl and in diffusers, validation logs a triptych, and
bad configs and data are one line each."""

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_dreambooth import args, final_state, finish, losses, run, setup, weights_apart  # noqa: F401 (setup: a fixture)
from test_robustness import one_line_error

from data.dreambooth import ImageFolder
from models.controlnet import controlnet_from_unet, load_controlnet
from models.loading import load
from train.dreambooth import main
from train.losses import TrainStep

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def controls(setup):
    """Each instance image's control map: the image itself, so that alignment can be read off the pixels."""
    folder = setup / "controls"
    if not folder.exists():
        folder.mkdir()
        for image in (setup / "instance").glob("*.png"):
            shutil.copy(image, folder / image.name)
    return folder


def cn_args(setup, controls, out, **overrides):
    return args(setup, out, **{"task": "controlnet", "control_dir": controls, "prior_loss_weight": 0, **overrides})


def test_control_maps_are_cropped_and_flipped_with_their_images(setup, controls):
    images = ImageFolder(setup / "instance", "1girl", "instance_data_dir")
    images.placements = [SimpleNamespace(bucket=(48, 40), resized=(60, 48))] * len(images.paths)
    for seed in range(6):  # random crops, and flips about half the time
        e = images.example(0, False, True, torch.Generator().manual_seed(seed), controls=controls)
        assert e.control.shape == (3, 40, 48) and torch.allclose(e.control * 2 - 1, e.pixels, atol=1e-6)


def test_a_fresh_controlnet_adds_nothing_and_gets_gradients(setup):
    model = load(setup / "tiny.safetensors")
    torch.manual_seed(0)
    controlnet = controlnet_from_unet(model.unet)
    n = 2
    batch = dict(text=(torch.randint(0, 49408, (n, 77)), torch.randint(0, 49408, (n, 77))),
                 numbers=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * n), noisy=torch.randn(n, 4, 4, 4),
                 t=torch.tensor([10.0, 900.0]), target=torch.randn(n, 4, 4, 4), weight=torch.ones(n),
                 text_kept=torch.ones(n))
    plain = TrainStep(model)(**batch)
    controlled = TrainStep(model, controlnet=controlnet)(**batch, control=torch.rand(n, 3, 32, 32))
    assert torch.equal(plain, controlled), "zero convolutions at zero must leave the UNet's prediction as it is"
    controlled.sum().backward()
    assert controlnet.zero_convs[0][0].weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_two_processes_equal_one(setup, controls, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    finish(run(cn_args(setup, controls, one, batch_size=2)))
    finish(run(cn_args(setup, controls, two, batch_size=1), nproc=2))
    for ra, rb in zip(losses(one), losses(two), strict=True):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), f"step {ra['step']}: {ra} vs {rb}"
    model = load(setup / "tiny.safetensors")
    with torch.random.fork_rng():
        torch.manual_seed(3)  # the run's seed: attach_controlnet's draw
        start = {f"controlnet.{k}": v for k, v in controlnet_from_unet(model.unet).state_dict().items()}
    apart, moved = weights_apart(final_state(one, 4), final_state(two, 4), start)
    assert moved > 1e-3 and apart <= 0.05 * moved, f"weights differ by {apart:.2e}; training moved them {moved:.2e}"


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_and_only_the_controlnet_trains(setup, controls, tmp_path):
    from test_dreambooth import kill_at_first_checkpoint

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(run(cn_args(setup, controls, reference, max_steps=6, validation_prompt="1girl", validation_every=3,
                       class_steps=2)))
    kill_at_first_checkpoint(run(cn_args(setup, controls, killed, max_steps=6)), killed)
    finish(run(cn_args(setup, controls, killed, max_steps=6, resume="latest")))
    want, got = final_state(reference, 6), final_state(killed, 6)
    assert want.keys() == got.keys() and all(k.startswith(("param.controlnet.", "opt.", "rng.", "sched.", "scaler."))
                                             or not k.startswith("param.") for k in want)
    for k in want:
        if not k.startswith("rng."):
            assert torch.equal(want[k], got[k]), f"{k} differs after resume"
    exported = reference / "controlnet" / "diffusion_pytorch_model.safetensors"
    assert exported.read_bytes() == (killed / "controlnet" / "diffusion_pytorch_model.safetensors").read_bytes()
    from diffusers import ControlNetModel

    theirs = ControlNetModel.from_pretrained(reference / "controlnet")
    ours = load_controlnet(reference / "controlnet", load(setup / "tiny.safetensors").config.unet)
    assert set(load_file(exported)) == set(theirs.state_dict()) and len(list(ours.parameters())) > 0
    triptych = Image.open(reference / "validation" / "step-000006.png")
    assert triptych.size == (3 * 32, 32), "validation: control map | its image | the output"


@pytest.mark.parametrize("extra, fragment", [
    (dict(control_dir=None), "set task and control_dir together"),
    (dict(lora_rank=4), "leave lora_rank out"),
    (dict(train=["unet.*attn2*"]), "must name the ControlNet's parameters"),
])
def test_bad_config(setup, controls, tmp_path, capsys, extra, fragment):
    code = main(cn_args(setup, controls, tmp_path / "out", **extra))
    one_line_error(capsys.readouterr().err, code, fragment)
    assert not (tmp_path / "out").exists()


def test_missing_or_mismatched_control_maps(setup, controls, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(controls, partial)
    next(partial.glob("*.png")).unlink()
    wrong = tmp_path / "wrong"
    shutil.copytree(controls, wrong)
    first = sorted(wrong.glob("*.png"))[0]
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(first)
    for folder, fragment in [(partial, "has no control map"), (wrong, "give control maps of their images' sizes")]:
        code = main(cn_args(setup, folder, tmp_path / "out"))
        one_line_error(capsys.readouterr().err, code, fragment)
        assert not (tmp_path / "out").exists()
