"""kohya sd-scripts' dataset config (`dataset_config = "file.toml"`, read with the standard library's tomllib):
[general] holds defaults for every dataset and subset, [[datasets]] a dataset's size, batch and bucket keys,
[[datasets.subsets]] each image folder with its caption and augmentation keys; a key set lower wins. kohya's
own defaults apply (caption_extension ".caption", flip_aug False, random_crop False). plainxl trains one
dataset: its subsets with is_reg = true are the class (regularisation) images, the others the instance images.

    read_dataset_config   a TOML file -> DatasetConfig (the TrainConfig fields it sets, and its subsets)
"""

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from data.dreambooth import DataError, image_paths

DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale", "prior_loss_weight"}  # the TrainConfig fields of the same names


@dataclass(frozen=True)
class Subset:
    """One [[datasets.subsets]] table, kohya's DreamBoothSubsetParams for the keys plainxl reads."""
    image_dir: str
    num_repeats: int = 1  # each image counts this many times per epoch
    class_tokens: str | None = None  # the caption of an image without a caption file
    caption_extension: str = ".caption"
    is_reg: bool = False  # regularisation (class) images
    keep_tokens: int = 0  # leading comma-separated tags never shuffled or dropped
    shuffle_caption: bool = False
    flip_aug: bool = False
    random_crop: bool = False  # else the crop is centred
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0


SUBSET_KEYS = {f.name for f in fields(Subset)}
TYPES = {"image_dir": str, "class_tokens": str, "caption_extension": str, "num_repeats": int, "keep_tokens": int,
         "is_reg": bool, "shuffle_caption": bool, "flip_aug": bool, "random_crop": bool,
         "caption_dropout_rate": (int, float), "caption_tag_dropout_rate": (int, float)}
RANGES = {"num_repeats": (1, 10**6), "keep_tokens": (0, 10**6), "caption_dropout_rate": (0, 1),
          "caption_tag_dropout_rate": (0, 1)}
TYPE_NAMES = {name: "a number" if kind == (int, float) else {str: "a string", int: "a whole number",
                                                             bool: "true or false"}[kind] for name, kind in TYPES.items()}


@dataclass(frozen=True)
class DatasetConfig:
    settings: dict  # TrainConfig fields: resolution, batch_size, the bucket keys, prior_loss_weight
    subsets: list  # [Subset]


def read_dataset_config(path, fallback=None):
    """The TOML file -> DatasetConfig, or one ValueError naming the problem: unreadable, not TOML, keys plainxl
    does not read (all of them named), several datasets, no subsets, a value of the wrong type or out of range.
    fallback: subset keys set on the command line, used where no table sets them (kohya's last fallback)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read dataset_config {path} ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset_config {path} is not TOML ({e})") from None
    general, datasets = document.get("general", {}), document.get("datasets", [])
    unknown = sorted(set(document) - {"general", "datasets"})
    for table in [general, *datasets, *(s for d in datasets for s in d.get("subsets", []))]:
        unknown += sorted(set(table) - DATASET_KEYS - SUBSET_KEYS - {"subsets"})
    if unknown:
        raise ValueError(f"dataset_config {path} has keys plainxl does not read: {', '.join(dict.fromkeys(unknown))}; "
                         "remove them (docs/buckets.md lists the keys it reads)")
    if len(datasets) != 1 or not datasets[0].get("subsets"):
        raise ValueError(f"dataset_config {path} has {len(datasets)} [[datasets]]" + (
            "" if len(datasets) != 1 else " with no [[datasets.subsets]]") + "; plainxl trains one dataset of one or "
            "more subsets")
    dataset = datasets[0]
    settings = {k: v for k, v in (general | dataset).items() if k in DATASET_KEYS}
    subsets = []
    for table in dataset["subsets"]:
        values = {k: v for k, v in ((fallback or {}) | general | dataset | table).items() if k in SUBSET_KEYS}
        if "image_dir" not in values:
            raise ValueError(f"dataset_config {path}: a [[datasets.subsets]] has no image_dir; give each subset its folder")
        for name, value in values.items():
            if not isinstance(value, TYPES[name]) or (TYPES[name] is not bool and isinstance(value, bool)):
                raise ValueError(f"dataset_config {path}: {name} = {value!r} is not {TYPE_NAMES[name]}")
            low, high = RANGES.get(name, (None, None))
            if low is not None and not low <= value <= high:
                raise ValueError(f"dataset_config {path}: {name} = {value!r} is outside {low} .. {high}")
        if not values.get("caption_extension", ".").startswith("."):  # kohya's "txt" means ".txt"
            values["caption_extension"] = "." + values["caption_extension"]
        folder = Path(values["image_dir"])
        values["image_dir"] = str(folder if folder.is_absolute() else path.parent / folder)
        subsets.append(Subset(**values))
    if "resolution" in settings and isinstance(settings["resolution"], list):
        settings["resolution"] = tuple(settings["resolution"])
    return DatasetConfig(settings, subsets)


def check_subsets(subsets):
    """Every subset's folder exists and holds images, or one DataError naming the first that does not."""
    for subset in subsets:
        folder = Path(subset.image_dir)
        if not folder.is_dir() or not image_paths(folder):
            raise DataError(f"subset image_dir {folder} " + ("does not exist" if not folder.is_dir() else "has no images")
                            + "; fix image_dir in the dataset_config, or remove that subset")
