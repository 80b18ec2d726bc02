"""The conditioning adapters from the command line: ControlNet, T2I-Adapter and IP-Adapter together write an image
whose PNG re-runs to the same pixels; each bad input is one line, exit 2, nothing written, before the model loads."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import control_image, controlnets  # noqa: F401 (a fixture)
from test_ip_adapter import ip_files, reference_image  # noqa: F401 (a fixture)
from test_pipeline_parity import files  # noqa: F401 (a fixture)
from test_robustness import generate, one_line_error
from test_t2i_adapter import adapters  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_images")
    control_image(1).save(root / "edges.png")
    control_image(2).convert("L").save(root / "sketch.png")
    reference_image().save(root / "reference.png")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(root / "depth16.png")  # a 16-bit grey PNG (I;16)
    control_image(1, 96).crop((0, 0, 96, 48)).save(root / "wide.png")
    control_image(1, 4).save(root / "tiny.png")
    return root


def test_all_three_write_an_image_that_reruns_from_its_png(files, controlnets, adapters, ip_files, images, tmp_path,
                                                           capsys):
    out = tmp_path / "out"
    code, err = generate(capsys, "--model", files / "tiny.safetensors", "--prompt", "1girl", "--steps", 4,
                         "--controlnet", f"{files / 'controlnet1'}:0.7", "--control-image", images / "edges.png",
                         "--control-end", 0.75, "--adapter", f"{files / 'adapter2'}:0.5", "--adapter-image",
                         images / "sketch.png", "--ip-adapter", f"{ip_files / 'plus.safetensors'}:0.6", "--ip-image",
                         images / "reference.png", "--out", out)
    assert code == 0, err
    [first] = sorted(out.glob("*.png"))
    parameters = Image.open(first).info["parameters"]
    for recorded in ("ControlNet 0: \"Model: controlnet1, Weight: 0.7", "Control end: 0.75", "T2I-Adapters:",
                     "IP-Adapters:"):
        assert recorded in parameters, parameters
    code, err = generate(capsys, "--from-png", first, "--out", out)
    assert code == 0, err
    second = sorted(out.glob("*.png"))[1]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    code, err = generate(capsys, "--from-png", first, "--controlnet", files / "controlnet2", "--control-image",
                         images / "edges.png", "--out", out)  # a flag replaces what the PNG recorded
    assert code == 0, err
    third = sorted(out.glob("*.png"))[2]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(third)))


def test_bad_inputs_are_one_line_and_write_nothing(files, controlnets, adapters, ip_files, images, tmp_path, capsys):
    from diffusers import ControlNetModel

    ControlNetModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    cross_attention_dim=768, layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
                    conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "sd15")
    lone = tmp_path / "lone" / "ip.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((ip_files / "base.safetensors").read_bytes())
    out = tmp_path / "out"
    base = ["--model", files / "tiny.safetensors", "--prompt", "1girl", "--steps", 2, "--out", out]
    cn = ["--controlnet", files / "controlnet1"]
    cases = [
        (cn, "1 ControlNet(s) and 0 image(s)"),
        (cn + ["--control-image", images / "wide.png", "--width", 64, "--height", 64], "another shape"),
        (cn + ["--control-image", images / "depth16.png"], "I;16 image"),
        (cn + ["--control-image", images / "missing.png"], "does not exist"),
        (["--controlnet", tmp_path / "sd15", "--control-image", images / "edges.png"], "for SD 1.5, not SDXL"),
        (cn + ["--control-image", images / "edges.png", "--control-start", 0.8, "--control-end", 0.2],
         "0 <= start < end <= 1"),
        (["--adapter", files / "adapter1", "--adapter-image", images / "edges.png", "--width", 72], "multiples of 16"),
        (["--ip-adapter", lone, "--ip-image", images / "reference.png"], "needs its CLIP vision encoder"),
        (["--ip-adapter", ip_files / "base.safetensors"], "1 IP-Adapter(s) and 0 image(s)"),
        (cn + ["--control-image", images / "tiny.png"], "at least 16x16"),
        (cn + ["--control-image", images / "edges.png", "--control-type", "canny", "--control-type", "depth"],
         "2 --control-type for 1 ControlNet"),
        (cn + ["--control-image", images / "edges.png", "--control-type", "canny"], "is for a ControlNet-Union"),
        (["--adapter", files / "adapter1", "--adapter-image", images / "edges.png", "--hires-scale", 1.5],
         "with the hi-res fix are not supported"),
    ]
    for flags, fragment in cases:
        code, err = generate(capsys, *base, *flags)
        one_line_error(err, code, fragment)
        assert not out.exists() or not any(out.iterdir()), f"{fragment}: something was written"


def test_a_controlnet_is_refused_for_the_refiner_shape(files, controlnets):
    """A ControlNet copied from a base cannot steer a UNet of another context width (a refiner's)."""
    from models.controlnet import load_controlnet
    from models.files import LoadError
    from models.unet import TINY_REFINER

    with pytest.raises(LoadError, match="made for this model family"):
        load_controlnet(files / "controlnet1", TINY_REFINER)


def test_instruments_reach_the_controlnet_and_the_image_prompt_attention(files, controlnets, ip_files, images):
    from sampling.instruments import attention_maps, tap
    from sampling.pipeline import Pipeline, Settings

    pipe = Pipeline.load(files / "tiny.safetensors", controlnets=[files / "controlnet1"],
                         ip_adapters=[ip_files / "base.safetensors"])
    s = Settings(prompt="1girl", steps=3, sampler="euler", width=64, height=64, control_images=[images / "edges.png"],
                 ip_images=[images / "reference.png"])
    with tap(pipe.model, "controlnets.0.middle_block_out") as taps, \
            attention_maps(pipe.model, "ip_adapters.0.ip_adapter.1") as maps:
        pipe(s, progress=False)
    by_step = taps["controlnets.0.middle_block_out"]
    assert sorted(by_step) == [0, 1, 2] and all(t.shape[0] == 2 for t in by_step.values())  # [uncond, cond] per step
    probs = maps["ip_adapters.0.ip_adapter.1"]
    assert sorted(probs) == [0, 1, 2] and probs[0].shape[-1] == 4  # the base adapter's four image tokens
    assert torch.allclose(probs[0].float().sum(-1), torch.ones(1), atol=1e-2)


def test_a_tap_on_a_controlnet_is_checked_before_the_load(files, controlnets, images, tmp_path, capsys):
    common = ["--model", files / "tiny.safetensors", "--prompt", "1girl", "--steps", 2, "--out", tmp_path / "out",
              "--controlnet", files / "controlnet1", "--control-image", images / "edges.png"]
    code, err = generate(capsys, *common, "--tap", "controlnets.0.middle_block_out", "--tap-out", tmp_path / "a.st")
    assert code == 0, err
    code, err = generate(capsys, *common, "--tap", "controlnets.1.*", "--tap-out", tmp_path / "b.st")
    one_line_error(err, code, "matches no module")


def test_offload_with_a_controlnet_is_refused_from_python(files, controlnets, images):
    from sampling.pipeline import Pipeline, Settings

    pipe = Pipeline.load(files / "tiny.safetensors", controlnets=[files / "controlnet1"])
    pipe.offload = "meta"  # any device other than the ControlNet's (CUDA in real use)
    with pytest.raises(ValueError, match="offload with ControlNets or adapters is not supported yet"):
        pipe(Settings(prompt="1girl", steps=2, control_images=[images / "edges.png"]), progress=False)
