"""The DreamBooth demo's measurements, on stand-in 'models' whose behaviour is known: one that has
learned the subject and keeps the class, one whose class has collapsed onto the subject."""

from dataclasses import replace

import numpy as np
import pytest

from data import classifier, procedural
from train import demo


class Learned:
    """Draws the subject for 'sks' prompts (with any expression and background asked for) and a
    random default character for '1girl'."""

    def __init__(self, class_is_subject=False):
        self.class_is_subject = class_is_subject

    def __call__(self, settings, progress=False):
        tags = [t.strip() for t in settings.prompt.split(",")]
        images = []
        for i in range(settings.num_images):
            rng = np.random.default_rng([settings.seed, i])
            if "sks" in tags or self.class_is_subject:
                asked = {"expression": next((t for t in tags if t in procedural.EXPRESSIONS), demo.SUBJECT.expression),
                         "background": next((t[: -len(" background")] for t in tags if t.endswith(" background")),
                                            demo.SUBJECT.background)}
                character = replace(demo.SUBJECT, **asked)
            else:
                character = procedural.random_character(rng)
            images.append(procedural.draw(character, settings.width, rng))
        return images


@pytest.fixture(scope="module")
def reader():
    return classifier.load()


def test_the_instance_images_are_read_as_the_subject(reader, tmp_path):
    demo.write_instance_images(tmp_path)
    from PIL import Image

    images = [Image.open(tmp_path / f"{i}.png") for i in range(demo.INSTANCE_IMAGES)]
    assert classifier.tag_accuracy(reader, images, [demo.SUBJECT] * len(images))["mean"] == 1.0
    assert not procedural.DEFAULT_ACCESSORIES.count(demo.SUBJECT.accessory) and demo.SUBJECT.heterochromia


def test_a_model_that_learned_the_subject_and_kept_the_class(reader):
    numbers, images = demo.measure(Learned(), reader, count=24)
    assert len(images["subject"]) == len(images["context"]) == len(images["class"]) == 24
    assert numbers["subject fidelity"] > 0.97 and numbers["whole subject"] > 0.9
    assert numbers["prompt fidelity"] > 0.95 and numbers["subject kept in new contexts"] > 0.95
    assert numbers["class diversity"] > 0.7 and numbers["subject leak into class"] < 0.05


def test_a_class_collapsed_onto_the_subject(reader):
    numbers, _ = demo.measure(Learned(class_is_subject=True), reader, count=24)
    assert numbers["subject leak into class"] > 0.95 and numbers["class diversity"] < 0.1


def test_entropy_and_contexts():
    assert demo.normalised_entropy([2] * 10, 6) == 0
    assert demo.normalised_entropy(list(range(6)) * 3, 6) == pytest.approx(1.0)
    assert demo.normalised_entropy([0, 1], 4) == pytest.approx(0.5)
    contexts = demo.new_contexts(200, seed=1)
    assert all(e != demo.SUBJECT.expression and b != demo.SUBJECT.background for e, b in contexts)
    assert len(set(contexts)) > 10


class Framed:
    """Draws the subject's head at the top of a portrait or the left of a landscape (as the non-square demo's
    pictures frame her), or, with `misplaced`, at the other end, as a model trained on square crops placed it."""

    def __init__(self, misplaced=False):
        self.misplaced = misplaced

    def __call__(self, settings, progress=False):
        from PIL import Image

        images = []
        for i in range(settings.num_images):
            head = procedural.draw(demo.SUBJECT, 64, np.random.default_rng([settings.seed, i]))
            canvas = Image.new("RGB", (settings.width, settings.height), head.getpixel((0, 0)))
            far = (settings.width - 64, settings.height - 64)
            canvas.paste(head, far if self.misplaced else (0, 0))
            images.append(canvas)
        return images


def test_the_non_square_demo_reads_the_head_square(reader, tmp_path):
    from PIL import Image

    from train import demo_buckets

    demo_buckets.write_shaped_images(tmp_path)
    pictures = sorted(tmp_path.glob("*.png"))
    assert [Image.open(p).size for p in pictures] == [(64, 96)] * 3 + [(96, 64)] * 3
    heads = [demo_buckets.head_square(Image.open(p)) for p in pictures]
    assert classifier.tag_accuracy(reader, heads, [demo.SUBJECT] * len(heads))["mean"] > 0.75  # 0.79: the jitter
    whole, _ = demo_buckets.subject_fidelity(Framed(), reader, count=8)
    elsewhere, _ = demo_buckets.subject_fidelity(Framed(misplaced=True), reader, count=8)
    assert min(whole.values()) > 0.9 and max(elsewhere.values()) < 0.8  # the measure looks where her head belongs
