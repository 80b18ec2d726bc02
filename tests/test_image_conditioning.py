"""Image-conditioned generation against diffusers' pipelines on small random models, PNG pixels within
mean 0.5 / max 4 (of 255): img2img (StableDiffusionXLImg2ImgPipeline), inpainting with a 4- and a
9-channel UNet (StableDiffusionXLInpaintPipeline), the base + refiner handoff (denoising_end /
denoising_start with the same generators, continued) and the refiner alone. The hi-res fix against its
two passes done by hand."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_parity import SCHEDULERS, assert_close_images, tiny_model

from models.diffusers_layout import save_diffusers
from models.loading import load, save_single_file
from models.sdxl import SDXL, TINY, TINY_REFINER
from sampling.images import latent_mask, mask_pixels, pixels, upscale_images, upscale_latents
from sampling.pipeline import Pipeline, Settings
from sampling.schedule import make_schedule

QUICK = dict(prompt="1girl, red eyes", negative_prompt="lowres", steps=10, cfg=5.0)


def picture(width, height, seed=0):
    """A smooth RGB test picture (gradients plus a little noise), so the VAE sees structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 12, (height, width, 3)) + 20
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def disc_mask(width, height):
    """White (repaint) disc in the middle, black elsewhere, with a soft edge that binarizing must cut."""
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot(x - width / 2, y - height / 2) / (min(width, height) / 3)
    return Image.fromarray((255 * (1 - r).clip(0, 1) ** 0.3).astype(np.uint8), "L").convert("RGB")


def with_scheduler(pipe, s: Settings):
    """pipe with s's sampler, from the folder's saved scheduler config."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[s.sampler])
    pipe.scheduler = cls.from_config(pipe.saved_scheduler_config, **({"use_karras_sigmas": True} if s.karras else {}))
    return pipe


def generators(s: Settings):
    return [torch.Generator().manual_seed(s.seed + i) for i in range(s.num_images)]


def as_arrays(images):
    return [np.asarray(im) for im in images]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny base, a tiny refiner sharing its VAE (as SDXL's do) and a 9-channel inpainting UNet on the
    base's other components, each as a single file and a diffusers folder."""
    root = tmp_path_factory.mktemp("conditioning")
    base = tiny_model()
    torch.manual_seed(1)
    refiner = SDXL(TINY_REFINER).eval()
    refiner.vae.load_state_dict(base.vae.state_dict())
    torch.manual_seed(2)
    inpainting = SDXL(replace(TINY, unet=replace(TINY.unet, in_channels=9))).eval()
    inpainting.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("unet.")}, strict=False)
    for name, model in [("base", base), ("refiner", refiner), ("inpainting", inpainting)]:
        save_single_file(model, root / f"{name}.safetensors")
        save_diffusers(model, root / name)
    return root


def reference(cls, folder, **kwargs):
    pipe = cls.from_pretrained(folder, add_watermarker=False, **kwargs).to(torch.float32)
    pipe.saved_scheduler_config = dict(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def theirs(files):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    base = reference(StableDiffusionXLPipeline, files / "base")
    return {
        "base": base,
        "img2img": reference(StableDiffusionXLImg2ImgPipeline, files / "base", requires_aesthetics_score=False),
        "inpaint": reference(StableDiffusionXLInpaintPipeline, files / "base"),
        "inpainting model": reference(StableDiffusionXLInpaintPipeline, files / "inpainting"),
        "refiner": reference(StableDiffusionXLImg2ImgPipeline, files / "refiner"),  # its model_index: aesthetics on
    }


@pytest.fixture(scope="module")
def ours(files):
    return {f"{name} {layout}": Pipeline.load(files / (name + suffix))
            for name in ("base", "refiner", "inpainting") for layout, suffix in [("file", ".safetensors"), ("folder", "")]}


@pytest.mark.slow
def test_the_refiner_and_inpainting_files_are_what_diffusers_reads_back(files, theirs):
    """diffusers' own single-file reader, an independent converter, finds the folder's weights in our files."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    for name, cls, key in [("refiner", StableDiffusionXLImg2ImgPipeline, "refiner"),
                           ("inpainting", StableDiffusionXLInpaintPipeline, "inpainting model")]:
        again = cls.from_single_file(str(files / f"{name}.safetensors"), config=str(files / name), local_files_only=True)
        for part in ("unet", "vae", "text_encoder_2"):
            want, got = getattr(theirs[key], part).state_dict(), getattr(again, part).state_dict()
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), f"{name} {part}"
        assert again.unet.config.in_channels == (9 if name == "inpainting" else 4)
    assert load(files / "inpainting.safetensors").config.unet.in_channels == 9


@pytest.mark.parametrize("layout", ["file", "folder"])
@pytest.mark.parametrize("sampler, karras, strength", [
    ("euler", False, 0.3), ("euler", False, 0.75), ("euler_a", False, 0.5), ("euler_a", False, 1.0),
    ("dpmpp_2m", False, 0.6), ("dpmpp_2m", True, 0.45), ("ddim", False, 0.7)])
def test_img2img_equals_diffusers(ours, theirs, layout, sampler, karras, strength):
    init = picture(72, 56)  # odd latents (9 x 7), non-square; the output takes the image's size
    s = Settings(**QUICK, sampler=sampler, karras=karras, seed=3, num_images=2, init_image=init, strength=strength)
    got = as_arrays(ours[f"base {layout}"](s, progress=False))
    pipe = with_scheduler(theirs["img2img"], s)
    want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, strength=strength,
                num_inference_steps=s.steps, guidance_scale=s.cfg, num_images_per_prompt=2, generator=generators(s)).images
    assert got[0].shape == (56, 72, 3)
    assert_close_images(got, as_arrays(want), f"img2img {sampler}{' karras' if karras else ''} strength {strength}")


def test_img2img_of_an_odd_sized_image_takes_diffusers_rounded_size(ours, theirs):
    init = picture(75, 61)  # rounded down to 72 x 56 and resized with Lanczos, as VaeImageProcessor does
    s = Settings(**QUICK, sampler="euler", seed=1, init_image=init, strength=0.6)
    got = as_arrays(ours["base file"](s, progress=False))
    pipe = with_scheduler(theirs["img2img"], s)
    want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, strength=0.6, num_inference_steps=10,
                guidance_scale=s.cfg, generator=generators(s)).images
    assert got[0].shape == (56, 72, 3)
    assert_close_images(got, as_arrays(want), "img2img of a 75x61 image")


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "ddim"])  # ddim: a final sigma > 0
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_equals_diffusers(ours, theirs, sampler, strength):
    init, mask = picture(64, 56, seed=1), disc_mask(64, 56)
    s = Settings(**QUICK, sampler=sampler, seed=5, num_images=2, init_image=init, mask=mask, strength=strength)
    got = as_arrays(ours["base file"](s, progress=False))
    pipe = with_scheduler(theirs["inpaint"], s)
    # diffusers draws a batch's posterior samples from its first generator only: image i equals its
    # single-image run with seed + i, which is what ours gives at any batch size.
    for i in range(2):
        want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, mask_image=mask, strength=strength,
                    width=64, height=56, num_inference_steps=s.steps, guidance_scale=s.cfg,
                    generator=[torch.Generator().manual_seed(s.seed + i)]).images
        assert_close_images(got[i:i + 1], as_arrays(want), f"inpainting {sampler} strength {strength} image {i}")
    # Outside the mask the final latents are the image's own (its posterior sample, each image's first draw).
    pipe = ours["base file"]
    latents = pipe.latents(s, progress=False)
    image_latents = pipe.encode(pixels(init, 64, 56), generators(s))
    keep = 1 - latent_mask(mask_pixels(mask, 64, 56), (7, 8))
    assert 0 < keep.mean() < 1 and torch.allclose(latents * keep, image_latents * keep, atol=1e-5)


@pytest.mark.parametrize("layout", ["file", "folder"])
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_a_9_channel_inpainting_model_equals_diffusers(ours, theirs, layout, strength):
    init, mask = picture(64, 64, seed=2), disc_mask(64, 64)
    s = Settings(**QUICK, sampler="euler_a", seed=7, init_image=init, mask=mask, strength=strength)
    got = as_arrays(ours[f"inpainting {layout}"](s, progress=False))
    pipe = with_scheduler(theirs["inpainting model"], s)
    want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, mask_image=mask, strength=strength,
                width=64, height=64, num_inference_steps=s.steps, guidance_scale=s.cfg, generator=generators(s)).images
    assert_close_images(got, as_arrays(want), f"9-channel inpainting strength {strength}")


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("switch", [0.6, 0.8])
def test_base_then_refiner_equals_diffusers(ours, theirs, sampler, switch):
    s = Settings(**QUICK, sampler=sampler, width=64, height=56, seed=9, num_images=2, refiner_start=switch,
                 aesthetic_score=7.5, negative_aesthetic_score=1.5)
    got = as_arrays(ours["base file"](s, refiner=ours["refiner folder"], progress=False))
    gens = generators(s)  # one per image, continued across both stages
    base, refiner = with_scheduler(theirs["base"], s), with_scheduler(theirs["refiner"], s)
    common = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps,
                  guidance_scale=s.cfg, num_images_per_prompt=2, generator=gens)
    latents = base(**common, width=64, height=56, denoising_end=switch, output_type="latent").images
    want = refiner(**common, image=latents, denoising_start=switch, aesthetic_score=7.5,
                   negative_aesthetic_score=1.5).images
    assert_close_images(got, as_arrays(want), f"base + refiner {sampler} switch {switch}")


def test_img2img_base_then_refiner_equals_diffusers(ours, theirs):
    init = picture(64, 56, seed=4)
    s = Settings(**QUICK, sampler="euler_a", seed=13, init_image=init, strength=0.7, refiner_start=0.8)
    got = as_arrays(ours["base file"](s, refiner=ours["refiner file"], progress=False))
    gens = generators(s)
    base, refiner = with_scheduler(theirs["img2img"], s), with_scheduler(theirs["refiner"], s)
    common = dict(prompt=s.prompt, negative_prompt=s.negative_prompt, num_inference_steps=s.steps,
                  guidance_scale=s.cfg, generator=gens)
    latents = base(**common, image=init, strength=0.7, denoising_end=0.8, output_type="latent").images
    want = refiner(**common, image=latents, denoising_start=0.8).images
    assert_close_images(got, as_arrays(want), "img2img base + refiner")


def test_the_refiner_alone_is_img2img_and_equals_diffusers(ours, theirs):
    init = picture(64, 64, seed=3)
    s = Settings(**QUICK, sampler="euler", seed=11, init_image=init, strength=0.4, aesthetic_score=5.0)
    got = as_arrays(ours["refiner file"](s, progress=False))
    pipe = with_scheduler(theirs["refiner"], s)
    want = pipe(prompt=s.prompt, negative_prompt=s.negative_prompt, image=init, strength=0.4, num_inference_steps=10,
                guidance_scale=s.cfg, aesthetic_score=5.0, generator=generators(s)).images
    assert_close_images(got, as_arrays(want), "the refiner alone, img2img")


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_equals_its_two_passes_by_hand(ours, upscaler):
    pipe = ours["base file"]
    s = Settings(**QUICK, sampler="dpmpp_2m", width=48, height=40, seed=4, num_images=2,
                 hires_scale=1.5, hires_strength=0.6, hires_steps=6, hires_upscaler=upscaler)
    levels = []  # the sigma of every step, both passes
    got = pipe(s, progress=False, callback=lambda info: levels.append(float(info["sigma"])))

    first = pipe.latents(replace(s, hires_scale=None), progress=False)  # 48 x 40
    size = dict(width=72, height=56)  # int(1.5 * 48) and int(1.5 * 40) = 60, rounded down to multiples of 8
    init = upscale_latents(first, **size) if upscaler == "latent" else upscale_images(
        [pipe.decode(first[i:i + 1])[0] for i in range(2)], **size)
    second = pipe.latents(replace(s, **size, hires_scale=None, init_image=init, strength=0.6, steps=6,
                                  img2img_steps="exact"), progress=False)
    by_hand = [pipe.decode(second[i:i + 1])[0] for i in range(2)]
    assert [im.size for im in got] == [(72, 56)] * 2
    assert all(np.array_equal(a, b) for a, b in zip(as_arrays(got), as_arrays(by_hand)))
    # AUTOMATIC1111's rule: exactly hires_steps steps, the tail of an int(6 / 0.6) = 10-step schedule.
    tail = make_schedule("dpmpp_2m", 10).sigmas[4:-1].tolist()
    assert len(levels) == 10 + 6 and levels[10:] == pytest.approx(tail, rel=1e-6)


def test_bad_combinations_are_one_clear_error(ours):
    base, refiner = ours["base file"], ours["refiner file"]
    init = picture(64, 64)
    cases = [
        (base, Settings(prompt="x", init_image=init, strength=0), None, "strength 0 is not in (0, 1]"),
        (base, Settings(prompt="x", init_image=init, mask=disc_mask(32, 32)), None, "give a mask of the image's size"),
        (base, Settings(prompt="x", mask=disc_mask(64, 64)), None, "a mask needs an init image"),
        (refiner, Settings(prompt="x"), refiner, "the model is a refiner"),
        (base, Settings(prompt="x", hires_scale=1.0), None, "more than 1"),
        (base, Settings(prompt="x", steps=4, init_image=init, strength=0.1), None, "run no step"),
        (ours["inpainting file"], Settings(prompt="x"), None, "this is an inpainting model"),
    ]
    for pipe, s, ref, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
            pipe(s, refiner=ref, progress=False)


def test_the_two_stages_by_hand_equal_the_pipelines_handoff():
    """The README's by-hand two stages (stage() with the same generators, continued) equal base(s, refiner)."""
    base, refiner = Pipeline.load("plainxl-tiny"), Pipeline.load("plainxl-tiny-refiner")
    s = Settings(prompt="1girl, blue hair", steps=12, seed=1, width=64, height=64)
    two_stage = base(s, refiner=refiner, progress=False)
    generators = [torch.Generator().manual_seed(1)]
    latents = base.stage(replace(s, denoising_end=0.8), generators, progress=False)
    latents = refiner.stage(replace(s, init_image=latents, denoising_start=0.8), generators, progress=False)
    assert np.array_equal(np.asarray(refiner.decode(latents)[0]), np.asarray(two_stage[0]))
    assert not np.array_equal(np.asarray(base(s, progress=False)[0]), np.asarray(two_stage[0]))
