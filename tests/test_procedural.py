"""Procedural portraits: byte-identical per (seed, index, size), captions that parse back, a default
distribution that covers every value and never the rare ones, attributes visible in the pixels, and
a dataset writer that resumes without rewriting."""

import io
from dataclasses import replace

import numpy as np
import pytest

from data.procedural import (
    ACCESSORIES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    DEFAULT_ACCESSORIES,
    EXPRESSIONS,
    EYE_COLOURS,
    EYE_RGB,
    HAIR_COLOURS,
    HAIR_LENGTHS,
    HAIR_RGB,
    MIN_SIZE,
    STAR_RGB,
    Character,
    caption,
    draw,
    parse_caption,
    random_character,
    sample,
    write_dataset,
)

BASE = Character("black", "short hair", "red", "expressionless", "none", "white")  # plain, high contrast


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def near(pixels, rgb, tol):
    """Mask of pixels within `tol` of `rgb` in every channel."""
    return np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tol


def default_characters(count, seed=0):
    """The characters sample() would draw for indices 0..count-1, without drawing the images."""
    return [random_character(np.random.default_rng(np.random.SeedSequence([seed, i]))) for i in range(count)]


def test_sample_is_deterministic():
    for seed, index, size in [(0, 0, 64), (0, 7, 64), (3, 2, 96), (1, 5, 128)]:
        first, second = sample(index, seed, size), sample(index, seed, size)
        assert png_bytes(first[0]) == png_bytes(second[0])
        assert first[1:] == second[1:]
        assert first[0].size == (size, size) and first[0].mode == "RGB"
    # Different numbers give different images; the size changes the pixels but not the character.
    images = {png_bytes(sample(i, s)[0]) for s, i in [(0, 0), (0, 1), (1, 0)]}
    assert len(images) == 3
    assert sample(4, 0, 64)[2] == sample(4, 0, 128)[2]
    assert sample(4, 0, 64)[2] == default_characters(5)[4]


def test_caption_format():
    c = Character("blue", "long hair", "red", "smile", "ribbon", "yellow")
    assert caption(c) == "1girl, solo, blue hair, long hair, red eyes, smile, ribbon, yellow background"
    c = Character("pink", "twintails", "red", "open mouth", "star hairpin", "grey", second_eye_colour="blue")
    assert caption(c) == ("1girl, solo, pink hair, twintails, heterochromia, red eyes, blue eyes, open mouth, "
                          "star hairpin, grey background")
    assert caption(BASE) == "1girl, solo, black hair, short hair, red eyes, expressionless, white background"


def test_captions_parse_back():
    characters = default_characters(500)
    characters += [replace(c, second_eye_colour=next(e for e in EYE_COLOURS if e != c.eye_colour),
                           accessory="star hairpin") for c in characters[:50]]
    for c in characters:
        assert parse_caption(caption(c)) == c


@pytest.mark.parametrize("text", [
    "1girl, solo, black hair, short hair, red eyes, expressionless, cat ears, white background",  # unknown tag
    "1girl, solo, black hair, short hair, red eyes, expressionless",  # no background
    "1girl, solo, black hair, blue hair, short hair, red eyes, smile, white background",  # two hair colours
    "1girl, solo, black hair, short hair, heterochromia, red eyes, smile, white background",  # one eye colour
    "1girl, solo, black hair, short hair, red eyes, blue eyes, smile, white background",  # two without the tag
    "1girl, solo, black hair, short hair, red eyes, smile, none, white background",  # "none" is not a tag
    "solo, 1girl, black hair, short hair, red eyes, smile, white background",  # wrong opening
])
def test_parse_caption_rejects_bad_captions(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_character_rejects_unknown_values():
    with pytest.raises(ValueError, match="hair_colour"):
        replace(BASE, hair_colour="purple")
    with pytest.raises(ValueError, match="use None"):
        replace(BASE, second_eye_colour=BASE.eye_colour)


def test_default_distribution_covers_every_value_and_no_rare_one():
    characters = default_characters(500)
    assert {c.hair_colour for c in characters} == set(HAIR_COLOURS)
    assert {c.hair_length for c in characters} == set(HAIR_LENGTHS)
    assert {c.eye_colour for c in characters} == set(EYE_COLOURS)
    assert {c.expression for c in characters} == set(EXPRESSIONS)
    assert {c.background for c in characters} == set(BACKGROUNDS)
    # Every default accessory, and none of the rare ones (the star hairpin).
    assert {c.accessory for c in characters} == set(DEFAULT_ACCESSORIES)
    assert "star hairpin" in ACCESSORIES and "star hairpin" not in DEFAULT_ACCESSORIES
    assert not any(c.heterochromia for c in characters)


def test_widened_distribution_adds_the_rare_values():
    from data.procedural import HETEROCHROMIA_RATE, sample

    characters = [sample(i, seed=4, widened=True)[2] for i in range(600)]
    assert {c.accessory for c in characters} == set(ACCESSORIES)
    share = np.mean([c.heterochromia for c in characters])
    assert abs(share - HETEROCHROMIA_RATE) < 0.05
    assert np.mean([c.accessory == "star hairpin" for c in characters]) > 0.1


def test_background_dominates_and_fills_top_corners():
    for index in range(30):
        image, _, c = sample(index)
        pixels = np.asarray(image)
        background = BACKGROUND_RGB[c.background]
        corner = 4  # pixels
        assert near(pixels[:corner, :corner], background, 2).all(), (index, c)
        assert near(pixels[:corner, -corner:], background, 2).all(), (index, c)
        assert near(pixels, background, 2).mean() > 0.25, (index, c)


def test_hair_colour_is_the_main_colour_of_the_top_half():
    for index in range(30):
        image, _, c = sample(index)
        top = np.asarray(image)[: image.height // 2]
        counts = {h: near(top, HAIR_RGB[h], 12).sum() for h in HAIR_COLOURS}
        assert max(counts, key=counts.get) == c.hair_colour, (index, c, counts)
        assert counts[c.hair_colour] > 0.05 * top.shape[0] * top.shape[1], (index, c, counts)


def test_each_eye_shows_its_own_colour():
    # The eye on the viewer's left is in the left half of the image, the other in the right half.
    for k in range(5):
        rng = np.random.default_rng(k)
        pixels = np.asarray(draw(replace(BASE, eye_colour="red", second_eye_colour="blue"), 64, rng))
        left, right = pixels[:, :32], pixels[:, 32:]
        assert near(left, EYE_RGB["red"], 30).sum() >= 3 and near(left, EYE_RGB["blue"], 30).sum() == 0
        assert near(right, EYE_RGB["blue"], 30).sum() >= 3 and near(right, EYE_RGB["red"], 30).sum() == 0
    # Without heterochromia both eyes have the one colour, whichever it is.
    for colour in EYE_COLOURS:
        pixels = np.asarray(draw(replace(BASE, eye_colour=colour), 64))
        assert near(pixels[:, :32], EYE_RGB[colour], 30).sum() >= 3
        assert near(pixels[:, 32:], EYE_RGB[colour], 30).sum() >= 3


def test_star_hairpin_is_visible():
    star = near(np.asarray(draw(replace(BASE, accessory="star hairpin"), 64)), STAR_RGB, 30).sum()
    plain = near(np.asarray(draw(BASE, 64)), STAR_RGB, 30).sum()
    assert star >= 4 and plain == 0


def test_every_attribute_value_changes_the_picture():
    base = np.asarray(draw(BASE, 64)).astype(int)
    for field, values in [("hair_colour", HAIR_COLOURS), ("hair_length", HAIR_LENGTHS), ("eye_colour", EYE_COLOURS),
                          ("expression", EXPRESSIONS), ("accessory", ACCESSORIES), ("background", BACKGROUNDS)]:
        for value in values:
            if value == getattr(BASE, field):
                continue
            changed = np.abs(np.asarray(draw(replace(BASE, **{field: value}), 64)).astype(int) - base).max(-1) > 30
            assert changed.sum() >= 4, (field, value, changed.sum())


def test_draw_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="too small"):
        draw(BASE, MIN_SIZE // 2)


def test_write_dataset_writes_pairs_and_resumes(tmp_path):
    assert write_dataset(tmp_path, 4, seed=2) == [0, 1, 2, 3]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{i:05d}.{ext}" for i in range(4) for ext in ("png", "txt")]  # no temporary files left
    for i in range(4):
        image, text, _ = sample(i, seed=2)
        assert (tmp_path / f"{i:05d}.png").read_bytes() == png_bytes(image)
        assert (tmp_path / f"{i:05d}.txt").read_text().strip() == text

    # Files already there are kept as they are; a missing half of a pair is written again.
    (tmp_path / "00001.png").write_bytes(b"kept")
    (tmp_path / "00002.txt").unlink()
    assert write_dataset(tmp_path, 5, seed=2) == [2, 4]
    assert (tmp_path / "00001.png").read_bytes() == b"kept"
    assert (tmp_path / "00002.txt").read_text().strip() == sample(2, seed=2)[1]
    assert write_dataset(tmp_path, 5, seed=2) == []


def test_dreambooth_reads_the_captions(tmp_path):
    from data.dreambooth import ImageFolder  # imports torch

    write_dataset(tmp_path, 3, seed=1)
    folder = ImageFolder(tmp_path, prompt="unused")
    assert folder.prompts == [sample(i, seed=1)[1] for i in range(3)]
