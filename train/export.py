"""What a run writes besides its checkpoints: validation images along the way, and at the end the export.

    validate            one image of validation_prompt, to output_dir/validation/ and TensorBoard
    export              output_dir/model.safetensors (official layout), or the LoRA below
    export_lora         output_dir/lora.safetensors in kohya's format, LyCORIS' for its kinds (and with merge_lora,
                        the merged model)
    set_scaling_factor  the "vae" task: the trained VAE's latent scaling factor, before its export
"""

import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.dreambooth import sample_generator
from models.adapters import kohya_metadata, save_adapters
from models.files import DTYPES
from models.loading import load, save_single_file
from models.lora import merge_lora
from sampling.pipeline import NonFiniteError, Pipeline, Settings
from train.batches import LATENT, encode_images
from train.controlnet import export_controlnet, validation_pair


def validate(model, config, step, out, writer, device):
    """One image of validation_prompt with a fixed seed, to output_dir/validation/ and TensorBoard (writer None:
    another process of an FSDP run, which takes part in the generation and writes nothing). Parts parked on the
    CPU (cache_latents, cache_text_embeddings) visit the device while they run, as with --offload."""
    model.eval()
    controlnet = getattr(model, "controlnet", None)  # task="controlnet": its image follows the first control map
    pipe = Pipeline(model, controlnets=[controlnet] if controlnet is not None else ())
    pipe.offload = device
    pair = validation_pair(config) if controlnet is not None else None
    try:
        image = pipe(Settings(prompt=config.validation_prompt, width=config.size[0],
                                         height=config.size[1], steps=config.class_steps, cfg=config.class_cfg,
                                         sampler=config.class_sampler, seed=config.seed,
                                         control_images=pair[:1] if pair else ()), progress=False)[0]
    except NonFiniteError as e:  # training goes on; the loss check stops it if the weights themselves diverged
        print(f"note: no validation image at step {step}: {e}", file=sys.stderr)
        return
    finally:
        model.train()
    if writer is None:
        return
    if pair is not None:  # control map | its image | the output
        image = Image.fromarray(np.concatenate([np.asarray(pair[0]), np.asarray(pair[1]), np.asarray(image)], axis=1))
    (out / "validation").mkdir(exist_ok=True)
    image.save(out / "validation" / f"step-{step:06d}.png")
    writer.add_image("validation", np.asarray(image), step, dataformats="HWC")


def export(model, adapters, config, out, data, device, ema=None):
    """The end of a finished run, on the main process: the trained model or its adapters; with an EMA, its
    weights as well (ema_export "beside": model-ema / lora-ema.safetensors) or instead ("model")."""
    if config.task == "vae":
        set_scaling_factor(model, data["instance"], config, device)
    kinds = [("", False)] if ema is None else [("", True)] if config.ema_export == "model" else [("", False), ("-ema", True)]
    for suffix, averaged in kinds:
        with ema.swapped() if averaged else nullcontext():
            if config.task == "controlnet":
                export_controlnet(model, config, out, suffix)
            elif adapters is None:
                save_single_file(model, out / f"model{suffix}.safetensors", dtype=config.export_dtype, overwrite=True)
                print(f"wrote {out / f'model{suffix}.safetensors'}" + (" (the EMA weights)" if averaged else ""))
            else:
                export_lora(model, adapters, config, out, suffix)


def export_lora(model, adapters, config, out, suffix=""):
    """output_dir/lora{suffix}.safetensors in kohya's format (LyCORIS' for lora_type loha, lokr, dora); with
    merge_lora, also the base (read again from its file, in float32) with that very file merged in by models.lora,
    as --lora does at generation (model{suffix}.safetensors)."""
    base_version = "sdxl_base_v1-0" if model.text_encoder_1 is not None else "sdxl_refiner_v1-0"
    metadata = kohya_metadata(adapters, base_version, Path(config.output_dir).name, config.lokr_factor,
                              steps=config.max_steps, learning_rate=config.lr, seed=config.seed,
                              resolution=f"({config.size[0]}, {config.size[1]})")
    lora, merged_file = out / f"lora{suffix}.safetensors", out / f"model{suffix}.safetensors"  # (suffix: -ema)
    save_adapters(adapters, lora, DTYPES[config.export_dtype], metadata)
    print(f"wrote {lora}")
    if config.merge_lora:
        merged = load(config.model, dtype="fp32", config=config.model_config)
        merge_lora(merged, lora)
        save_single_file(merged, merged_file, dtype=config.export_dtype, overwrite=True)
        print(f"wrote {merged_file} (the base with the LoRA merged in)")


@torch.no_grad()
def set_scaling_factor(model, images, config, device, count=256):
    """Give the trained VAE the scaling_factor that makes its latents unit-variance for the UNet:
    1 / std of latents sampled from the first `count` images (how Rombach et al. got SD's 0.18215)."""
    model.vae.eval()
    encoded = encode_images(model, images, config, device, chunk=64, count=count)
    n, step = len(encoded.mean), config.max_steps  # noise from generators of a step the run never reached
    eps = torch.cat([torch.randn(encoded.mean[start:start + 64].shape,
                                 generator=sample_generator(config.seed, step, start, LATENT)) for start in range(0, n, 64)])
    latents = encoded.mean + torch.exp(0.5 * encoded.logvar) * eps.to(device)
    factor = round(1 / latents.std().item(), 5)
    model.config = replace(model.config, vae=replace(model.config.vae, scaling_factor=factor))
    model.vae.config = model.config.vae
    print(f"VAE scaling_factor: {factor} (1 / std of the latents of {n} images)")
