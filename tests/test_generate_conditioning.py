"""The command line for image-conditioned generation: every kind re-runs from its PNG (each new
parameter round-trips through --from-png), and each bad input of the issue is one clear line, a non-zero
exit and nothing written."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_lora import kohya_file
from test_robustness import generate, one_line_error

from models.loading import save_single_file
from models.sdxl import SDXL, TINY, TINY_REFINER

QUICK = ["--steps", "4", "--sampler", "euler_a", "--seed", "3"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 64x48 picture, a mask of its size, one of another size, a file that is not an image, a refiner."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "init.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[12:36, 16:48] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:40]).save(root / "small_mask.png")
    (root / "notes.png").write_text("not an image")
    torch.manual_seed(1)
    save_single_file(SDXL(TINY_REFINER), root / "refiner.safetensors")
    kohya_file(SDXL(TINY), root / "style.safetensors")  # names and shapes of the tiny layout
    return root


KINDS = {  # what each kind adds to QUICK
    "img2img": ["--init-image", "{root}/init.png", "--strength", "0.6"],
    "inpainting": ["--init-image", "{root}/init.png", "--mask", "{root}/mask.png", "--strength", "0.9"],
    "base + refiner": ["--width", "64", "--height", "48", "--refiner", "{root}/refiner.safetensors",
                       "--refiner-start", "0.7", "--aesthetic-score", "7", "--negative-aesthetic-score", "2"],
    "refiner alone": ["--model", "{root}/refiner.safetensors", "--init-image", "{root}/init.png", "--strength", "0.5"],
    "hires latent": ["--width", "48", "--height", "40", "--hires-scale", "1.5", "--hires-strength", "0.5",
                     "--hires-steps", "3"],
    "hires lanczos": ["--width", "48", "--height", "40", "--hires-scale", "1.34", "--hires-upscaler", "lanczos"],
    "literal prompt": ["--width", "64", "--height", "48", "--no-prompt-weights"],
    "lora": ["--width", "64", "--height", "48", "--lora", "{root}/style.safetensors:0.8", "--lora",
             "{root}/style.safetensors:-0.3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_reruns_from_its_png(capsys, tmp_path, tiny_file, inputs, kind):
    args = [a.format(root=inputs) for a in KINDS[kind]]
    model = [] if "--model" in args else ["--model", tiny_file]
    code, err = generate(capsys, "--prompt", "1girl, (red eyes:1.2)", *QUICK, *model, *args, "--out", tmp_path / "a")
    assert code == 0, err
    (first,) = (tmp_path / "a").iterdir()
    code, err = generate(capsys, "--from-png", first, "--out", tmp_path / "b")
    assert code == 0, err
    (again,) = (tmp_path / "b").iterdir()
    with Image.open(first) as a, Image.open(again) as b:
        assert a.info["parameters"] == b.info["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))
        parameters = a.info["parameters"]
    expected = {"img2img": ["Init image: ", "Denoising strength: 0.6"], "inpainting": ["Mask: ", "Denoising strength: 0.9"],
                "base + refiner": ["Refiner: ", "Refiner switch at: 0.7", "Aesthetic score: 7.0", "Negative aesthetic score: 2.0"],
                "refiner alone": ["Denoising strength: 0.5"],
                "hires latent": ["Hires upscale: 1.5", "Hires steps: 3", "Hires upscaler: Latent", "Denoising strength: 0.5"],
                "hires lanczos": ["Hires upscale: 1.34", "Hires upscaler: Lanczos", "Denoising strength: 0.7"],
                "literal prompt": ["Emphasis: None"],
                "lora": ["Lora hashes: \"style: ", "Loras: "]}[kind]
    assert all(field in parameters for field in expected), parameters
    if kind.startswith("hires"):  # the first pass's size is the Size; the image is the second pass's
        with Image.open(first) as a:
            assert a.size == ((72, 56) if kind == "hires latent" else (64, 48)) and "Size: 48x40" in parameters


def test_the_output_takes_the_init_images_size_unless_given(capsys, tmp_path, tiny_file, inputs):
    code, err = generate(capsys, "--prompt", "x", *QUICK, "--model", tiny_file, "--init-image", inputs / "init.png",
                         "--width", "32", "--height", "32", "--out", tmp_path)
    assert code == 0, err
    (made,) = tmp_path.iterdir()
    assert Image.open(made).size == (32, 32)


def test_a_missing_init_image_from_a_png_is_one_clear_error(capsys, tmp_path, tiny_file, inputs):
    init = tmp_path / "init.png"
    init.write_bytes((inputs / "init.png").read_bytes())
    assert generate(capsys, "--prompt", "x", *QUICK, "--model", tiny_file, "--init-image", init,
                    "--out", tmp_path / "a")[0] == 0
    init.unlink()
    (png,) = (tmp_path / "a").iterdir()
    code, err = generate(capsys, "--from-png", png, "--out", tmp_path / "b")
    one_line_error(err, code, f"--init-image {init} does not exist")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("case, args, message", [
    ("strength 0", ["--init-image", "{root}/init.png", "--strength", "0"], "strength 0.0 is not in (0, 1]"),
    ("strength above 1", ["--init-image", "{root}/init.png", "--strength", "1.5"], "strength 1.5 is not in (0, 1]"),
    ("mask of another size", ["--init-image", "{root}/init.png", "--mask", "{root}/small_mask.png"],
     "the mask is 64x40 but the init image is 64x48"),
    ("mask without an image", ["--mask", "{root}/mask.png"], "a mask needs an init image"),
    ("a refiner as base", ["--model", "{root}/refiner.safetensors", "--refiner", "{root}/refiner.safetensors"],
     "is a refiner (one text encoder)"),
    ("init image not an image", ["--init-image", "{root}/notes.png"], "cannot read image"),
    ("init image missing", ["--init-image", "{root}/nowhere.png"], "does not exist"),
    ("hires scale 1", ["--hires-scale", "1"], "hi-res scale 1.0 must be more than 1"),
    ("hires too large", ["--hires-scale", "2000"], "free; use a smaller --width/--height, --hires-scale"),
    ("unbalanced weight", [], "--prompt: the weight ':1.2' at character 11 is never closed by ')'"),
    ("weight not a number", ["--negative-prompt", "(lowres:1,5)"], "--negative-prompt: the weight ':1,5' at character 8 is not a number"),
    ("no step runs", ["--init-image", "{root}/init.png", "--strength", "0.1"], "4 steps at strength 0.1 run no step"),
    ("lora scale not a number", ["--lora", "{root}/style.safetensors:abc"], "the scale 'abc' is not a number"),
    ("lora of another layout", ["--lora", "{root}/refiner.safetensors"], "is not part of a LoRA"),
    ("lora missing", ["--lora", "{root}/nowhere.safetensors"], "nowhere.safetensors"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(capsys, tmp_path, tiny_file, inputs, case, args, message):
    prompt = "1girl (tag:1.2" if case == "unbalanced weight" else "1girl"
    args = [a.format(root=inputs, model=tiny_file) for a in args]
    model = [] if "--model" in args else ["--model", tiny_file]
    code, err = generate(capsys, "--prompt", prompt, *QUICK, *model, *args, "--out", tmp_path / "out")
    one_line_error(err, code, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_rgba_palette_and_grayscale_init_images_read_as_rgb(capsys, tmp_path, tiny_file, inputs, mode):
    picture = Image.open(inputs / "init.png").convert(mode)
    picture.save(tmp_path / "odd.png")
    picture.convert("RGB").save(tmp_path / "rgb.png")
    for name in ("odd", "rgb"):
        code, err = generate(capsys, "--prompt", "x", *QUICK, "--model", tiny_file, "--init-image",
                             tmp_path / f"{name}.png", "--out", tmp_path / f"out-{name}")
        assert code == 0, err
    made = [np.asarray(Image.open(next((tmp_path / f"out-{n}").iterdir()))) for n in ("odd", "rgb")]
    assert np.array_equal(*made)


def test_a_switch_point_that_leaves_the_refiner_no_step_is_one_line(capsys, tmp_path, tiny_file, inputs):
    code, err = generate(capsys, "--prompt", "x", "--steps", "2", "--model", tiny_file, "--refiner",
                         inputs / "refiner.safetensors", "--refiner-start", "0.3", "--out", tmp_path / "out")
    one_line_error(err, code, "with 2 steps, the switch point leaves no step to one stage")
    assert not (tmp_path / "out").exists()


def test_an_init_image_path_that_cannot_be_looked_at_is_one_line(capsys, tmp_path, tiny_file):
    code, err = generate(capsys, "--prompt", "x", *QUICK, "--model", tiny_file, "--init-image",
                         tmp_path / ("n" * 300 + ".png"), "--out", tmp_path / "out")  # ENAMETOOLONG, not "missing"
    one_line_error(err, code, "cannot read", "check the path")
    assert not (tmp_path / "out").exists()


def test_a_lora_changes_the_image_and_is_recorded_with_a1111s_hash(capsys, tmp_path, tiny_file, inputs):
    from models.lora import addnet_hash

    for name, extra in [("plain", []), ("lora", ["--lora", inputs / "style.safetensors"])]:
        code, err = generate(capsys, "--prompt", "x", *QUICK, "--model", tiny_file, *extra, "--out", tmp_path / name)
        assert code == 0, err
    plain, lora = (Image.open(next((tmp_path / n).iterdir())) for n in ("plain", "lora"))
    assert not np.array_equal(np.asarray(plain), np.asarray(lora))
    assert f'Lora hashes: "style: {addnet_hash(inputs / "style.safetensors")}"' in lora.info["parameters"]


def test_negative_micro_conditioning_equals_diffusers(tmp_path):
    """diffusers' negative_original_size / negative_crops_coords_top_left / negative_target_size: the negative's own
    size conditions (used when both sizes are given), equal to diffusers' pipeline on the same folder."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from test_pipeline_parity import assert_close_images, tiny_model

    from models.diffusers_layout import save_diffusers
    from sampling.pipeline import Pipeline, Settings

    save_diffusers(tiny_model(), tmp_path / "tiny")
    reference = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny", add_watermarker=False).to(torch.float32)
    reference.set_progress_bar_config(disable=True)
    from diffusers import EulerDiscreteScheduler

    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    s = Settings(prompt="1girl", negative_prompt="lowres", width=64, height=64, steps=5, cfg=5.0, sampler="euler",
                 seed=2, negative_original_size=(512, 384), negative_crop_top_left=(8, 16), negative_target_size=(64, 64))
    theirs = reference(prompt=s.prompt, negative_prompt=s.negative_prompt, width=64, height=64, num_inference_steps=5,
                       guidance_scale=5.0, negative_original_size=(512, 384), negative_crops_coords_top_left=(8, 16),
                       negative_target_size=(64, 64), generator=[torch.Generator().manual_seed(2)]).images
    pipe = Pipeline.load(tmp_path / "tiny")
    ours = pipe(s, progress=False)
    assert_close_images(ours, [np.asarray(image) for image in theirs], "negative micro-conditioning")
    plain = pipe(Settings(**{**s.__dict__, "negative_original_size": None}), progress=False)
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(ours[0])), "the negative sizes changed nothing"
