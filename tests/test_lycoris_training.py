"""LyCORIS kinds in the DreamBooth loop (lora_type = loha | lokr | dora, models/adapters.py): step 0 equal to the
base, the hooked adapters equal to their export merged by models/lora.py, the export loaded by the lycoris-lora
package itself (every module placed, its forward equal to our merge on the UNet and both text encoders), LoKr's
split of the dimensions equal to the package's, and a run through the loop whose --lora images equal its merged
model's."""

import copy

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_dreambooth import args, finish, run
from test_lora_training import EVERYTHING, setup, step_inputs  # noqa: F401 (setup is a fixture)
from test_pipeline_parity import tiny_model

from models import lora
from models.adapters import KOHYA_TARGETS, LoKr, add_adapters, factorization, kohya_metadata, save_adapters
from models.sdxl import TINY
from sampling.pipeline import Pipeline, Settings
from train.losses import TrainStep
from train.preflight import trainable_parameters

pytestmark = pytest.mark.filterwarnings("ignore")
KINDS = {  # a label: (lora_type, rank, conv rank, LoKr's factor)
    "loha": ("loha", 4, 2, -1),
    "lokr": ("lokr", 2, 2, -1),
    "lokr, factor 4, whole w2": ("lokr", 16, 16, 4),
    "dora": ("dora", 4, 2, -1),
}


def kind_on(model, label, patterns=None):
    kind, rank, conv_rank, factor = KINDS[label]
    patterns = patterns or KOHYA_TARGETS + ("unet.*.in_layers.2", "unet.*.op", "unet.*.skip_connection")
    allowed = {n for n, _ in trainable_parameters(model, EVERYTHING)}
    return add_adapters(model, patterns, rank, 2.0 * rank, conv_rank, allowed, seed=1, kind=kind, factor=factor)


def randomise(adapters):
    """Random values in every factor (several start at zero); DoRA's magnitude moved off |W|."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in adapters.values():
            for name, p in a.named_parameters():
                p.copy_(p * (1 + 0.1 * torch.rand(p.shape, generator=generator)) if name == "magnitude"
                        else torch.randn(p.shape, generator=generator) * 0.2)


def test_factorization_equals_the_packages():
    from lycoris.functional.general import factorization as theirs

    for factor in (-1, 2, 4, 5, 8, 16):
        for dimension in list(range(1, 400)) + [640, 1280, 2048, 2560, 5120, 10240]:
            assert factorization(dimension, factor) == theirs(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("label", list(KINDS))
def test_step_zero_equals_the_base_and_adapters_equal_their_merged_export(tmp_path, label):
    model, base = tiny_model(), tiny_model()
    adapters = kind_on(model, label)
    inputs = step_inputs()
    zero, flat = TrainStep(model, adapters)(**vars(inputs)), TrainStep(base)(**vars(inputs))
    if label == "dora":  # W g / |W| with g = |W|: the base up to float rounding
        torch.testing.assert_close(zero, flat, rtol=1e-6, atol=1e-6)
    else:  # a zero factor: exactly the base
        assert torch.equal(zero, flat)
    randomise(adapters)
    file = tmp_path / "l.safetensors"
    save_adapters(adapters, file, torch.float32, kohya_metadata(adapters, "sdxl_base_v1-0", "x", KINDS[label][3]))
    merged = copy.deepcopy(base)
    assert lora.merge_lora(merged, file) == len(adapters)
    with torch.no_grad():
        hooked, plain = (TrainStep(m)(**vars(inputs)) for m in (model, merged))
        context = [m.text_encoder_2(inputs.text[1])[0] for m in (model, merged, base)]
    assert (hooked - flat).abs().max() > 1e-2 and (context[0] - context[2]).abs().max() > 1e-2  # they do something
    torch.testing.assert_close(plain, hooked, rtol=0, atol=1e-5)
    torch.testing.assert_close(context[1], context[0], rtol=0, atol=1e-5)  # bigG's q/k/v written apart, exactly
    with safe_open(file, "pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya" and KINDS[label][0].replace("dora", "lora") in meta["ss_network_args"]
    ending = {"loha": ".hada_w2_b", "lokr": ".lokr_w1", "dora": ".dora_scale"}[KINDS[label][0]]
    assert sum(n.endswith(ending) for n in names) == len(adapters)


class Encoders(torch.nn.Module):
    """A model whose module names, under lycoris-lora's prefix "lora", are kohya's: lora_unet_…, lora_te1_…, and
    lora_te2_text_model_… on transformers' bigG (separate q, k, v, as LyCORIS files name them)."""

    def __init__(self, model, bigG):
        super().__init__()
        self.unet, self.te1, self.te2 = model.unet, model.text_encoder_1, bigG


@pytest.mark.parametrize("label", list(KINDS))
def test_the_export_loads_in_lycoris_lora_equal_to_our_merge(tmp_path, monkeypatch, label):
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights
    from transformers import CLIPTextModelWithProjection

    from models.diffusers_layout import save_diffusers

    model = tiny_model()
    adapters = kind_on(model, label)
    randomise(adapters)
    file = tmp_path / "l.safetensors"
    save_adapters(adapters, file, torch.float32, kohya_metadata(adapters, "sdxl_base_v1-0", "x"))
    theirs, ours = tiny_model(), tiny_model()
    lora.merge_lora(ours, file)
    encoders = {}
    for name, m in (("theirs", theirs), ("ours", ours)):
        save_diffusers(m, tmp_path / name)
        encoders[name] = CLIPTextModelWithProjection.from_pretrained(tmp_path / name / "text_encoder_2").eval()
    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora")
    network, _ = create_lycoris_from_weights(1.0, str(file), Encoders(theirs, encoders["theirs"]))
    assert len(network.loras) == len(adapters)  # every module placed
    network.apply_to()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (2, 77), generator=g)
    latents, t, context, y = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]),
                              torch.randn(2, 77, TINY.unet.context_dim, generator=g), torch.randn(2, TINY.unet.adm_in_channels, generator=g))
    with torch.no_grad():
        unet = [m.unet(latents, t, context, y) for m in (theirs, ours, tiny_model())]
        te1 = [m.text_encoder_1(ids)[0] for m in (theirs, ours)]
        te2 = [encoders[name](ids, output_hidden_states=True).hidden_states[-2] for name in ("theirs", "ours")]
    for what, (a, b) in {"UNet": unet[:2], "CLIP-L": te1, "bigG": te2}.items():
        error = ((b - a).norm() / a.norm()).item()
        assert error <= 1e-5, f"{label}, {what}: relative error {error:.2e}"
    assert (unet[1] - unet[2]).abs().max() > 1e-2  # the adapters do something


def test_a_lokr_whole_w2_exports_alpha_equal_to_its_rank():
    """LyCORIS sets alpha to the rank when neither factor is split (scale 1); so do we, and the loader agrees."""
    adapter = LoKr(torch.zeros(64, 32), rank=16, alpha=4.0, factor=4)
    assert adapter.whole and adapter.alpha == 16 and adapter.w2.shape == (16, 8)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_a_run_of_each_kind_gives_the_images_of_its_merged_model(setup, tmp_path, kind):  # noqa: F811
    out = tmp_path / kind
    finish(run(args(setup, out, lora_rank=4, lora_conv_rank=2, lora_type=kind, lr=2e-2, max_steps=2, merge_lora=True)))
    s = Settings(prompt="1girl, sks", width=64, height=64, steps=6, sampler="euler", seed=4)
    with_file = Pipeline.load(setup / "tiny.safetensors", loras=[(out / "lora.safetensors", 1.0)])(s, progress=False)[0]
    merged = Pipeline.load(out / "model.safetensors")(s, progress=False)[0]
    plain = Pipeline.load(setup / "tiny.safetensors")(s, progress=False)[0]
    assert np.array_equal(np.asarray(with_file), np.asarray(merged))
    assert not np.array_equal(np.asarray(with_file), np.asarray(plain))  # it trained
    with safe_open(out / "lora.safetensors", "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
