"""IP-Adapter equals diffusers on the same random weights: the CLIP vision encoder equals transformers'
CLIPVisionModelWithProjection and its preprocessing CLIPImageProcessor (float32, <= 1e-5), and the images equal
StableDiffusionXLPipeline's with load_ip_adapter (per image mean |diff| <= 0.5, max <= 4 of 255), base and plus,
alone and beside a ControlNet; an adapter without its encoder, or for SD 1.5, is refused in one sentence."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_controlnet import control_image, controlnets  # noqa: F401 (controlnets: a fixture)
from test_pipeline_parity import assert_close_images, files  # noqa: F401 (files: a fixture)

from models.clip_vision import clip_pixels, load_image_encoder
from models.files import LoadError
from models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attentions, load_image_prompt
from models.loading import load
from sampling.pipeline import Pipeline, Settings

ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=224,
               patch_size=14, projection_dim=48, hidden_act="gelu")


@pytest.fixture(scope="module")
def ip_files(files):
    """files/ip/image_encoder (transformers' tiny CLIP vision model) beside a base and a plus IP-Adapter for the tiny
    UNet, in the h94 files' layout, every weight random."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).save_pretrained(files / "ip" / "image_encoder")
    unet = load(files / "tiny.safetensors").unet
    widths = tuple(m.to_k.weight.shape[0] for m in cross_attentions(unet))
    for name, cfg in [("base", IPAdapterConfig(plus=False, image_dim=48, tokens=4, context_dim=96, widths=widths)),
                      ("plus", IPAdapterConfig(plus=True, image_dim=64, tokens=16, context_dim=96, widths=widths,
                                               resampler_dim=128, resampler_depth=4, resampler_heads=2))]:
        adapter = IPAdapter(cfg)
        with torch.no_grad():  # to_k_ip / to_v_ip large enough that the image visibly steers
            state = {n: t + (0.5 if "_ip" in n else 0.05) * torch.randn_like(t) for n, t in adapter.state_dict().items()}
        save_file({n: t.contiguous() for n, t in state.items()}, files / "ip" / f"{name}.safetensors")
    return files / "ip"


def reference_image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (150, 120, 3), dtype=np.uint8)).resize((300, 240))


def test_encoder_and_preprocessing_equal_transformers(ip_files):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    theirs = CLIPVisionModelWithProjection.from_pretrained(ip_files / "image_encoder").eval()
    ours = load_image_encoder(ip_files / "image_encoder")
    image = reference_image()
    pixels = CLIPImageProcessor(size=224, crop_size=224)(image, return_tensors="pt").pixel_values
    assert (clip_pixels(image) - pixels).abs().max() <= 1e-5, "preprocessing differs from CLIPImageProcessor"
    with torch.no_grad():
        expected = theirs(pixels, output_hidden_states=True)
        embeds, penultimate = ours(pixels)
    assert (embeds - expected.image_embeds).abs().max() <= 1e-5
    assert (penultimate - expected.hidden_states[-2]).abs().max() <= 1e-5


def reference_images(files, ip_files, s, kind, controlnet=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False)
    pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(ip_files / "image_encoder")
    pipe.feature_extractor = CLIPImageProcessor(size=224, crop_size=224)
    pipe.load_ip_adapter(str(ip_files), subfolder="", weight_name=f"{kind}.safetensors", image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(s.ip_scales[0])
    extra = {}
    if controlnet is not None:
        pipe = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet, add_watermarker=False)
        extra = {"image": s.control_images[0]}
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, ip_adapter_image=s.ip_images[0], width=s.width,
               height=s.height, num_inference_steps=s.steps, guidance_scale=s.cfg, num_images_per_prompt=s.num_images,
               generator=[torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)], **extra)
    return [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("kind, scale", [("base", 1.0), ("plus", 0.7)])
def test_images_equal_diffusers_ip_adapter(files, ip_files, kind, scale):
    s = Settings(prompt="1girl, solo", negative_prompt="blurry", steps=6, cfg=5.0, sampler="euler", seed=5,
                 num_images=2, width=64, height=64, ip_images=[reference_image()], ip_scales=[scale])
    pipe = Pipeline.load(files / "tiny.safetensors", ip_adapters=[ip_files / f"{kind}.safetensors"])
    ours = pipe(s, progress=False)
    assert_close_images(ours, reference_images(files, ip_files, s, kind), f"IP-Adapter {kind}")
    plain = Pipeline.load(files / "tiny.safetensors")(Settings(**{**s.__dict__, "ip_images": (), "ip_scales": ()}),
                                                      progress=False)
    change = np.abs(np.asarray(ours[0], np.int16) - np.asarray(plain[0], np.int16)).mean()
    assert change > 2, f"the IP-Adapter changed the image by only {change:.2f} of 255: the test would not see it"


def test_ip_adapter_with_a_controlnet_equals_diffusers(files, ip_files, controlnets):
    """The ControlNet sees the text context only, as diffusers' ControlNet pipeline gives it."""
    s = Settings(prompt="1girl", negative_prompt="", steps=6, cfg=5.0, sampler="euler", seed=9, width=64, height=64,
                 ip_images=[reference_image()], ip_scales=[0.8], control_images=[control_image(1)])
    pipe = Pipeline.load(files / "tiny.safetensors", ip_adapters=[ip_files / "base.safetensors"],
                         controlnets=[files / "controlnet1"])
    assert_close_images(pipe(s, progress=False), reference_images(files, ip_files, s, "base", controlnets[0]),
                        "IP-Adapter + ControlNet")


def test_refused(files, ip_files, tmp_path):
    unet = load(files / "tiny.safetensors").unet
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((ip_files / "base.safetensors").read_bytes())
    with pytest.raises(LoadError, match="needs its CLIP vision encoder"):
        load_image_prompt(lone, unet)
    sd15 = {"image_proj.proj.weight": torch.zeros(4 * 768, 1024), "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768)}
    save_file(sd15, tmp_path / "sd15.safetensors")
    with pytest.raises(LoadError, match="for SD 1.x"):
        load_image_prompt(tmp_path / "sd15.safetensors", unet)


@pytest.mark.parametrize("kind", ["base", "plus"])
def test_image_projection_equals_diffusers(files, ip_files, kind):
    """The projection alone (ImageProjection, or the plus Resampler) against diffusers' loaded one, <= 1e-5."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(files / "tiny", add_watermarker=False)
    pipe.load_ip_adapter(str(ip_files), subfolder="", weight_name=f"{kind}.safetensors", image_encoder_folder=None,
                         low_cpu_mem_usage=False)
    theirs = pipe.unet.encoder_hid_proj.image_projection_layers[0].eval()
    adapter, _ = load_image_prompt((ip_files / f"{kind}.safetensors", ip_files / "image_encoder"), load(
        files / "tiny.safetensors").unet)
    torch.manual_seed(2)
    features = torch.randn(2, 257, ENCODER["hidden_size"]) if kind == "plus" else torch.randn(2, ENCODER["projection_dim"])
    with torch.no_grad():
        want, got = theirs(features), adapter.image_proj(features)
    assert want.shape == got.shape and (want - got).abs().max() <= 1e-5 * max(1.0, want.abs().max())
