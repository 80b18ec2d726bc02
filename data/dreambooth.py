"""DreamBooth data: a folder of images with prompts, and the per-step augmentation with SDXL's
micro-conditioning computed from each image's own resize and crop (where to: its placement, data/buckets.py).

Randomness comes from a generator the trainer seeds with (seed, step, sample index), so an example
is a pure function of those numbers: the run does not depend on the number of processes, and a
resumed run sees exactly the data the uninterrupted one would have.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.files import LoadError, check_output
from sampling import images

# A folder's images are its files with these suffixes (any case), decoded by PIL from their content; other
# files (captions, notes) are passed over, and an image that does not decode stops the run in one line.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """A problem with the user's images; the message names the path."""


@dataclass
class Example:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]: the bucket's size (the resolution's without buckets)
    prompt: str
    original_size: tuple  # (height, width) of the file
    crop_top_left: tuple  # (top, left) of the crop in the resized (and flipped) image
    target_size: tuple  # (H, W): the bucket
    mask: torch.Tensor | None = None  # (1, H, W) in [0, 1], cropped and flipped with the pixels (masked_loss)
    control: torch.Tensor | None = None  # (3, H, W) in [0, 1]: the control map, likewise (task="controlnet")


class ImageFolder:
    """The images of one folder (sorted by name), each with its prompt: a same-named .txt if present,
    else `prompt`, and its size. Every image is opened once up front, so a bad file stops the run before
    training. `placements` (one data.buckets.Placement per image) is set by the trainer."""

    def __init__(self, folder, prompt, what="image folder"):
        folder = Path(folder)
        check_folder(folder, what)
        if not folder.is_dir():
            raise DataError(f"{what} {folder} does not exist; create it and put the images there")
        self.paths = image_paths(folder)
        if not self.paths:
            raise DataError(f"{what} {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        self.sizes = [open_rgb(path).size for path in self.paths]  # (w, h); decoded in full: a truncated file fails
        self.placements = None  # here, not at step 1000
        self.rules = None  # a dataset_config subset per image (from_subsets); None: the config's fields
        self.prompts = [read_caption(p.with_suffix(".txt")) if p.with_suffix(".txt").exists() else prompt
                        for p in self.paths]

    @classmethod
    def from_subsets(cls, subsets):
        """kohya's subsets (data.kohya_config.Subset) as one folder: each image num_repeats times, captioned by
        its <name><caption_extension>, else the subset's class_tokens, else "" (kohya's order), with its subset's
        caption, crop and flip rules (`rules`)."""
        self = cls.__new__(cls)
        self.paths, self.prompts, self.sizes, self.rules, self.placements = [], [], [], [], None
        for subset in subsets:
            for path in image_paths(subset.image_dir):
                size = open_rgb(path).size
                caption = Path(str(path.with_suffix("")) + subset.caption_extension)
                prompt = read_caption(caption) if caption.is_file() else subset.class_tokens or ""
                self.paths += [path] * subset.num_repeats
                self.prompts += [prompt] * subset.num_repeats
                self.sizes += [size] * subset.num_repeats
                self.rules += [subset] * subset.num_repeats
        return self

    def __len__(self):
        return len(self.paths)

    def subset(self, indices):
        """The same folder with only these images (a held-out split)."""
        part = ImageFolder.__new__(ImageFolder)
        part.paths, part.prompts, part.sizes = ([getattr(self, a)[i] for i in indices] for a in ("paths", "prompts", "sizes"))
        part.rules = self.rules and [self.rules[i] for i in indices]
        part.placements = None
        return part

    def example(self, index, center_crop, random_flip, generator, masks=False, controls=None):
        """Resize to the image's placement (covering its bucket), flip (p = 0.5), crop the bucket (centred, or at
        random); SDXL's size conditions as its paper defines them: the file's size, the crop's top-left in the
        resized image, the bucket. masks: False for none, else the image's mask (mask_of; a folder or None);
        controls: None, or the folder of the images' control maps (control_of); each resized, flipped and cropped
        as the pixels are."""
        layers = [open_rgb(self.paths[index])] + ([self.mask_of(index, masks)] if masks is not False else [])
        layers += [self.control_of(index, controls)] if controls is not None else []
        original_size = (layers[0].height, layers[0].width)
        (width, height), resized = self.placements[index].bucket, self.placements[index].resized
        layers = [layer.resize(resized, Image.BICUBIC) for layer in layers]  # covering the bucket (a copy if same size)
        # Draw every random number, used or not, so the stream does not depend on the settings.
        coin, top_u, left_u = torch.rand(3, generator=generator).tolist()
        if random_flip and coin < 0.5:  # before the crop: the crop offset stays true
            layers = [layer.transpose(Image.FLIP_LEFT_RIGHT) for layer in layers]
        if center_crop:
            top, left = (resized[1] - height) // 2, (resized[0] - width) // 2
        else:
            top = int(top_u * (resized[1] - height + 1))
            left = int(left_u * (resized[0] - width + 1))
        layers = [np.asarray(layer.crop((left, top, left + width, top + height)), dtype=np.float32) for layer in layers]
        pixels = torch.from_numpy(layers[0]).permute(2, 0, 1) / 127.5 - 1  # (3, H, W)
        mask = torch.from_numpy(layers[1])[None] / 255 if masks is not False else None  # (1, H, W)
        control = torch.from_numpy(layers[-1]).permute(2, 0, 1) / 255 if controls is not None else None  # (3, H, W)
        return Example(pixels, self.prompts[index], original_size, (top, left), (height, width), mask, control)

    def mask_of(self, index, folder=None):
        """An image's loss mask as a grayscale image of its size (white = full weight): the image of the same name
        in `folder` (any image suffix), else the image's own alpha channel, else all white (kohya's order)."""
        mask = self.companion(index, folder, "mask") if folder is not None else None
        if mask is not None:
            return mask.convert("L")
        with Image.open(self.paths[index]) as image:
            if "A" in image.getbands() or "transparency" in image.info:
                return image.convert("RGBA").getchannel("A")
            return Image.new("L", image.size, 255)

    def control_of(self, index, folder):
        """An image's control map (task="controlnet"): the RGB image of the same name in `folder` (any image
        suffix), of the image's size; DataError if there is none."""
        control = self.companion(index, folder, "control map")
        if control is None:
            path = self.paths[index]
            raise DataError(f"{path} has no control map in {folder} (an image named {path.stem}.png or .jpg ...); "
                            "make one, e.g. python -m sampling.preprocess canny")
        return control

    def companion(self, index, folder, what):
        """The RGB image of image `index`'s name in `folder` (any image suffix), or None; DataError if its size is
        not the image's (`what` it is, for the message: a mask, a control map)."""
        path = self.paths[index]
        for candidate in (Path(folder) / (path.stem + suffix) for suffix in IMAGE_SUFFIXES):
            if candidate.is_file():
                image = open_rgb(candidate)
                if image.size != self.sizes[index]:
                    (w, h), (W, H) = image.size, self.sizes[index]
                    raise DataError(f"{what} {candidate} is {w}x{h} but {path} is {W}x{H}; give {what}s of their "
                                    "images' sizes")
                return image
        return None


def image_paths(folder):
    """A folder's images, sorted by name: its files with IMAGE_SUFFIXES (any case), not its subfolders'."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_folder(folder, what):
    """A DataError if `folder`, or a folder above it, is a file (models.files.check_output's rule)."""
    try:
        check_output(folder, what)
    except LoadError as e:
        raise DataError(str(e)) from None


def open_rgb(path):
    """An image file decoded in full, as 8-bit RGB (sampling.images.open_rgb), or one DataError."""
    try:
        return images.open_rgb(path)
    except images.ImageError as e:
        raise DataError(f"{e}; remove or replace it") from None


def read_caption(path):
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"caption file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read caption file {path} ({e.strerror})") from None


def sample_generator(seed, step, index, stream):
    """A CPU generator for one sample of one step; `stream` separates uses (data, noise, timestep...)."""
    state = np.random.SeedSequence([seed, step, index, stream]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] % (2**63)))


def dataset_index(seed, position, length):
    """Which image the `position`-th draw of a dataset uses: a fresh permutation every epoch."""
    epoch, offset = divmod(position, length)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0]))
    return int(torch.randperm(length, generator=g)[offset])
