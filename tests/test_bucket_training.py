"""Aspect-ratio buckets in the DreamBooth loop (train/batches.py over data/buckets.py) on the tiny model: a batch holds
one bucket, a pair's class image is of its instance image's bucket, the micro-conditioning is the SDXL paper's
(pinned on images, beside kohya's different crop coordinates), class images are made at the buckets' sizes, cached
latents work per bucket, two processes equal one, SIGKILL + resume is bit-identical, and bad input is one line."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_dreambooth import args, final_state, finish, killed_then_resumed, losses, run

from data.buckets import BucketFlags, place
from data.dreambooth import DataError, ImageFolder
from models.loading import load, save_single_file
from models.sdxl import SDXL, TINY
from models.tokenizer import load_tokenizers
from sampling.schedule import alphas_cumprod
from train.batches import make_batch
from train.config import TrainConfig
from train.dreambooth import main

pytestmark = pytest.mark.filterwarnings("ignore")
BUCKETS = dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)
SHAPES = [(48, 96), (48, 96), (96, 48), (64, 64), (40, 100)]  # (width, height): portraits, a landscape, a square


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    torch.manual_seed(0)
    save_single_file(SDXL(TINY), root / "tiny.safetensors")
    write_noise_images(root / "instance", SHAPES)
    return root


def write_noise_images(folder, shapes, seed=0):
    """Random-noise images of these (width, height)s, 0.png, 1.png, ..."""
    folder.mkdir()
    pixels = [np.random.default_rng([seed, i]).integers(0, 255, (h, w, 3), dtype=np.uint8) for i, (w, h) in enumerate(shapes)]
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"{i}.png")


def config_with(root, **fields):
    return TrainConfig(**{**BUCKETS, "instance_data_dir": str(root / "instance"), "class_data_dir": str(root / "class"),
                          "center_crop": True, "random_flip": False, "batch_size": 2, **fields})


def test_the_micro_conditioning_is_the_papers_and_kohyas_crop_differs(tmp_path):
    """original_size = the file's (h, w); crop_coords_top_left = the crop's (top, left) in the resized image;
    target_size = the bucket (h, w). kohya's get_crop_ltrb letterboxes the image inside the bucket instead."""
    kohya = json.loads((Path(__file__).parent / "kohya_buckets.json").read_text())["cases"][0]  # the default flags
    kohya_ltrb = {tuple(i["size"]): i["kohya_crop_ltrb"] for i in kohya["images"]}
    # (bucket w, h, crop top, left) by hand: 800x1000 (ratio 0.8) is nearest 832x1024 (0.8125), scaled by 832/800 to
    # 832x1040, cut 8 from the top; 1920x1080 is exactly 1024x576's ratio; 777x333 (2.33) is nearest 1024x448 (2.29),
    # scaled by 448/333 to 1045x448, cut (1045 - 1024) // 2 = 10 from the left.
    pinned = {(800, 1000): (832, 1024, 8, 0), (1920, 1080): (1024, 576, 0, 0), (777, 333): (1024, 448, 0, 10)}
    for w, h in pinned:
        Image.new("RGB", (w, h), (128, 64, 32)).save(tmp_path / f"{w}x{h}.png")
    folder = ImageFolder(tmp_path, "x")
    for i, (w, h) in enumerate(folder.sizes):
        folder.placements = [place(*size, BucketFlags()) for size in folder.sizes]
        e = folder.example(i, center_crop=True, random_flip=False, generator=torch.Generator())
        bw, bh, top, left = pinned[(w, h)]
        assert (e.original_size, e.crop_top_left, e.target_size) == ((h, w), (top, left), (bh, bw))
        assert e.pixels.shape == (3, bh, bw)
    # kohya records (left, top) of the image letterboxed inside the bucket, not of the crop it cuts
    assert kohya_ltrb[(800, 1000)][:2] == [6.0, 0.0] and kohya_ltrb[(777, 333)][:2] == [0.0, 4.0]


def test_a_batch_holds_one_bucket_and_pairs_keep_it(setup, tmp_path):
    model = load(setup / "tiny.safetensors")
    rng = np.random.default_rng(1)
    (tmp_path / "class").mkdir()
    for i, (w, h) in enumerate([(48, 96), (96, 48), (64, 64), (48, 112), (96, 48)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / "class" / f"{i}.png")
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks"), "class": ImageFolder(tmp_path / "class", "1girl")}
    config = config_with(setup, prior_loss_weight=1.0)
    seen = set()
    for step in range(12):
        batch = make_batch(config, data, model, load_tokenizers(), alphas_cumprod(), step, 0, "cpu")
        h, w = batch.noisy.shape[-2:]
        bucket = (int(w) * 8, int(h) * 8)
        assert batch.numbers[:, 4:].tolist() == [[bucket[1], bucket[0]]] * 4  # instance and class: one bucket
        seen.add(bucket)
    instance_buckets = {p.bucket for p in data["instance"].placements}
    assert seen == instance_buckets and len(seen) >= 3


def test_cached_latents_give_the_same_batches_per_bucket(setup):
    from train.batches import encode_images

    model = load(setup / "tiny.safetensors")
    config = config_with(setup, prior_loss_weight=0.0, cache_latents=True)
    folder = ImageFolder(setup / "instance", "1girl, sks")
    cached = {"instance": encode_images(model, folder, config, "cpu")}
    for step in range(4):
        a = make_batch(replace(config, cache_latents=False), {"instance": folder}, model, load_tokenizers(),
                       alphas_cumprod(), step, 0, "cpu")
        b = make_batch(config, cached, model, load_tokenizers(), alphas_cumprod(), step, 0, "cpu")
        torch.testing.assert_close(a.noisy, b.noisy, rtol=0, atol=1e-5)
        assert torch.equal(a.numbers, b.numbers)


@pytest.mark.slow
def test_class_images_are_made_at_the_buckets_and_ddp_equals_one_process(setup, tmp_path):
    fields = dict(BUCKETS, num_class_images=6, class_steps=2, max_steps=3, batch_size=1,
                  class_data_dir=tmp_path / "class")
    one, two = tmp_path / "one", tmp_path / "two"
    finish(run(args(setup, one, **(fields | dict(batch_size=2)))))
    sizes = sorted(Image.open(p).size for p in (tmp_path / "class").glob("*.png"))
    folder = ImageFolder(setup / "instance", "x")
    wanted = {place(*s, BucketFlags((64, 64), 32, 128, 16)).bucket for s in folder.sizes}
    assert set(sizes) == wanted and len(sizes) == 6
    finish(run(args(setup, two, **fields), nproc=2))
    for ra, rb in zip(losses(one), losses(two), strict=True):
        for key in ("instance", "prior", "loss"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(ra[key]), f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"


@pytest.mark.slow
def test_sigkill_then_resume_with_buckets_is_bit_identical(setup, tmp_path):
    fields = dict(BUCKETS, prior_loss_weight=0.0, max_steps=6, random_flip=True)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(run(args(setup, reference, **fields)))
    killed_then_resumed(setup, killed, **fields)
    want, got = final_state(reference, 6), final_state(killed, 6)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want if not k.startswith("rng."))


@pytest.mark.parametrize("extra, fragment", [
    (dict(min_bucket_reso=48), "min_bucket_reso applies with enable_bucket=True"),
    (dict(BUCKETS, bucket_reso_steps=12), "bucket_reso_steps must be a multiple of 8"),
    (dict(BUCKETS, resolution=256), "must lie within min_bucket_reso 32 and max_bucket_reso 128"),
    (dict(BUCKETS, bucket_no_upscale=True, min_bucket_reso=64), "0.png is 48x96, smaller than min_bucket_reso 64"),
    (dict(BUCKETS, num_class_images=2, prior_loss_weight=1.0), "num_class_images 2 is fewer than the 4 buckets"),
])
def test_bad_bucket_settings_are_one_line_before_anything_loads(setup, tmp_path, capsys, extra, fragment):
    assert main(args(setup, tmp_path / "o", **extra)) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and fragment in err, err
    assert not (tmp_path / "o").exists()


def test_a_class_folder_without_a_bucket_is_one_line(setup, tmp_path):
    from train.batches import check_pairs, set_placements

    (tmp_path / "class").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "class" / "only-square.png")
    config = config_with(setup, prior_loss_weight=1.0, class_data_dir=str(tmp_path / "class"))
    data = {"instance": ImageFolder(setup / "instance", "x"), "class": ImageFolder(tmp_path / "class", "y")}
    set_placements(config, data.values())
    with pytest.raises(DataError, match="has no image in the 32x96 bucket"):
        check_pairs(config, data)


def test_the_validation_loss_is_fixed_noise_on_held_out_images(setup, tmp_path):
    """validation_split holds images out of training; the loss at fixed timesteps and noise is the same number for
    the same weights (another process, another run) and moves when the weights do."""
    from models.tokenizer import load_tokenizers as tokenizers_of
    from train.batches import held_out
    from train.validation import TIMESTEPS, validation_loss, validation_set

    model = load(setup / "tiny.safetensors")
    config = config_with(setup, prior_loss_weight=0.0, validation_split=0.4)
    training, held = held_out(config, ImageFolder(setup / "instance", "1girl, sks"))
    assert len(held) == 2 and len(training) == 3 and not set(held.paths) & set(training.paths)
    args_ = (config, None, alphas_cumprod(), tokenizers_of(), torch.autocast("cpu", enabled=False), "cpu")
    built = [validation_set(model, config, held, tokenizers_of(), args_[4], "cpu") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(built[0].noise, built[1].noise)) and len(built[0].noise[0]) == len(TIMESTEPS)
    first = validation_loss(model, config, built[0], *args_[2:])
    assert first == validation_loss(model, config, built[1], *args_[2:]) and np.isfinite(first)
    with torch.no_grad():
        model.unet.out[2].weight.mul_(1.5)
    assert validation_loss(model, config, built[0], *args_[2:]) != first
    with pytest.raises(DataError, match="leaves none to train on"):
        held_out(config_with(setup, validation_split=0.99), ImageFolder(setup / "instance", "x"))


@pytest.mark.slow
def test_a_run_logs_its_validation_loss(setup, tmp_path):
    out = tmp_path / "run"
    finish(run(args(setup, out, **BUCKETS, prior_loss_weight=0.0, max_steps=4, validation_every=2,
                    validation_split=0.4)))
    logged = [r.get("validation") for r in losses(out)]
    assert logged[0] is None and logged[2] is None and all(np.isfinite(logged[i]) for i in (1, 3))


def test_cached_latents_on_disk_are_reused_until_the_image_or_its_bucket_changes(setup, tmp_path):
    import shutil

    from train.batches import encode_images
    from train.latent_cache import SUFFIX

    shutil.copytree(setup / "instance", tmp_path / "instance")
    model = load(setup / "tiny.safetensors")
    config = config_with(tmp_path, prior_loss_weight=0.0, cache_latents=True, cache_latents_to_disk=True)
    first = encode_images(model, ImageFolder(tmp_path / "instance", "x"), config, "cpu")
    assert len(list((tmp_path / "instance").glob("*" + SUFFIX))) == len(SHAPES)
    calls = []
    encode = model.vae.encode
    model.vae.encode = lambda x: calls.append(len(x)) or encode(x)
    again = encode_images(model, ImageFolder(tmp_path / "instance", "x"), config, "cpu")
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(first.mean, again.mean))  # read back, not encoded
    assert torch.equal(first.numbers, again.numbers)
    Image.new("RGB", SHAPES[2], (9, 9, 9)).save(tmp_path / "instance" / "2.png")  # one image changes
    encode_images(model, ImageFolder(tmp_path / "instance", "x"), config, "cpu")
    assert calls == [1]
    other = replace(config, bucket_reso_steps=32)
    encode_images(model, ImageFolder(tmp_path / "instance", "x"), other, "cpu")
    moved = sum(place(*s, config.bucket_flags()) != place(*s, other.bucket_flags()) for s in SHAPES)
    assert moved >= 1 and sum(calls) == 1 + moved  # an image whose bucket or crop moved is encoded anew


@pytest.mark.slow
def test_two_processes_resume_bit_exactly_with_buckets_and_ema(setup, tmp_path):
    """Under two processes, a run stopped at step 2 and resumed to 6 equals one that ran 6 straight: weights,
    optimizer state and the EMA."""
    fields = dict(BUCKETS, prior_loss_weight=0.0, batch_size=1, ema_decay=0.9, random_flip=True)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    finish(run(args(setup, straight, max_steps=6, **fields), nproc=2))
    finish(run(args(setup, halves, max_steps=2, **fields), nproc=2))
    finish(run(args(setup, halves, max_steps=6, resume="latest", **fields), nproc=2))
    want, got = final_state(straight, 6), final_state(halves, 6)
    assert any(k.startswith("ema.") for k in want)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want if not k.startswith("rng."))
