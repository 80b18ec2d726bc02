"""The validation loss: instance images held out of training (train/batches.py's held_out), each
noised at fixed timesteps with fixed noise and encoded once to its posterior mean, so that the number compares
across steps and across runs; logged beside the training loss (loss/validation, log.jsonl's "validation").

    ValidationSet      the held-out images' latents, size conditions, prompts and noise, made once
    validation_loss    the current model's mean loss on them
    evaluate           every validation_every steps: validation_prompt's image and the validation loss
"""

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from models.conditioning import encode_text
from models.tokenizer import tokenize
from train.batches import set_placements
from train.export import validate
from train.losses import TrainStep

TIMESTEPS = (100, 300, 500, 700, 900)  # every held-out image at each of these


@dataclass
class ValidationSet:
    latents: list  # per image (4, h, w): the posterior mean times the scaling factor
    numbers: list  # per image (6,) size conditions (the crop centred, no flip)
    prompts: list
    noise: list  # per image (len(TIMESTEPS), 4, h, w)
    texts: dict | None  # with cache_text_embeddings: {prompt: (context (77, C), pooled (P,))}


@torch.no_grad()
def validation_set(model, config, images, tokenizers, autocast, device):
    """The held-out images through the frozen VAE once, with their fixed noise (seeded by seed, image, timestep),
    and with cache_text_embeddings their prompts through the frozen text encoders once."""
    set_placements(config, [images])
    latents, numbers, noise = [], [], []
    for i in range(len(images)):
        e = images.example(i, True, False, torch.Generator())
        mean, _ = model.vae.encode(e.pixels[None].to(device))  # (1, z, h, w)
        latents.append(mean[0].float() * model.vae.config.scaling_factor)
        sizes = [*e.original_size, *e.crop_top_left, *e.target_size]
        if model.text_encoder_1 is None:  # a refiner: its fifth number is the aesthetic score (train/batches.py)
            sizes = sizes[:4] + [config.aesthetic_score]
        numbers.append(torch.tensor(sizes, dtype=torch.float32))
        seeds = [int(np.random.SeedSequence([config.seed, i, k, 13]).generate_state(1)[0]) for k in range(len(TIMESTEPS))]
        noise.append(torch.stack([torch.randn(latents[-1].shape, generator=torch.Generator().manual_seed(s))
                                  for s in seeds]))
    texts = None
    if config.cache_text_embeddings:
        with autocast:
            context, pooled = encode_text(model.text_encoder_1, model.text_encoder_2,
                                          *(tokenize(t, images.prompts).to(device) for t in tokenizers))
        texts = {p: (c.cpu(), q.cpu()) for p, c, q in zip(images.prompts, context, pooled)}
    return ValidationSet(latents, numbers, list(images.prompts), noise, texts)


@torch.no_grad()
def validation_loss(model, config, held, alpha_bars, tokenizers, autocast, device):
    """The mean L2 loss of the model as it is now over every held-out image and timestep (of its target: noise,
    or v for a v-prediction model; whatever loss_type, mask and weights the training uses)."""
    texts = held.texts
    step = TrainStep(model, cached_text=texts is not None)
    t = torch.tensor(TIMESTEPS, device=device)
    a = alpha_bars.to(device)[t][:, None, None, None]
    v_pred = model.config.prediction_type == "v_prediction"
    total = 0.0
    for latents, numbers, prompt, noise in zip(held.latents, held.numbers, held.prompts, held.noise):
        latents, noise, n = latents.to(device)[None], noise.to(device), len(TIMESTEPS)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_pred else noise
        text = (tuple(torch.stack([part] * n).to(device) for part in texts[prompt]) if texts is not None else
                (tokenize(tokenizers[0], [prompt] * n).to(device), tokenize(tokenizers[1], [prompt] * n).to(device)))
        with autocast:
            per = step(text, numbers[None].repeat(n, 1).to(device), noisy, t.float(), target, torch.ones(n, device=device),
                       torch.ones(n, device=device))
        total += per.float().mean().item()
    return total / len(held.latents)


def evaluate(model, config, step, out, writer, process, fsdp, held, alpha_bars, tokenizers, autocast, ema=None):
    """Every validation_every steps: validation_prompt's image (train/export.py) and the validation loss, of the
    EMA weights where there are some -> the loss (None if there is none this step, or on a process that does not
    log). Under FSDP every process runs the UNet (its forward gathers the shards); only process 0 writes."""
    everyone = fsdp or (ema is not None and ema.shard is not None)  # collectives: FSDP's forward, zero's EMA broadcast
    if step % config.validation_every or not (process.main or everyone) or not (config.validation_prompt or held):
        return None
    with ema.swapped() if ema is not None else nullcontext():
        if not (process.main or fsdp):  # (under zero, the others only took part in the swap)
            return None
        if config.validation_prompt:
            validate(model, config, step, out, writer if process.main else None, process.device)
        loss = validation_loss(model, config, held, alpha_bars, tokenizers, autocast, process.device) if held else None
    return loss if process.main else None
