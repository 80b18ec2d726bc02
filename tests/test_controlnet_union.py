"""ControlNet-Union (xinsir's, diffusers' ControlNetUnionModel) on the same random weights: the residuals equal
diffusers' (float32, <= 1e-5) for a batch of different latents (its condition transformer attends across the batch,
which is reproduced), plain and in guess mode, and the images equal StableDiffusionXLControlNetUnionPipeline's
(mean <= 0.5, max <= 4 of 255) for one condition and for two kinds of image through the same file."""

import inspect

import numpy as np
import pytest
import torch
from test_controlnet import control_image
from test_pipeline_parity import SCHEDULERS, assert_close_images, files  # noqa: F401 (files: a fixture)

from models.conditioning import vector_condition
from models.controlnet import load_controlnet
from models.unet import TINY
from sampling.pipeline import Pipeline, Settings

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def union(files):
    """diffusers' ControlNetUnionModel for the tiny UNet (its condition width the UNet's 32 channels), its encoder
    copied from the UNet, every weight perturbed; saved as files/union."""
    from diffusers import ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(files / "tiny" / "unet")
    wanted = inspect.signature(ControlNetUnionModel.__init__).parameters
    net = ControlNetUnionModel(**{k: v for k, v in unet.config.items() if k in wanted},
                               conditioning_embedding_out_channels=(16, 32, 96, 256), num_trans_channel=32,
                               num_proj_channel=32, num_control_type=8).eval()
    net.load_state_dict(unet.state_dict(), strict=False)
    torch.manual_seed(6)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_((1.5 if name.startswith(("controlnet_", "spatial")) else 0.05) * torch.randn_like(p))
    net.save_pretrained(files / "union")
    return net


@pytest.mark.parametrize("guess_mode", [False, True])
def test_residuals_equal_controlnetunionmodel(files, union, guess_mode):
    ours = load_controlnet(files / "union", TINY)
    assert ours.controlnet_config.control_types == 8
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 700.0])
    context, pooled = torch.randn(2, 77, TINY.context_dim), torch.randn(2, 48)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    hint, kind = torch.rand(1, 3, 64, 64).expand(2, -1, -1, -1), 3  # canny
    one_hot = torch.zeros(2, 8).index_fill_(1, torch.tensor([kind]), 1)
    with torch.no_grad():
        down, mid = union(x, t, context, [hint], one_hot, [kind], [0.7], guess_mode=guess_mode, return_dict=False,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        got = ours(x, t, context, vector_condition(pooled, time_ids, TINY.micro_cond_dim), hint, 0.7, guess_mode, kind)
    for i, (a, b) in enumerate(zip(got, [*down, mid], strict=True)):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max()), f"residual {i} differs"


def reference(files, nets, s: Settings, kinds):
    import diffusers
    from diffusers import StableDiffusionXLControlNetUnionPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False)
    components = {k: v for k, v in base.components.items()}
    pipe = StableDiffusionXLControlNetUnionPipeline(**components, controlnet=nets if len(nets) > 1 else nets[0],
                                                    add_watermarker=False)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[s.sampler]).from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    multi = len(nets) > 1
    out = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps, guidance_scale=s.cfg,
               control_image=list(s.control_images), control_mode=kinds, width=s.width, height=s.height,  # (it nests them)
               controlnet_conditioning_scale=list(s.control_scales) if multi else s.control_scales[0],
               num_images_per_prompt=s.num_images,
               generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)])
    return [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("types", [("canny",), ("canny", "depth")], ids=["one", "two kinds"])
def test_images_equal_the_union_pipeline(files, union, types):
    kinds = {"canny": 3, "depth": 1}
    s = Settings(prompt="1girl", negative_prompt="blurry", steps=6, cfg=5.0, sampler="euler", seed=4, num_images=2,
                 width=64, height=64, control_images=[control_image(i + 1) for i in range(len(types))],
                 control_scales=[0.8, 0.6][:len(types)], control_types=types)
    pipe = Pipeline.load(files / "tiny.safetensors", controlnets=[files / "union"] * len(types))
    assert len({id(c) for c in pipe.controlnets}) == 1, "one file given twice is one module"
    assert_close_images(pipe(s, progress=False), reference(files, [union] * len(types), s, [kinds[t] for t in types]),
                        f"ControlNet-Union {types}")


def test_a_union_without_its_type_is_refused(files, union):
    s = Settings(prompt="1girl", steps=2, width=64, height=64, control_images=[control_image(1)])
    with pytest.raises(ValueError, match="needs to be told what its control image is"):
        Pipeline.load(files / "tiny.safetensors", controlnets=[files / "union"])(s, progress=False)
