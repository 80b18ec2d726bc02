"""An attribute classifier for the procedural portraits: the measuring instrument for prompt following.

A small CNN reads a 64x64 portrait and names each attribute from data.procedural's vocabularies:
hair colour, hair length, the colour of each eye (heterochromia is the two eye heads disagreeing),
expression, accessory (star hairpin included) and background. It is trained here, on freshly drawn
portraits, and the trained weights ship beside this file as classifier.safetensors (fp16).

The training distribution is procedural's default one widened to the rare values the default sampler
never makes: every accessory is equally likely (star hairpin included) and a quarter of the characters
have heterochromia, so the DreamBooth subject is measured as well as the ordinary portraits. A few
images with no portrait (flat background colours, random colour fields) are mixed in with "no idea"
targets (uniform) on every head but, for the flat ones, the background: an image without a portrait
should not be read as one with confidence (outlier exposure, Hendrycks et al. 2019,
https://arxiv.org/abs/1812.04606). Training images are also softened and noised a little, as a
generator's output would be.

    python -m data.classifier --steps 1500 --out data/classifier.safetensors
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.procedural import (
    ACCESSORIES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    EXPRESSIONS,
    EYE_COLOURS,
    HAIR_COLOURS,
    HAIR_LENGTHS,
    Character,
    draw,
    random_character,
    sample,
    widened_character,
)
from models.files import output_or_exit

DEFAULT_PATH = Path(__file__).with_name("classifier.safetensors")

# One head per attribute: name -> the vocabulary its labels index. The eyes are read separately,
# as the viewer sees them: "left_eye" is Character.eye_colour, "right_eye" its second_eye_colour
# (or eye_colour again when the eyes match). Images are never flipped, so left stays left.
ATTRIBUTES = {
    "hair_colour": HAIR_COLOURS, "hair_length": HAIR_LENGTHS, "left_eye": EYE_COLOURS, "right_eye": EYE_COLOURS,
    "expression": EXPRESSIONS, "accessory": ACCESSORIES, "background": BACKGROUNDS,
}
attribute_names = tuple(ATTRIBUTES)

# Training distribution and data, beyond procedural's defaults.
OUTLIER_RATE = 1 / 16  # share of each batch that is outlier_images (no portrait)
NOISE_STD = 0.05  # largest std of the Gaussian noise added to training images, in [-1, 1] units
# Training portrait i of seed s draws from SeedSequence([s, i, TRAIN_STREAM]); procedural's sample(i, s)
# draws from [s, i], which SeedSequence treats like [s, i, 0] (trailing zeros do not count), so a
# nonzero third word keeps every procedural seed out of training.
TRAIN_STREAM = 7_100


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 64  # other sizes are resized to this first
    channels: tuple = (32, 64, 64, 128)  # one stride-2 conv each: 64 -> 32 -> 16 -> 8 -> 4


class AttributeClassifier(nn.Module):
    """Conv stack 64x64 -> 4x4, flattened (so the heads know *where* things are: which eye, which side
    of the head), then one linear head per attribute giving logits over its vocabulary."""

    def __init__(self, config=ClassifierConfig()):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c_out in config.channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)  # 64 -> 4
        self.heads = nn.ModuleDict({name: nn.Linear(c_in * side * side, len(vocab))
                                    for name, vocab in ATTRIBUTES.items()})

    def forward(self, x):
        """(B, 3, S, S) in [-1, 1] -> {attribute: (B, len(vocabulary)) logits}."""
        h = self.features(x).flatten(1)  # (B, C * side * side)
        return {name: head(h) for name, head in self.heads.items()}


# ---- data -------------------------------------------------------------------------------------------

def labels(character):
    """{attribute: index into its vocabulary} for a Character (or a dict with Character's fields)."""
    c = character if isinstance(character, dict) else vars(character)
    return {
        "hair_colour": HAIR_COLOURS.index(c["hair_colour"]), "hair_length": HAIR_LENGTHS.index(c["hair_length"]),
        "left_eye": EYE_COLOURS.index(c["eye_colour"]),
        "right_eye": EYE_COLOURS.index(c.get("second_eye_colour") or c["eye_colour"]),
        "expression": EXPRESSIONS.index(c["expression"]), "accessory": ACCESSORIES.index(c["accessory"]),
        "background": BACKGROUNDS.index(c["background"]),
    }


def to_pixels(images, size=64):
    """PIL images or a (B, 3, H, W) tensor in [-1, 1] -> (B, 3, size, size) float in [-1, 1].
    Other sizes are resized with PIL's LANCZOS, the filter draw() itself uses to come down from its
    supersampled canvas: a portrait drawn at 128 then resized reads like one drawn at 64, where a
    bilinear resize would thin out the one-pixel mouth lines."""
    if isinstance(images, Image.Image):
        images = [images]
    if torch.is_tensor(images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}; add the batch "
                             "dimension or convert to RGB first")
        if images.abs().max() > 1.5:  # a little overshoot is normal for VAE output; 0..255 is not
            raise ValueError(f"pixel values reach {images.abs().max().item():.1f}; scale the images to [-1, 1] first")
        x = images.detach().float().cpu().clamp(-1, 1)
        if x.shape[-2:] == (size, size):
            return x
        images = [Image.fromarray(a) for a in  # via uint8 PIL images, for the same LANCZOS as above
                  ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    if not isinstance(images, (list, tuple)) or not all(isinstance(im, Image.Image) for im in images):
        raise ValueError(f"expected PIL images or a (B, 3, H, W) tensor, got {type(images).__name__}")
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, size, size)


def draw_pool(count, seed, size=64):
    """`count` jittered training portraits: (count, 3, size, size) uint8 and {attribute: (count,) long}.
    Portrait i is a pure function of (seed, i)."""
    pixels = np.empty((count, size, size, 3), dtype=np.uint8)
    targets = {name: np.empty(count, dtype=np.int64) for name in ATTRIBUTES}
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, TRAIN_STREAM]))
        character = widened_character(rng)
        pixels[i] = np.asarray(draw(character, size, rng))  # rng also jitters the head
        for name, index in labels(character).items():
            targets[name][i] = index
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), {k: torch.from_numpy(v) for k, v in targets.items()}


def outlier_images(count, generator, size=64):
    """Images with no portrait in them, (count, 3, size, size) in [-1, 1], and their background labels:
    the first half are flat background colours (labelled), the rest random colour fields from one flat
    colour to per-pixel noise (label -1: no background to name)."""
    n_flat = count // 2
    colours = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=torch.float32) / 127.5 - 1  # (K, 3)
    which = torch.randint(len(BACKGROUNDS), (n_flat,), generator=generator)
    flat = colours[which][:, :, None, None].expand(n_flat, 3, size, size)
    cells = 2 ** int(torch.randint(7, (1,), generator=generator))  # 1, 2, 4 ... 64 colour cells a side
    fields = torch.rand(count - n_flat, 3, cells, cells, generator=generator) * 2 - 1
    fields = F.interpolate(fields, size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([flat, fields]), torch.cat([which, torch.full((count - n_flat,), -1)])


def head_loss(logits, target):
    """Mean over rows of the cross-entropy to `target`, or, where target is -1 (nothing to name),
    of the KL divergence to the uniform distribution: 0 when the head says "no idea"."""
    logp = logits.log_softmax(-1)  # (B, K)
    cross_entropy = -logp.gather(1, target.clamp(min=0)[:, None])[:, 0]
    kl_to_uniform = -logp.mean(-1) - math.log(logits.shape[-1])
    return torch.where(target >= 0, cross_entropy, kl_to_uniform).mean()


# ---- training ---------------------------------------------------------------------------------------

def train_classifier(steps=1500, seed=0, pool_size=12_000, batch_size=64, lr=2e-3, weight_decay=1e-4,
                     config=ClassifierConfig(), log_every=100):
    """Train an AttributeClassifier on freshly drawn portraits; returns it in eval mode.

    Args:
        steps: optimizer steps.
        seed: fixes the portraits, the initial weights, the batches and the augmentation: same seed
            (and thread count), same weights.
        pool_size: portraits drawn up front and revisited (drawing is ~1 ms each, a step ~0.1 s).
        batch_size: images per step; OUTLIER_RATE of them are outlier_images.
        lr, weight_decay: AdamW's, with the learning rate cosine-decayed to zero.
        config: the network's shape.
        log_every: print the loss every this many steps (0: never).
    """
    with torch.random.fork_rng():  # seed the initial weights without touching the caller's global RNG
        torch.manual_seed(seed)
        model = AttributeClassifier(config)
    generator = torch.Generator().manual_seed(seed)  # batches and augmentation
    size = config.image_size
    pool, targets = draw_pool(pool_size, seed, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    n_outliers = max(2, round(batch_size * OUTLIER_RATE))
    model.train()
    for step in range(steps):
        idx = torch.randint(pool_size, (batch_size - n_outliers,), generator=generator)
        outliers, outlier_background = outlier_images(n_outliers, generator, size)
        x = torch.cat([pool[idx].float() / 127.5 - 1, outliers])  # (B, 3, S, S): portraits, then outliers
        batch_targets = {name: torch.cat([targets[name][idx], outlier_background if name == "background"
                                          else torch.full((n_outliers,), -1)]) for name in ATTRIBUTES}
        # Degrade the images a little, as a generator would: half are softened (down to between half
        # and full size and back up), and all get Gaussian noise of a random strength.
        soft = torch.rand(batch_size, generator=generator) < 0.5
        low = int(torch.randint(size // 2, size + 1, (1,), generator=generator))
        blurred = F.interpolate(F.interpolate(x, size=(low, low), mode="bilinear", antialias=True),
                                size=(size, size), mode="bilinear", align_corners=False)
        x = torch.where(soft[:, None, None, None], blurred, x)
        noise_std = NOISE_STD * torch.rand(batch_size, 1, 1, 1, generator=generator)
        x = x + noise_std * torch.randn(x.shape, generator=generator)
        logits = model(x)
        loss = sum(head_loss(logits[name], batch_targets[name]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval()


# ---- inference --------------------------------------------------------------------------------------

@torch.no_grad()
def probabilities(model, images):
    """{attribute: (B, len(vocabulary)) softmax probabilities} for PIL images or a (B, 3, H, W) tensor."""
    model.eval()
    x = to_pixels(images, model.config.image_size)
    return {name: logits.softmax(-1) for name, logits in model(x).items()}


def predict(model, images):
    """One dict per image with Character's fields (so `Character(**d)` and `caption` work):
    second_eye_colour is None when both eyes read the same."""
    indices = {name: p.argmax(-1).tolist() for name, p in probabilities(model, images).items()}
    out = []
    for i in range(len(indices["left_eye"])):
        word = {name: ATTRIBUTES[name][indices[name][i]] for name in ATTRIBUTES}
        out.append({"hair_colour": word["hair_colour"], "hair_length": word["hair_length"],
                    "eye_colour": word["left_eye"], "expression": word["expression"],
                    "accessory": word["accessory"], "background": word["background"],
                    "second_eye_colour": None if word["right_eye"] == word["left_eye"] else word["right_eye"]})
    return out


def tag_accuracy(model, images, characters):
    """{attribute: share of images whose attribute is read as in its character, "mean": their mean}."""
    if len(images) != len(characters):
        raise ValueError(f"{len(images)} images but {len(characters)} characters; pass one character per image")
    predicted = [labels(p) for p in predict(model, images)]
    truth = [labels(c) for c in characters]
    accuracy = {name: float(np.mean([p[name] == t[name] for p, t in zip(predicted, truth)])) for name in ATTRIBUTES}
    accuracy["mean"] = float(np.mean(list(accuracy.values())))
    return accuracy


# ---- files ------------------------------------------------------------------------------------------

def save(model, path=DEFAULT_PATH, dtype=torch.float16):
    """Write the weights (fp16 by default: the file stays small) and the config as safetensors metadata."""
    state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(model.config))})


def load(path=DEFAULT_PATH):
    """An AttributeClassifier in eval mode (fp32) from a file written by `save`; the shipped one by default."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier weights at {path}; train them with `python -m data.classifier`")
    with safe_open(str(path), "pt") as f:
        fields = json.loads(f.metadata()["config"])
    model = AttributeClassifier(ClassifierConfig(**{**fields, "channels": tuple(fields["channels"])}))
    state = {k: v.to(model.state_dict()[k].dtype) for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---- held-out check ---------------------------------------------------------------------------------

def held_out_set(count, seed, rare_share=0.2, size=64):
    """`count` portraits for evaluation: procedural's sample(i, seed, size) (the default distribution),
    except the last `rare_share` of them, which are heterochromia + star hairpin characters drawn from
    the same random stream as sample(i, seed). Returns (images, characters)."""
    images, characters = [], []
    n_rare = round(count * rare_share)
    for i in range(count):
        if i < count - n_rare:
            image, _, character = sample(i, seed, size)
        else:
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))  # sample()'s stream
            c = random_character(rng)
            others = [e for e in EYE_COLOURS if e != c.eye_colour]
            character = Character(c.hair_colour, c.hair_length, c.eye_colour, c.expression, "star hairpin",
                                  c.background, second_eye_colour=others[rng.integers(len(others))])
            image = draw(character, size, rng)
        images.append(image)
        characters.append(character)
    return images, characters


def main():
    parser = argparse.ArgumentParser(description="Train the procedural-portrait attribute classifier.")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--eval-seed", type=int, default=12_345, help="procedural seed of the held-out portraits")
    args = parser.parse_args()
    output_or_exit(args.out, "--out", folder=False)  # before the training
    torch.set_num_threads(args.threads)
    start = time.time()
    model = train_classifier(args.steps, args.seed)
    print(f"trained in {time.time() - start:.0f} s; "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    save(model, args.out)
    model = load(args.out)  # evaluate what was written (fp16 round trip included)
    for size in (64, 128):
        images, characters = held_out_set(1000, args.eval_seed, size=size)
        accuracy = tag_accuracy(model, images, characters)
        print(f"held-out accuracy, 1000 portraits of seed {args.eval_seed} drawn at {size}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
