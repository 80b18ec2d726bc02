"""A step's inputs from the data: which images a process takes (instance images, each paired with a class
image under prior preservation), their latents, noise, timesteps and targets, and the captions as token ids.

    INSTANCE, CLASS, streams    the kinds of sample and the generator stream of each random draw
    instance_images, training_data, held_out
                                the images of a run: its folders or dataset_config subsets, class images made,
                                the validation loss's held-out images
    set_placements, check_pairs, picks
                                where each image trains (its bucket), and which images a micro-step takes
    Batch, make_batch           one micro-step of one process: TrainStep's inputs (train/losses.py)
    Rules, process_caption      per-image crop, flip and caption rules; tag shuffle and dropout
    VAEBatch, make_vae_batch    the "vae" task's inputs
    EncodedImages, encode_images, encode_captions
                                cache_latents and cache_text_embeddings: the frozen encoders run once

Every random number of a sample (crop, flip, latent sample, noise, timestep, tag and caption dropout) comes
from a generator seeded by (seed, step, global sample index, stream), so a batch is a function of the global
batch, not of the number of processes, and a resumed run draws what the uninterrupted one would have. (With
buckets, which images a micro-step takes depends on batch_size x processes: that batch shares one bucket.)
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.buckets import batch_at, bucket_resolutions, check_placeable, class_sizes, cover, place
from data.class_images import generate_class_images, missing_class_images, share
from data.dreambooth import DataError, ImageFolder, dataset_index, sample_generator
from data.kohya_config import check_subsets
from models.conditioning import encode_text
from models.tokenizer import tokenize
from train.latent_cache import cache_key, read_cached, vae_fingerprint, write_cached
from train.regularisers import huber_thresholds, loss_weights, sample_noise

INSTANCE, CLASS = 0, 1  # kinds of sample
NOISE, TIMESTEP, LATENT, OFFSET, TAGS, CAPTION = 1, 2, 3, 4, 5, 6  # generator streams of a sample (0: augmentation)
NOISE_STREAMS = {"noise": NOISE, "offset": OFFSET, "multires": 7, "perturbation": 8}  # train/regularisers.py's


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


@dataclass
class Batch:
    """TrainStep's inputs for n samples: this process's instance images, then their paired class images."""

    text: tuple  # token ids (n, 77) of each tokenizer; with cache_text_embeddings, (context, pooled) instead
    numbers: torch.Tensor  # (n, 6) size conditions: original h, w, crop top, left, target h, w (a refiner: 5)
    noisy: torch.Tensor  # (n, 4, H/8, W/8) the latents noised to timestep t (one bucket's size)
    t: torch.Tensor  # (n,) timesteps, as floats
    target: torch.Tensor  # (n, 4, H/8, W/8) what the UNet should predict: the noise, or v
    weight: torch.Tensor  # (n,) Min-SNR-gamma weights, else ones
    text_kept: torch.Tensor  # (n,) 0 where caption dropout drops the caption, else 1
    huber_c: torch.Tensor | None = None  # (n,) the pseudo-Huber c of each sample (loss_type huber, smooth_l1)
    mask: torch.Tensor | None = None  # (n, 1, H/8, W/8) the loss's weights (masked_loss)
    control: torch.Tensor | None = None  # (n, 3, H, W) in [0, 1]: the control maps (task="controlnet")


def instance_images(config):
    """The instance images: dataset_config's subsets that are not is_reg, or instance_data_dir with instance_prompt."""
    if not config.dataset_config:
        return ImageFolder(config.instance_data_dir, config.instance_prompt, "instance_data_dir")
    check_subsets(config.subsets())
    subsets = [s for s in config.subsets() if not s.is_reg]
    if not subsets:
        raise DataError(f"dataset_config {config.dataset_config} has only is_reg subsets; add the subject's images")
    return ImageFolder.from_subsets(subsets)


def training_data(config, model, process):
    """{"instance": ImageFolder, "class": ImageFolder (with prior preservation)}, placed in their buckets: the class
    images are dataset_config's regularisation subsets, or class_data_dir's, made first where missing (each
    process a share; at the instance images' buckets with enable_bucket)."""
    data = {"instance": instance_images(config)}
    data["instance"], held = held_out(config, data["instance"])  # the validation loss's images, never trained on
    set_placements(config, [data["instance"]])
    if config.dataset_config and config.prior_loss_weight > 0 and config.task == "dreambooth":  # its is_reg subsets
        data["class"] = ImageFolder.from_subsets([s for s in config.subsets() if s.is_reg])
    elif config.prior_loss_weight > 0 and config.task == "dreambooth":
        todo = missing_class_images(config.class_data_dir, config.num_class_images)  # same list on every rank
        sizes = (class_sizes([p.bucket for p in data["instance"].placements], config.num_class_images)
                 if config.enable_bucket else None)  # the instance images' buckets, in proportion
        if process.ddp:
            dist.barrier()  # nobody writes before everybody has listed what is missing
        Path(config.class_data_dir).mkdir(parents=True, exist_ok=True)
        generate_class_images(model, config, share(todo, process.rank, process.world), process.rank, sizes)
        if process.ddp:
            dist.barrier()
        data["class"] = ImageFolder(config.class_data_dir, config.class_prompt, "class_data_dir")
    set_placements(config, data.values())
    check_pairs(config, data)
    if held is not None:
        set_placements(config, [held])  # (an image bucket_no_upscale cannot place: one line, before anything trains)
    return data | ({"held": held} if held is not None else {})


def held_out(config, images):
    """(training images, held-out images or None): validation_dir's folder, or the last round(validation_split * N)
    of the N distinct image files in a permutation seeded by `seed` (at least one, and at least one left to train
    on; every repeat of a held-out file is held out, and it is held out once)."""
    if config.validation_dir:
        return images, ImageFolder(config.validation_dir, config.instance_prompt, "validation_dir")
    if not config.validation_split:
        return images, None
    files = list(dict.fromkeys(images.paths))  # (num_repeats repeats a file in a dataset_config's subsets)
    n = len(files)
    count = max(1, round(config.validation_split * n))
    if count >= n:
        raise DataError(f"validation_split {config.validation_split} of {n} instance images leaves none to train on; "
                        "lower it, or give validation_dir")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    held = {files[k] for k in order[n - count:]}
    first = {path: images.paths.index(path) for path in held}
    return (images.subset([i for i, p in enumerate(images.paths) if p not in held]),
            images.subset(sorted(first.values())))


def set_placements(config, folders):
    """Each ImageFolder's placements: its images' buckets (enable_bucket), else the resolution, covered (once
    for these settings; cached latents keep theirs). DataError for an image bucket_no_upscale cannot place."""
    flags = config.bucket_flags()
    todo = [f for f in folders if hasattr(f, "sizes") and getattr(f, "placed_for", None) != (config.size, flags)]
    buckets = bucket_resolutions(flags) if todo and flags and not flags.bucket_no_upscale else None  # (every step)
    for folder in todo:
        folder.placed_for = (config.size, flags)
        for path, size in zip(folder.paths, folder.sizes) if flags else ():
            check_placeable(path, size, flags)
        folder.placements = [place(*size, flags, buckets) if flags else cover(size, config.size)
                             for size in folder.sizes]


def check_pairs(config, data):
    """With buckets, a pair's class image is one of its bucket's: every bucket the instance images fill needs
    class images, or one DataError naming the first that has none."""
    if not config.enable_bucket or "class" not in data:
        return
    missing = sorted({p.bucket for p in data["instance"].placements} - {p.bucket for p in data["class"].placements})
    if missing:
        raise DataError(f"class_data_dir {config.class_data_dir} has no image in the {missing[0][0]}x{missing[0][1]} "
                        "bucket, which instance images fill; add class images of that shape, or empty the folder so "
                        "that they are made at the instance images' buckets")


def picks(config, data, step, first):
    """This process's samples first .. first + batch_size - 1 of the step -> [(global sample index, kind)],
    [(folder, image index)]: instance images, then (with prior preservation) their paired class images. With
    buckets, a micro-step of all processes is one batch of data.buckets.batch_at, so every process's images share
    a bucket, and the class image of a pair is one of that bucket's."""
    global_batch = config.batch_size * config.grad_accum * world_size()  # samples of one optimizer step
    names = {INSTANCE: "instance", CLASS: "class"}
    keys = [(j, kind) for kind in (INSTANCE, CLASS) if names[kind] in data for j in range(first, first + config.batch_size)]
    if not config.enable_bucket:
        return keys, [(data[names[kind]], dataset_index(config.seed + kind, step * global_batch + j,
                                                        len(data[names[kind]].prompts))) for j, kind in keys]
    group = config.batch_size * world_size()  # one micro-step of every process
    micro = step * config.grad_accum + first // group
    bucket, ids = batch_at(tuple(p.bucket for p in data["instance"].placements), group, config.seed, micro)
    chosen = [(data["instance"], ids[j % group]) for j in range(first, first + config.batch_size)]
    if "class" in data:
        members = [i for i, p in enumerate(data["class"].placements) if p.bucket == bucket]
        chosen += [(data["class"], members[dataset_index(config.seed + CLASS, micro * group + j % group, len(members))])
                   for j in range(first, first + config.batch_size)]
    return keys, chosen


def make_batch(config, data, model, tokenizers, alpha_bars, step, first, device, texts=None):
    """This process's samples first .. first + batch_size - 1 of the step: instance images first, then (with
    prior preservation) their paired class images. `data` holds ImageFolders, or EncodedImages with
    cache_latents; `texts` is encode_captions()' cache with cache_text_embeddings. -> Batch"""
    set_placements(config, data.values())
    keys, chosen = picks(config, data, step, first)  # instance j and class j form pair j
    rules = [rules_of(config, folder, i) for folder, i in chosen]
    gens = lambda stream: [sample_generator(config.seed, step, j, 10 * kind + stream) for j, kind in keys]
    with torch.no_grad():
        if config.cache_latents:
            mean, logvar = (torch.stack([getattr(folder, a)[i] for folder, i in chosen]) for a in ("mean", "logvar"))
            numbers = torch.stack([folder.numbers[i] for folder, i in chosen])
        else:
            examples = [folder.example(i, rule.center_crop, rule.flip, g, config.mask_dir if config.masked_loss else False,
                                       config.control_dir) for (folder, i), rule, g in zip(chosen, rules, gens(0))]
            mean, logvar = model.vae.encode(torch.stack([e.pixels for e in examples]).to(device))  # (n, z, h, w)
            numbers = torch.tensor([[*e.original_size, *e.crop_top_left, *e.target_size] for e in examples],
                                   dtype=torch.float32, device=device)
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens(LATENT)]).to(device)
        latents = (mean + torch.exp(0.5 * logvar) * eps) * model.vae.config.scaling_factor  # (n, 4, H/8, W/8)
    noise, input_noise = (x.to(device) for x in sample_noise(config, latents.shape[1:], gens, NOISE_STREAMS))
    t = torch.cat([torch.randint(0, config.max_timestep or len(alpha_bars), (1,), generator=g) for g in gens(TIMESTEP)]).to(device)
    a = alpha_bars.to(device)[t][:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * input_noise  # q(x_t | x_0), variance preserving
    v_pred = model.config.prediction_type == "v_prediction"  # v_pred marker keys / a folder's scheduler config
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_pred else noise
    weight, huber_c = loss_weights(config, a, v_pred, t), huber_thresholds(config, t, alpha_bars)
    mask = (F.interpolate(torch.stack([e.mask for e in examples]), size=latents.shape[-2:], mode="area").to(device)
            if config.masked_loss else None)  # (n, 1, h, w): the loss's weight per latent pixel
    prompts = [process_caption(folder.prompts[i], rule, g) for (folder, i), rule, g in zip(chosen, rules, gens(TAGS))]
    text_kept = torch.tensor([float(torch.rand(1, generator=g) >= rule.caption_dropout_rate)
                              for rule, g in zip(rules, gens(CAPTION))], device=device)  # (n,) 0: caption dropped
    if model.text_encoder_1 is None:
        # A refiner's negative is the encoded empty prompt with the negative aesthetic score (diffusers'
        # force_zeros_for_empty_prompt=False): a dropped caption becomes exactly that, not zeros.
        prompts = [p if kept else "" for p, kept in zip(prompts, text_kept.tolist())]
        scores = torch.where(text_kept > 0, config.aesthetic_score, config.negative_aesthetic_score)
        numbers = torch.cat([numbers[:, :4], scores[:, None]], dim=1)  # orig h, w, crop top, left, score
        text_kept = torch.ones_like(text_kept)
    if texts is not None:
        text = tuple(torch.stack(part).to(device) for part in zip(*(texts[p] for p in prompts)))  # context, pooled
    else:
        text = tokenize(tokenizers[0], prompts).to(device), tokenize(tokenizers[1], prompts).to(device)
    control = torch.stack([e.control for e in examples]).to(device) if config.control_dir else None
    return Batch(text, numbers, noisy, t.float(), target, weight, text_kept, huber_c, mask, control)


@dataclass(frozen=True)
class Rules:
    """How one image is cropped, flipped and captioned: its dataset_config subset's keys, or the config's fields."""

    center_crop: bool
    flip: bool
    keep_tokens: int
    shuffle_caption: bool
    caption_dropout_rate: float
    caption_tag_dropout_rate: float


def rules_of(config, folder, i):
    subset = folder.rules[i] if getattr(folder, "rules", None) else None
    if subset is None:
        return Rules(config.center_crop, config.random_flip, config.keep_tokens, config.shuffle_caption,
                     config.caption_dropout_rate, config.caption_tag_dropout_rate)
    return Rules(not subset.random_crop, subset.flip_aug, subset.keep_tokens, subset.shuffle_caption,
                 subset.caption_dropout_rate, subset.caption_tag_dropout_rate)


def process_caption(prompt, rule, generator):
    """kohya's caption processing: the comma-separated tags past the first keep_tokens shuffled (shuffle_caption),
    then each of them dropped with probability caption_tag_dropout_rate."""
    keep, rate = rule.keep_tokens, rule.caption_tag_dropout_rate
    if rate == 0 and not rule.shuffle_caption:
        return prompt
    tags = [tag.strip() for tag in prompt.split(",")]
    if rule.shuffle_caption:
        tags = tags[:keep] + [tags[keep + k] for k in torch.randperm(max(len(tags) - keep, 0), generator=generator).tolist()]
    draws = torch.rand(len(tags), generator=generator).tolist()
    return ", ".join(tag for i, (tag, u) in enumerate(zip(tags, draws)) if i < keep or u >= rate)


@dataclass
class VAEBatch:
    """VAEStep's inputs: this process's instance images and the noise that samples their latents."""

    pixels: torch.Tensor  # (n, 3, H, W) in [-1, 1]
    eps: torch.Tensor  # (n, z, H/8, W/8)


def make_vae_batch(config, data, model, step, first, device):
    """The "vae" task's inputs for this process's samples first .. first + batch_size - 1 -> VAEBatch."""
    global_batch = config.batch_size * config.grad_accum * world_size()
    set_placements(config, [data["instance"]])
    pixels, eps = [], []
    for j in range(first, first + config.batch_size):
        index = dataset_index(config.seed, step * global_batch + j, len(data["instance"]))
        g = sample_generator(config.seed, step, j, 0)
        pixels.append(data["instance"].example(index, config.center_crop, config.random_flip, g).pixels)
        f, (width, height) = model.config.vae.pixels_per_latent, config.size  # image pixels per latent pixel
        z_shape = (model.config.vae.z_channels, height // f, width // f)
        eps.append(torch.randn(z_shape, generator=sample_generator(config.seed, step, j, LATENT)))
    return VAEBatch(torch.stack(pixels).to(device), torch.stack(eps).to(device))


@dataclass
class EncodedImages:
    """A folder's images through the frozen VAE, for cache_latents: posterior mean and logvar (N, z, H/8, W/8), or
    N tensors (z, h, w) when buckets give them several sizes, the size conditions (N, 6), the prompts and the
    placements."""

    mean: torch.Tensor | list
    logvar: torch.Tensor | list
    numbers: torch.Tensor
    prompts: list
    placements: list
    rules: list | None = None  # the ImageFolder's dataset_config subsets


@torch.no_grad()
def encode_images(model, images, config, device, chunk=64, count=None):
    """The first `count` (default: every) image of an ImageFolder, center-cropped and unflipped as
    cache_latents requires, encoded once, `chunk` images of one bucket at a time; with cache_latents_to_disk,
    read from the files beside the images where they match (train/latent_cache.py), written where not."""
    count = len(images) if count is None else min(count, len(images))
    set_placements(config, [images])
    means, logvars, numbers = [None] * count, [None] * count, [None] * count
    to_disk = getattr(config, "cache_latents_to_disk", False)
    keys = {}
    if to_disk:
        digest = vae_fingerprint(model.vae)
        keys = {i: cache_key(images.paths[i], images.placements[i], digest) for i in range(count)}
        for i in range(count):
            cached = read_cached(images.paths[i], keys[i])
            if cached is not None:
                means[i], logvars[i] = (t.to(device) for t in cached[:2])
                numbers[i] = cached[2].tolist()
    first = {}  # an image num_repeats times is encoded once
    for i in range(count):
        first.setdefault(images.paths[i], i)
    by_bucket = {}
    for i in (i for i in range(count) if means[i] is None and first[images.paths[i]] == i):
        by_bucket.setdefault(images.placements[i].bucket, []).append(i)
    for members in by_bucket.values():
        for start in range(0, len(members), chunk):
            run = members[start:start + chunk]
            examples = [images.example(i, True, False, torch.Generator()) for i in run]
            mean, logvar = model.vae.encode(torch.stack([e.pixels for e in examples]).to(device))
            for k, (i, e) in enumerate(zip(run, examples)):
                means[i], logvars[i] = mean[k], logvar[k]
                numbers[i] = [*e.original_size, *e.crop_top_left, *e.target_size]
                if to_disk:
                    write_cached(images.paths[i], keys[i], mean[k], logvar[k], numbers[i])
    for i in range(count):  # the repeats share their first's latents
        means[i], logvars[i], numbers[i] = (x[first[images.paths[i]]] for x in (means, logvars, numbers))
    if len({m.shape for m in means}) == 1:  # one size: tensors, as the VAE task's scaling factor reads them
        means, logvars = torch.stack(means), torch.stack(logvars)
    return EncodedImages(means, logvars, torch.tensor(numbers, dtype=torch.float32, device=device), images.prompts,
                         images.placements[:count], images.rules and images.rules[:count])


@torch.no_grad()
def encode_captions(model, data, tokenizers, autocast, device, chunk=64):
    """cache_text_embeddings: every prompt of the data (and a refiner's dropped-caption "") through the frozen
    text encoders once, under the loop's autocast -> {prompt: (context (77, C), pooled (P,))}, kept on the CPU.
    Tokenized as TrainStep's path does (one 77-token chunk, no weights), not as sampling.prompts.encode_prompts."""
    prompts = sorted({p for folder in data.values() for p in folder.prompts}
                     | ({""} if model.text_encoder_1 is None else set()))
    cache = {}
    for start in range(0, len(prompts), chunk):
        batch = prompts[start:start + chunk]
        with autocast:
            context, pooled = encode_text(model.text_encoder_1, model.text_encoder_2,
                                          tokenize(tokenizers[0], batch).to(device), tokenize(tokenizers[1], batch).to(device))
        cache.update({p: (c.cpu(), q.cpu()) for p, c, q in zip(batch, context, pooled)})
    return cache
