"""EMA of the trained weights (train/ema.py): the average by hand, swapping in and out exactly, the export beside or
as the model (full and LoRA), SIGKILL + resume bit-identical with the average in the checkpoint, two processes equal
to one, and a resume that would change the EMA settings one line."""


import pytest
import torch
from safetensors.torch import load_file
from test_dreambooth import args, final_state, finish, killed_then_resumed, run, setup  # noqa: F401 (a fixture)

from train.config import ConfigError, TrainConfig
from train.dreambooth import main
from train.ema import EMA

pytestmark = pytest.mark.filterwarnings("ignore")
EMA_FIELDS = dict(ema_decay=0.5, ema_every=2, prior_loss_weight=0.0)


def test_the_average_by_hand_and_the_swap():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    ema = EMA([("w", weight)], decay=0.9, every=2)
    with torch.no_grad():
        weight.copy_(torch.tensor([3.0, 4.0]))
    ema.update(1)  # not an ema_every step
    assert torch.equal(ema.shadow[0], torch.tensor([1.0, 2.0]))
    ema.update(2)
    torch.testing.assert_close(ema.shadow[0], torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 4]))
    assert ema.shadow[0].dtype == torch.float32  # whatever the weights' dtype
    with ema.swapped():
        assert torch.equal(weight.detach(), ema.shadow[0].to(torch.bfloat16))
    assert torch.equal(weight.detach(), torch.tensor([3.0, 4.0], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="made without ema_decay"):
        EMA([("w", weight)], 0.9, 1).load({})


@pytest.mark.parametrize("fields, message", [
    (dict(ema_decay=1.0), "ema_decay must be a number between 0 and 1"),
    (dict(ema_every=5), "ema_every and ema_export apply with ema_decay"),
    (dict(ema_decay=0.9, ema_export="both"), "ema_export must be one of beside, model"),
])
def test_bad_ema_settings_are_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


@pytest.mark.slow
def test_the_export_beside_and_as_the_model(setup, tmp_path):  # noqa: F811
    from models.loading import load

    finish(run(args(setup, tmp_path / "beside", max_steps=4, **EMA_FIELDS)))
    trained, averaged = (load(tmp_path / "beside" / name).unet.state_dict()
                         for name in ("model.safetensors", "model-ema.safetensors"))
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)
    state = final_state(tmp_path / "beside", 4)
    ema_keys = [k for k in state if k.startswith("ema.")]
    assert ema_keys and all(state[k].dtype == torch.float32 for k in ema_keys)
    finish(run(args(setup, tmp_path / "model", max_steps=4, ema_export="model", **EMA_FIELDS)))
    as_model = load(tmp_path / "model" / "model.safetensors").unet.state_dict()
    assert all(torch.equal(as_model[k], averaged[k]) for k in averaged)
    assert not (tmp_path / "model" / "model-ema.safetensors").exists()
    finish(run(args(setup, tmp_path / "lora", max_steps=4, lora_rank=4, lr=1e-2, **EMA_FIELDS)))
    lora, lora_ema = (load_file(tmp_path / "lora" / name) for name in ("lora.safetensors", "lora-ema.safetensors"))
    assert lora.keys() == lora_ema.keys() and any(not torch.equal(lora[k], lora_ema[k]) for k in lora)


@pytest.mark.slow
def test_sigkill_then_resume_with_ema_is_bit_identical_and_ddp_equals_one(setup, tmp_path, capsys):  # noqa: F811
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(run(args(setup, reference, max_steps=6, **EMA_FIELDS)))
    killed_then_resumed(setup, killed, max_steps=6, **EMA_FIELDS)
    want, got = final_state(reference, 6), final_state(killed, 6)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want if not k.startswith("rng."))
    two = tmp_path / "two"
    finish(run(args(setup, two, max_steps=6, batch_size=1, **EMA_FIELDS), nproc=2))
    one = tmp_path / "one"
    finish(run(args(setup, one, max_steps=6, batch_size=2, **EMA_FIELDS)))
    a, b = final_state(one, 6), final_state(two, 6)
    # The average of two processes' weights is as close to one process's as those weights are (DDP sums gradients
    # in another order, so the weights themselves differ by float rounding).
    weights_apart = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("param."))
    ema_apart = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("ema."))
    assert ema_apart <= weights_apart + 1e-6 and weights_apart < 1e-3
    capsys.readouterr()
    assert main(args(setup, reference, max_steps=8, resume="latest", **(EMA_FIELDS | dict(ema_decay=0.9)))) == 2
    assert "was made with ema_decay=0.5, this run has 0.9" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_shards_the_average_and_resumes_it_bit_identically(setup, tmp_path):  # noqa: F811
    """parallel=zero: each of 2 processes keeps half the averaged tensors; the checkpoint, a validation image made
    from the average and the export gather it; a resume continues it bit for bit; one process agrees."""
    from models.loading import load

    fields = dict(EMA_FIELDS, train=["unet"], max_steps=4, validation_prompt="1girl", validation_every=2, class_steps=2)
    one, two, halves = tmp_path / "one", tmp_path / "two", tmp_path / "halves"
    finish(run(args(setup, one, batch_size=2, **fields)))
    finish(run(args(setup, two, batch_size=1, parallel="zero", **fields), nproc=2))
    finish(run(args(setup, halves, batch_size=1, parallel="zero", **(fields | dict(max_steps=2))), nproc=2))
    finish(run(args(setup, halves, batch_size=1, parallel="zero", resume="latest", **fields), nproc=2))
    a, b, c = final_state(one, 4), final_state(two, 4), final_state(halves, 4)
    assert {k for k in a if k.startswith("ema.")} == {k for k in b if k.startswith("ema.")} != set()
    assert all(torch.equal(b[k], c[k]) for k in b if not k.startswith("rng."))
    weights_apart = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("param."))
    assert max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("ema.")) <= weights_apart + 1e-6
    averaged = load(two / "model-ema.safetensors").state_dict()
    assert all(torch.equal(averaged[k.removeprefix("ema.")], b[k]) for k in b if k.startswith("ema."))
    assert (two / "validation" / "step-000004.png").exists()
