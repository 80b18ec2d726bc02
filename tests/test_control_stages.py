"""A ControlNet in every stage diffusers gives it: img2img (StableDiffusionXLControlNetImg2ImgPipeline), inpainting
(StableDiffusionXLControlNetInpaintPipeline) and the base of a base + refiner handoff (the ControlNet pipeline's
denoising_end, then the refiner without control, as diffusers runs it): images within mean 0.5 / max 4 of 255."""

import pytest
import torch
from test_controlnet import control_image
from test_image_conditioning import (  # noqa: F401 (files, theirs, ours: fixtures)
    QUICK,
    as_arrays,
    disc_mask,
    files,
    generators,
    ours,
    picture,
    reference,
    theirs,
    with_scheduler,
)
from test_pipeline_parity import assert_close_images

from sampling.pipeline import Pipeline, Settings

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def controlnet(files):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(files / "base" / "unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)).eval()
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_((1.5 if name.startswith("controlnet_") else 0.05) * torch.randn_like(p))
    net.save_pretrained(files / "controlnet")
    return net


def with_control(cls, files, net, s):
    pipe = reference(cls, files / "base", controlnet=net)
    return with_scheduler(pipe, s)


def test_img2img_with_a_controlnet_equals_diffusers(files, controlnet):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    init, ctl = picture(64, 64, 3), control_image(1)
    s = Settings(**QUICK, sampler="euler", seed=21, width=64, height=64, num_images=2, init_image=init, strength=0.7,
                 control_images=[ctl], control_scales=[0.8])
    got = Pipeline.load(files / "base.safetensors", controlnets=[files / "controlnet"])(s, progress=False)
    pipe = with_control(StableDiffusionXLControlNetImg2ImgPipeline, files, controlnet, s)
    want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, control_image=ctl, strength=0.7,
                num_inference_steps=s.steps, guidance_scale=s.cfg, num_images_per_prompt=2, generator=generators(s),
                controlnet_conditioning_scale=0.8).images
    assert_close_images(as_arrays(got), as_arrays(want), "img2img + ControlNet")


def test_inpainting_with_a_controlnet_equals_diffusers(files, controlnet):
    from diffusers import StableDiffusionXLControlNetInpaintPipeline

    init, mask, ctl = picture(64, 64, 5), disc_mask(64, 64), control_image(2)
    s = Settings(**QUICK, sampler="euler", seed=23, width=64, height=64, init_image=init, mask=mask, strength=0.9,
                 control_images=[ctl])
    got = Pipeline.load(files / "base.safetensors", controlnets=[files / "controlnet"])(s, progress=False)
    pipe = with_control(StableDiffusionXLControlNetInpaintPipeline, files, controlnet, s)
    want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, mask_image=mask, control_image=ctl,
                strength=0.9, num_inference_steps=s.steps, guidance_scale=s.cfg, generator=generators(s),
                width=64, height=64).images
    assert_close_images(as_arrays(got), as_arrays(want), "inpainting + ControlNet")


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.0, 0.5)])
def test_controlnet_base_then_refiner_equals_diffusers(files, theirs, controlnet, start, end):
    from diffusers import StableDiffusionXLControlNetPipeline

    ctl = control_image(1)
    s = Settings(**QUICK, sampler="euler_a", seed=25, width=64, height=64, num_images=2, refiner_start=0.8,
                 control_images=[ctl], control_start=start, control_end=end)
    base = Pipeline.load(files / "base.safetensors", controlnets=[files / "controlnet"])
    got = base(s, refiner=Pipeline.load(files / "refiner"), progress=False)
    gens = generators(s)
    pipe = with_control(StableDiffusionXLControlNetPipeline, files, controlnet, s)
    common = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps,
                  guidance_scale=s.cfg, num_images_per_prompt=2, generator=gens)
    latents = pipe(**common, image=ctl, denoising_end=0.8, output_type="latent", control_guidance_start=start,
                   control_guidance_end=end).images
    want = with_scheduler(theirs["refiner"], s)(**common, image=latents, denoising_start=0.8).images
    assert_close_images(as_arrays(got), as_arrays(want), f"ControlNet {start}-{end} base + refiner")
