"""The regularisers (train/regularisers.py, kohya's fields): pyramid noise, input perturbation, debiased estimation,
the scheduled pseudo-Huber losses, masked loss, v-parameterization with zero terminal SNR, and LoRA+ — each against
its formula by hand, off by default, and bad combinations one line."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_dreambooth import args, finish, run, setup  # noqa: F401 (setup is a fixture)

from data.dreambooth import ImageFolder
from models.loading import load
from models.tokenizer import load_tokenizers
from sampling.schedule import alphas_cumprod
from train.batches import make_batch
from train.config import ConfigError, TrainConfig
from train.losses import TrainStep
from train.regularisers import elementwise_loss, huber_thresholds, loss_weights, pyramid_noise

pytestmark = pytest.mark.filterwarnings("ignore")


def neighbour_correlation(x):
    return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])


def test_pyramid_noise_is_unit_variance_and_low_frequency():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 64, 64, generator=g)
    pyramid = pyramid_noise(base.clone(), 6, 0.8, torch.Generator().manual_seed(1))
    assert abs(float(pyramid.std()) - 1) < 1e-5
    assert neighbour_correlation(base) < 0.05 < neighbour_correlation(pyramid)  # coarse levels: neighbours agree
    again = pyramid_noise(base.clone(), 6, 0.8, torch.Generator().manual_seed(1))
    assert torch.equal(pyramid, again)  # a function of the sample's generator alone


def test_loss_weights_and_huber_thresholds_by_hand():
    config = TrainConfig(debiased_estimation_loss=True)
    alpha_bars = alphas_cumprod()
    t = torch.tensor([10, 500, 990])
    a = alpha_bars[t][:, None, None, None]
    snr = alpha_bars[t] / (1 - alpha_bars[t])
    torch.testing.assert_close(loss_weights(config, a, False, t), 1 / snr.clamp(max=1000).sqrt())
    torch.testing.assert_close(loss_weights(config, a, True, t), 1 / (snr.clamp(max=1000) + 1))
    both = loss_weights(replace(config, snr_gamma=5.0), a, False, t)
    torch.testing.assert_close(both, torch.minimum(snr, torch.tensor(5.0)) / snr / snr.clamp(max=1000).sqrt())
    assert torch.equal(loss_weights(TrainConfig(), a, False, t), torch.ones(3))  # off by default
    assert huber_thresholds(TrainConfig(), t, alpha_bars) is None
    c = {s: huber_thresholds(TrainConfig(loss_type="huber", huber_schedule=s, huber_c=0.2), t, alpha_bars)
         for s in ("constant", "exponential", "snr")}
    torch.testing.assert_close(c["constant"], torch.full((3,), 0.2))
    torch.testing.assert_close(c["exponential"], 0.2 ** (t / 1000))
    sigma = ((1 - alpha_bars[t]) / alpha_bars[t]).sqrt()
    torch.testing.assert_close(c["snr"], 0.8 / (1 + sigma) ** 2 + 0.2)


def test_the_pseudo_huber_losses():
    d = torch.tensor([1e-3, 0.5, 30.0]).reshape(3, 1, 1, 1)
    c = torch.tensor([0.1, 0.1, 0.1])
    huber, smooth = elementwise_loss(d, "huber", c).flatten(), elementwise_loss(d, "smooth_l1", c).flatten()
    torch.testing.assert_close(huber, 2 * 0.1 * (torch.sqrt(d.flatten() ** 2 + 0.01) - 0.1))
    assert abs(huber[0] / d.flatten()[0] ** 2 - 1) < 1e-2 and abs(huber[2] / (0.2 * 30) - 1) < 0.01  # ~d^2, ~2c|d|
    torch.testing.assert_close(smooth, huber / 0.1)
    assert torch.equal(elementwise_loss(d, "l2", None), d**2)


def test_input_perturbation_moves_the_input_not_the_target(setup):  # noqa: F811
    model = load(setup / "tiny.safetensors")
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks")}
    plain = TrainConfig(batch_size=3, resolution=32, prior_loss_weight=0.0, center_crop=True, random_flip=False)
    batches = [make_batch(c, data, model, load_tokenizers(), alphas_cumprod(), 4, 0, "cpu")
               for c in (plain, replace(plain, ip_noise_gamma=0.1))]
    assert torch.equal(batches[0].target, batches[1].target) and not torch.equal(batches[0].noisy, batches[1].noisy)
    a = alphas_cumprod()[batches[0].t.long()][:, None, None, None]
    perturbation = (batches[1].noisy - batches[0].noisy) / (1 - a).sqrt()
    assert 0.08 < float(perturbation.std()) < 0.12  # gamma times unit noise


def test_masked_loss_weights_by_the_alpha_channel(setup, tmp_path):  # noqa: F811
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3], rgba[:, 16:, 3] = 128, 255  # the right half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    model = load(setup / "tiny.safetensors")
    config = TrainConfig(batch_size=1, resolution=32, prior_loss_weight=0.0, center_crop=True, random_flip=False,
                         masked_loss=True)
    batch = make_batch(config, {"instance": ImageFolder(tmp_path, "x")}, model, load_tokenizers(), alphas_cumprod(),
                       0, 0, "cpu")
    assert batch.mask.shape == (1, 1, 4, 4) and batch.mask[..., :2].max() == 0 and batch.mask[..., 2:].min() == 1
    from models.conditioning import vector_condition

    with torch.no_grad():
        masked = TrainStep(model)(**vars(batch))
        context, pooled = model.encode_text(*batch.text)
        prediction = model.unet(batch.noisy, batch.t, context, vector_condition(pooled, batch.numbers, 16))
    by_hand = ((prediction - batch.target) ** 2 * batch.mask).mean()  # not divided by the mask's area (kohya)
    torch.testing.assert_close(masked[0], by_hand, rtol=1e-6, atol=0)


def test_loraplus_gives_up_weights_their_own_lr():
    from models.adapters import KOHYA_TARGETS, add_adapters
    from models.sdxl import SDXL, TINY
    from train.optim import make_optimizer, param_groups

    adapters = add_adapters(SDXL(TINY), KOHYA_TARGETS, 4, 4)
    named = [(f"lora.{n}", p) for n, p in adapters.named_parameters()]
    config = TrainConfig(lora_rank=4, lr=1e-4, loraplus_lr_ratio=16.0)
    optimizer = make_optimizer(config, param_groups(config, named))
    low, high = optimizer.param_groups
    assert (low["lr"], high["lr"]) == (1e-4, 1.6e-3) and len(high["params"]) == len(low["params"]) == len(adapters)
    ups = {id(a.up.weight) for a in adapters.values()}
    assert {id(p) for p in high["params"]} == ups


@pytest.mark.parametrize("fields, message", [
    (dict(zero_terminal_snr=True), "zero_terminal_snr needs v_parameterization=True"),
    (dict(mask_dir="m"), "mask_dir needs masked_loss=True"),
    (dict(loraplus_lr_ratio=16.0), "loraplus_lr_ratio is for LoRA runs"),
    (dict(lora_rank=4, lora_type="loha", loraplus_lr_ratio=16.0), "lora_type loha / lokr"),
    (dict(loss_type="l1"), "loss_type must be one of l2, huber, smooth_l1"),
    (dict(multires_noise_discount=1.5), "multires_noise_discount must be a number at least 0 and at most 1"),
])
def test_bad_regulariser_settings_are_one_line(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**fields)


@pytest.mark.slow
def test_v_parameterization_with_zero_terminal_snr_exports_a_v_prediction_model(setup, tmp_path):  # noqa: F811
    from safetensors import safe_open

    out = tmp_path / "v"
    finish(run(args(setup, out, v_parameterization=True, zero_terminal_snr=True, prior_loss_weight=0.0, max_steps=2,
                    multires_noise_iterations=4, ip_noise_gamma=0.05, debiased_estimation_loss=True, loss_type="huber")))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys())
    model = load(out / "model.safetensors")
    assert model.config.prediction_type == "v_prediction" and model.config.zero_terminal_snr
    assert math.isfinite(sum(p.float().sum().item() for p in model.unet.parameters()))
