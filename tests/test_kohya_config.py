"""kohya's dataset config (data/kohya_config.py, dataset_config = "file.toml"): the DreamBooth example of kohya's
docs/config_README-en.md reads as kohya reads it ([general] < [[datasets]] < [[datasets.subsets]]), trains unchanged
on the tiny model, its is_reg subset is the class images, num_repeats and class_tokens hold, shuffle_caption keeps
the first keep_tokens tags, and unknown keys, several datasets and an empty subset folder are one line each."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_dreambooth import args, finish, losses, run

from data.dreambooth import DataError, ImageFolder, sample_generator
from data.kohya_config import read_dataset_config
from train.batches import Rules, instance_images, process_caption
from train.config import ConfigError, TrainConfig
from train.dreambooth import main

pytestmark = pytest.mark.filterwarnings("ignore")

# kohya's docs/config_README-en.md example, its DreamBooth dataset (the fine-tuning one needs a metadata_file; plainxl
# trains one dataset), the folders replaced by {root}/...
DOCS_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{root}/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{root}/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{root}/reg'
  class_tokens = 'human'
  keep_tokens = 1
"""


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for name, n, size in [("hoge", 2, (40, 56)), ("fuga", 1, (64, 48)), ("reg", 2, (48, 48))]:
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "hoge" / "1.txt").write_text("hoge girl, red hair, smile, outdoors")  # caption_extension '.txt'
    (tmp_path / "hoge" / "0.caption").write_text("not read: the extension is .txt here")
    toml = tmp_path / "dataset.toml"
    toml.write_text(DOCS_EXAMPLE.format(root=tmp_path.as_posix()))
    return tmp_path


def test_the_docs_example_reads_as_kohya_reads_it(folders):
    dataset = read_dataset_config(folders / "dataset.toml")
    assert dataset.settings == {"resolution": 512, "batch_size": 4}
    hoge, fuga, reg = dataset.subsets
    assert (hoge.keep_tokens, fuga.keep_tokens, reg.keep_tokens) == (2, 3, 1)  # subset < dataset < general
    assert all(s.shuffle_caption and s.caption_extension == ".txt" for s in dataset.subsets)
    assert reg.is_reg and not hoge.is_reg and not hoge.flip_aug and not hoge.random_crop  # kohya's defaults
    config = TrainConfig(dataset_config=str(folders / "dataset.toml"))
    assert (config.resolution, config.batch_size, config.prior_loss_weight) == (512, 4, 1.0)
    images = instance_images(config)
    assert images.prompts == ["hoge girl", "hoge girl, red hair, smile, outdoors", "fuga boy"]  # class_tokens, else .txt


def test_num_repeats_and_no_reg_subset(folders):
    text = (folders / "dataset.toml").read_text().replace("keep_tokens = 3", "keep_tokens = 3\n  num_repeats = 3")
    (folders / "dataset.toml").write_text(text.split("  [[datasets.subsets]]\n  is_reg")[0])
    config = TrainConfig(dataset_config=str(folders / "dataset.toml"))
    assert config.prior_loss_weight == 0.0  # no regularisation subset: no prior preservation, as kohya
    images = ImageFolder.from_subsets(config.subsets())
    assert len(images) == 2 + 3 and images.prompts.count("fuga boy") == 3


def test_shuffle_caption_keeps_the_first_keep_tokens():
    rule = Rules(True, False, 2, True, 0.0, 0.0)
    prompt = "sks, 1girl, red hair, smile, outdoors, sky"
    seen = {process_caption(prompt, rule, sample_generator(0, s, 0, 5)) for s in range(200)}
    assert all(p.startswith("sks, 1girl, ") and sorted(p.split(", ")) == sorted(prompt.split(", ")) for p in seen)
    assert len(seen) > 20  # the four other tags in many orders
    assert process_caption(prompt, Rules(True, False, 2, False, 0.0, 0.0), torch.Generator()) == prompt


@pytest.mark.slow
def test_the_docs_example_trains_unchanged(folders, tmp_path):
    """kohya's example as it is (512 px, batch 4, its three subsets) through the loop, two steps on the tiny model."""
    from models.loading import save_single_file
    from models.sdxl import SDXL, TINY

    torch.manual_seed(0)
    save_single_file(SDXL(TINY), folders / "tiny.safetensors")
    out = tmp_path / "run"
    argv = [a for a in args(folders, out, max_steps=2) if not a.startswith(("--resolution", "--batch_size"))]
    finish(run([*argv, f"--dataset_config={folders / 'dataset.toml'}"]))
    log = losses(out)
    assert len(log) == 2 and all(np.isfinite(r["prior"]) and r["prior"] > 0 for r in log)  # the reg subset: class loss
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("keep_tokens = 1\n", "keep_tokens = 1\ncolor_aug = true\nface_crop_aug_range = [2.0, 4.0]\n", 1),
     "keys plainxl does not read: color_aug, face_crop_aug_range"),
    (lambda t: t + "\n[[datasets]]\nresolution = 768\n  [[datasets.subsets]]\n  image_dir = 'x'\n",
     "has 2 [[datasets]]; plainxl trains one dataset"),
    (lambda t: t.replace("keep_tokens = 3", "keep_tokens = 'three'"), "keep_tokens = 'three' is not a whole number"),
    (lambda t: t.replace("[general]", "[general"), "is not TOML"),
])
def test_a_bad_dataset_config_is_one_line(folders, edit, message):
    toml = folders / "dataset.toml"
    toml.write_text(edit(toml.read_text()))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig(dataset_config=str(toml))


def test_an_empty_subset_folder_is_one_line_before_anything_loads(folders, tmp_path, capsys):
    for p in (folders / "fuga").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="fuga has no images"):
        instance_images(TrainConfig(dataset_config=str(folders / "dataset.toml")))
    assert main([f"--dataset_config={folders / 'dataset.toml'}", f"--output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "fuga has no images" in err and not (tmp_path / "o").exists()


def test_command_line_fields_are_the_last_fallback_and_values_are_checked(folders):
    """kohya's order: subset < dataset < general < the command line; 'txt' means '.txt'; ranges are checked."""
    toml = folders / "dataset.toml"
    toml.write_text(toml.read_text().replace("caption_extension = '.txt'\n", "caption_extension = 'txt'\n"))
    config = TrainConfig(dataset_config=str(toml), caption_dropout_rate=0.25, random_flip=False, shuffle_caption=False)
    hoge = config.subsets()[0]
    assert hoge.caption_dropout_rate == 0.25 and not hoge.flip_aug  # from the command line, nowhere in the file
    assert hoge.shuffle_caption and hoge.caption_extension == ".txt"  # the file's own win; the dot added
    toml.write_text(toml.read_text().replace("keep_tokens = 3", "keep_tokens = 3\n  num_repeats = 0"))
    with pytest.raises(ConfigError, match="num_repeats = 0 is outside 1"):
        TrainConfig(dataset_config=str(toml))


def test_validation_split_holds_out_whole_files_with_their_repeats(folders):
    from train.batches import held_out

    text = (folders / "dataset.toml").read_text().replace("keep_tokens = 3", "keep_tokens = 3\n  num_repeats = 4")
    (folders / "dataset.toml").write_text(text)
    config = TrainConfig(dataset_config=str(folders / "dataset.toml"), validation_split=0.34)
    training, held = held_out(config, instance_images(config))
    assert len(held) == 1 and held.paths[0] not in training.paths  # one file of three, none of its repeats trained on
    assert len(training) + len(set(held.paths)) * (4 if "fuga" in str(held.paths[0]) else 1) == 2 + 4
