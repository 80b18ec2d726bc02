"""Aspect-ratio buckets (data/buckets.py) against kohya sd-scripts' own BucketManager: tests/kohya_buckets.json holds
what kohya's code (run by tests/oracles/kohya_buckets.py) gives for 195 image sizes under 8 flag sets; every
bucket, resized size, predefined bucket list and rounded min/max must be the same. And python -m data.buckets."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.buckets import BucketFlags, bucket_resolutions, check_placeable, epoch_batches, main, place, rounded_limits
from data.dreambooth import DataError

KOHYA = json.loads((Path(__file__).parent / "kohya_buckets.json").read_text())


def flags_of(case):
    return BucketFlags(tuple(case["resolution"]), case["min_bucket_reso"], case["max_bucket_reso"],
                       case["bucket_reso_steps"], case["bucket_no_upscale"])


@pytest.mark.parametrize("case", KOHYA["cases"], ids=lambda c: "{resolution} {min_bucket_reso}-{max_bucket_reso}/"
                         "{bucket_reso_steps}{no}".format(**c, no=" no_upscale" if c["bucket_no_upscale"] else ""))
def test_every_image_lands_where_kohya_puts_it(case):
    flags = flags_of(case)
    assert list(rounded_limits(flags, warn=False)) == case["rounded"]
    buckets = None if flags.bucket_no_upscale else bucket_resolutions(flags)
    if buckets is not None:
        assert [list(b) for b in buckets] == case["buckets"]
    placed = 0
    for image in case["images"]:
        size = tuple(image["size"])
        if flags.bucket_no_upscale and min(size) < case["rounded"][0]:  # refused here (kohya trains it tiny, or fails)
            with pytest.raises(DataError, match="smaller than min_bucket_reso"):
                check_placeable("x.png", size, flags)
            continue
        assert "error" not in image, f"kohya fails on {size}, which is not refused here"
        p = place(*size, flags, buckets)
        assert (list(p.bucket), list(p.resized)) == (image["bucket"], image["resized"]), size
        assert p.resized[0] >= p.bucket[0] and p.resized[1] >= p.bucket[1]  # the resized image covers the crop
        assert p.crop == ((p.resized[0] - p.bucket[0]) // 2, (p.resized[1] - p.bucket[1]) // 2)
        placed += 1
    assert placed >= 100


def test_the_default_flags_make_kohyas_sdxl_buckets():
    buckets = bucket_resolutions(BucketFlags())
    assert len(buckets) == 25 and (1024, 1024) in buckets and (576, 1024) in buckets and (1024, 256) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and max(w, h) <= 1024 for w, h in buckets)
    portrait = place(800, 1000, BucketFlags())
    assert portrait.bucket == (832, 1024) and portrait.resized == (832, 1040) and portrait.crop == (0, 8)


def test_min_and_max_are_rounded_with_a_warning(capsys):
    assert rounded_limits(BucketFlags(min_bucket_reso=300, max_bucket_reso=1000)) == (256, 1024)
    err = capsys.readouterr().err
    assert "min_bucket_reso 300 is not a multiple of bucket_reso_steps 64; using 256" in err
    assert "max_bucket_reso 1000 is not a multiple of bucket_reso_steps 64; using 1024" in err
    with pytest.raises(ValueError, match="must lie within min_bucket_reso 256 and max_bucket_reso 1024"):
        rounded_limits(BucketFlags(resolution=(1280, 1280)), warn=False)


def test_epoch_batches_hold_one_bucket_and_every_image():
    buckets_of = ((1024, 1024),) * 5 + ((832, 1216),) * 3 + ((1216, 832),)
    batches = epoch_batches(buckets_of, 2, seed=0, epoch=0)
    assert all(len(ids) == 2 and all(buckets_of[i] == bucket for i in ids) for bucket, ids in batches)
    assert {i for _, ids in batches for i in ids} == set(range(9)) and len(batches) == 3 + 2 + 1
    assert batches == epoch_batches(buckets_of, 2, seed=0, epoch=0)  # a pure function of (seed, epoch)
    assert batches != epoch_batches(buckets_of, 2, seed=0, epoch=1)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name, size in [("portrait.png", (800, 1000)), ("wide.jpg", (1920, 1080)), ("sub/square.webp", (512, 512))]:
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_the_command_prints_one_json_object_per_image(folder, capsys):
    assert main([str(folder)]) == 1  # one unreadable image: named, the rest listed, exit 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]  # piped: nothing but the JSON
    assert [r["image"] for r in rows] == ["portrait.png", "sub/square.webp", "wide.jpg"]
    assert rows[0] == {"image": "portrait.png", "bucket": [832, 1024], "resized": [832, 1040], "crop": [0, 8]}
    assert err.count("\n") == 1 and "broken.png" in err and "notes.txt" not in out + err


def test_the_command_writes_json_to_a_file_and_a_table_to_stdout(folder, tmp_path, capsys):
    (folder / "broken.png").unlink()
    out_file = tmp_path / "buckets.jsonl"
    assert main([str(folder), "--resolution", "768,1024", "--bucket_reso_steps", "32", "--json", str(out_file)]) == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 3 and all(r["bucket"][0] * r["bucket"][1] <= 768 * 1024 for r in rows)
    assert "3 images in 3 buckets" in capsys.readouterr().out
    assert main([str(folder), "--json", str(out_file)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--resolution", "10x10"], "give R or W,H"),
    (["--resolution", "2048"], "must lie within min_bucket_reso"),
    (["--bucket_no_upscale", "--min_bucket_reso", "1024"], "smaller than min_bucket_reso 1024"),
])
def test_bad_flags_are_one_line(folder, capsys, argv, message):
    (folder / "broken.png").unlink()
    code = main([str(folder), *argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err


def test_an_image_too_small_for_no_upscale_is_refused():
    flags = BucketFlags(bucket_no_upscale=True)
    with pytest.raises(DataError, match="tiny.png is 100x300, smaller than min_bucket_reso 256"):
        check_placeable("tiny.png", (100, 300), flags)
    check_placeable("fine.png", (300, 300), flags)
