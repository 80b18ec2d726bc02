"""diffusers' own SDXL fast-test components (tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py,
get_dummy_components: a 2-level UNet of 2 and 4 channels with norm_num_groups 1, a 2-level VAE, so 2 pixels per
latent, both text encoders 32 wide with exact GELU and a 1000-token vocabulary, seeded as there) saved as a
diffusers folder and run through diffusers and through Pipeline.load: images within mean 0.5 / max 4 of 255.

Their tokenizer (hf-internal-testing/tiny-random-clip) is a hub download, so a small CLIP BPE vocabulary is
written here instead (byte symbols, a few merges, the specials last, EOS the largest id as in CLIP's); the
published expected slices depend on that tokenizer's ids and cannot be reproduced offline. Also here: VAEs of
another depth (diffusers' vae_scale_factor, 2 ** (levels - 1)) for text-to-image and inpainting."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_image_conditioning import as_arrays, disc_mask, picture
from test_pipeline_parity import assert_close_images

from models.diffusers_layout import save_diffusers
from models.sdxl import SDXL, TINY
from sampling.pipeline import Pipeline, Settings

PROMPT = "A painting of a squirrel eating a burger"  # the fast tests' prompt


def write_tokenizer(folder):
    """A CLIP BPE tokenizer with 520 ids: the 256 byte symbols, each with </w>, 6 merges, then BOS and EOS."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))  # byte-level BPE's stand-ins for the unprintable bytes (GPT-2's, CLIP's)
    symbols = [chr(b) if b in printable else chr(next(others)) for b in range(256)]
    merges = ["a i", "i n", "e r", "t h", "th e</w>", "in g</w>"]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def dummy_pipeline(tmp_path, time_cond_proj_dim=None, kind="base"):
    """get_dummy_components' models and scheduler, seeded as there, with the local tokenizer, as a diffusers
    folder -> (the folder, diffusers' pipeline read back from it). kind: "base" (the text-to-image test's), "img2img"
    (the img2img test's: a wider UNet, aesthetic score on) or "refiner" (that without CLIP-L)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = kind == "base"
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(2, 4) if base else (32, 64), layers_per_block=2, time_cond_proj_dim=time_cond_proj_dim,
        sample_size=32, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80 if base else 72, cross_attention_dim=32 if kind == "refiner" else 64,
        norm_num_groups=1 if base else 32)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, sample_size=128)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
                            hidden_act="gelu", projection_dim=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    tokenizer = write_tokenizer(tmp_path / "vocab")
    components = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet, scheduler=scheduler,
                      tokenizer=tokenizer, tokenizer_2=tokenizer)
    if kind == "refiner":
        components |= dict(text_encoder=None, tokenizer=None)
    cls = diffusers.StableDiffusionXLPipeline if base else diffusers.StableDiffusionXLImg2ImgPipeline
    pipe = cls(**components) if base else cls(**components, requires_aesthetics_score=True)
    folder = tmp_path / kind
    pipe.save_pretrained(folder)
    pipe = cls.from_pretrained(folder).to(torch.float32)  # as Pipeline.load reads it
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


def theirs(pipe, s, **extra):
    out = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps, guidance_scale=s.cfg,
               num_images_per_prompt=s.num_images, generator=[torch.Generator().manual_seed(s.seed + i)
                                                               for i in range(s.num_images)], **extra)
    return as_arrays(out.images)


def test_the_fast_test_components_give_diffusers_images(tmp_path):
    folder, pipe = dummy_pipeline(tmp_path)
    ours = Pipeline.load(folder)
    assert ours.model.config.vae.pixels_per_latent == 2 and ours.tokenizers[0].vocab_size == 520
    for s in [Settings(prompt=PROMPT, negative_prompt=None, steps=2, cfg=5.0, sampler="euler", seed=0),
              Settings(prompt=PROMPT, negative_prompt="blurry", steps=8, cfg=5.0, sampler="euler", seed=3, num_images=2)]:
        got = ours(s, progress=False)
        assert got[0].size == (64, 64)  # the default size: sample_size 32 x 2 pixels per latent
        assert_close_images(got, theirs(pipe, s), f"fast-test components, {s.steps} steps")
    # precomputed embeddings (diffusers' test_stable_diffusion_xl_prompt_embeds) give the same images
    s = Settings(prompt=PROMPT, negative_prompt="blurry", steps=4, cfg=5.0, sampler="euler", seed=1)
    embeds = dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
                      pipe.encode_prompt(PROMPT, negative_prompt="blurry")))
    from_embeds = ours(replace(s, prompt=None, negative_prompt=None, **embeds), progress=False)
    assert_close_images(from_embeds, theirs(pipe, s), "fast-test components from precomputed embeddings")


def test_the_fast_test_components_with_lcm_give_diffusers_images(tmp_path):
    """time_cond_proj_dim=256 and LCMScheduler, as test_stable_diffusion_xl_euler_lcm."""
    from diffusers import LCMScheduler

    folder, pipe = dummy_pipeline(tmp_path, time_cond_proj_dim=256)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    s = Settings(prompt=PROMPT, negative_prompt=None, steps=2, cfg=5.0, sampler="lcm", seed=0)
    assert_close_images(Pipeline.load(folder)(s, progress=False), theirs(pipe, s), "fast-test components, LCM")


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_gives_diffusers_images(tmp_path, clip_skip):
    """diffusers' clip_skip (hidden_states[-(k + 2)] of both encoders); no negative prompt, whose diffusers
    encodes at the penultimate layer whatever clip_skip says (zeros here, force_zeros_for_empty_prompt)."""
    folder, pipe = dummy_pipeline(tmp_path)
    ours = Pipeline.load(folder)
    s = Settings(prompt=PROMPT, steps=4, cfg=5.0, sampler="euler", seed=0, clip_skip=clip_skip)
    got = ours(s, progress=False)
    assert_close_images(got, theirs(pipe, s, clip_skip=clip_skip), f"clip skip {clip_skip}")
    assert not np.array_equal(np.asarray(got[0]), np.asarray(ours(replace(s, clip_skip=None), progress=False)[0]))
    with pytest.raises(ValueError, match="clip skip 4 is outside 0 .. 3"):
        ours(replace(s, clip_skip=4), progress=False)


@pytest.mark.parametrize("kind", ["img2img", "refiner"])
def test_the_img2img_and_refiner_only_components_give_diffusers_images(tmp_path, kind):
    """The img2img test's components (aesthetic score on; with and without CLIP-L), img2img at strength 0.8."""
    folder, pipe = dummy_pipeline(tmp_path, kind=kind)
    ours = Pipeline.load(folder)
    assert ours.requires_aesthetics_score and ours.is_refiner == (kind == "refiner")
    init = picture(32, 32, seed=3)
    for steps, seed in [(2, 0), (10, 4)]:
        s = Settings(prompt=PROMPT, negative_prompt="blurry", steps=steps, cfg=5.0, sampler="euler", seed=seed,
                     init_image=init, strength=0.8, aesthetic_score=7.0)
        want = theirs(pipe, s, image=init, strength=0.8, aesthetic_score=7.0)
        assert_close_images(ours(s, progress=False), want, f"{kind} components, img2img, {steps} steps")
    # Written out again (models.convert's path), the folder still says what it is.
    save_diffusers(ours.model, tmp_path / "again", tokenizers=ours.tokenizers)
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"] is True
    assert Pipeline.load(tmp_path / "again").requires_aesthetics_score


def test_a_second_stage_with_two_text_encoders_gives_diffusers_images(tmp_path):
    """diffusers' mixture-of-denoisers test: the base components for both stages (the img2img pipeline
    takes a model with two text encoders), the handover at denoising_end / denoising_start."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder, first = dummy_pipeline(tmp_path)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder).to(torch.float32)
    second.set_progress_bar_config(disable=True)
    s = Settings(prompt=PROMPT, negative_prompt="blurry", steps=10, cfg=5.0, sampler="euler", seed=2, num_images=2,
                 refiner_start=0.7)
    got = Pipeline.load(folder)(s, refiner=Pipeline.load(folder), progress=False)
    generators = [torch.Generator().manual_seed(s.seed + i) for i in range(2)]
    common = dict(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=10, guidance_scale=5.0,
                  num_images_per_prompt=2, generator=generators)
    latents = first(**common, denoising_end=0.7, output_type="latent").images
    want = as_arrays(second(**common, image=latents, denoising_start=0.7).images)
    assert_close_images(got, want, "base + a second stage with two text encoders")


@pytest.mark.parametrize("ch_mult, width, height", [((1, 2, 4), 40, 56), ((1, 2, 4, 8, 8), 64, 48)])
def test_a_vae_of_another_depth_gives_diffusers_images_and_sizes(tmp_path, ch_mult, width, height):
    """pixels per latent = 2 ** (levels - 1): 4 and 16 here. Text-to-image and inpainting equal diffusers'
    (whose vae_scale_factor reads the same config); a size the latents cannot make is one line."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    model = SDXL(replace(TINY, vae=replace(TINY.vae, ch_mult=ch_mult))).eval()
    with torch.no_grad():
        model.vae.decoder.conv_out.weight.mul_(0.3)  # images that are not saturated
    save_diffusers(model, tmp_path / "m")
    ours = Pipeline.load(tmp_path / "m")
    s = Settings(prompt="1girl, red eyes", negative_prompt="lowres", steps=6, cfg=5.0, sampler="euler_a", seed=2,
                 width=width, height=height)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "m", add_watermarker=False).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.vae_scale_factor == ours.model.config.vae.pixels_per_latent
    got = ours(s, progress=False)
    assert got[0].size == (width, height)
    assert_close_images(got, theirs(pipe, s, width=width, height=height), f"VAE {ch_mult}, text-to-image")

    init, mask = picture(width, height, seed=1), disc_mask(width, height)
    s = replace(s, init_image=init, mask=mask, strength=0.8)
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "m", add_watermarker=False).to(torch.float32)
    inpaint.set_progress_bar_config(disable=True)
    inpaint.scheduler = EulerAncestralDiscreteScheduler.from_config(inpaint.scheduler.config)
    want = theirs(inpaint, s, image=init, mask_image=mask, strength=0.8, width=width, height=height)
    assert_close_images(ours(s, progress=False), want, f"VAE {ch_mult}, inpainting")

    multiple = max(8, ours.model.config.vae.pixels_per_latent)
    if multiple > 8:
        with pytest.raises(ValueError, match=f"width {width + 8} is not a multiple of {multiple}"):
            ours(replace(s, init_image=None, mask=None, width=width + 8), progress=False)
