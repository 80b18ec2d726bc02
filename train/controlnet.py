"""task="controlnet": a ControlNet trained in the DreamBooth loop beside the frozen model (docs/control.md).

Each instance image comes with a control map (control_dir's image of its name: edges, depth, pose ...), cropped
and flipped with it; the ControlNet sees the noisy latents, the text and the map, the frozen UNet adds its
residuals, and the loss is the UNet's usual one. The ControlNet starts as a copy of the UNet's encoder whose zero
convolutions add nothing yet (Zhang et al. 2023), or from `controlnet` to continue training one.

    controlnet_problem   the fields that cannot go with the task, one sentence (TrainConfig raises it)
    attach_controlnet    model.controlnet, the trainee, in the UNet's dtype and seeded by the run's seed
    meta_controlnet      its shape, for the checks before the load
    check_control_maps   every instance image has its control map, of its size, before anything trains
    export_controlnet    output_dir/controlnet{suffix}/: a diffusers ControlNetModel folder
    validation_pair      the validation image's control map (and the image it came from), at the training size
"""

import json
from dataclasses import replace

import torch
from PIL import ImageOps
from safetensors.torch import save_file

from data.dreambooth import open_rgb
from models.controlnet import (
    ControlNet,
    ControlNetConfig,
    controlnet_from_unet,
    controlnet_to_diffusers,
    inspect_controlnet,
    load_controlnet,
)
from models.files import DTYPES, LoadError, atomic_folder, cast
from models.single_file import check_finite


def controlnet_problem(config):
    """What cannot go with task="controlnet" (or its fields without it), or None."""
    controlnet = config.task == "controlnet"
    if controlnet != (config.control_dir is not None) or (config.controlnet is not None and not controlnet):
        return ("task='controlnet' learns from control_dir's control maps (controlnet= continues a ControlNet): set "
                "task and control_dir together, or neither")
    if not controlnet:
        return None
    if config.lora_rank or config.parallel == "fsdp":
        return ("task='controlnet' trains the ControlNet itself beside the frozen UNet: leave lora_rank out, and use "
                "parallel='ddp' or 'zero' (fsdp shards the UNet)")
    if not all(p == "controlnet" or p.startswith("controlnet.") for p in config.train):
        return f"train={config.train} must name the ControlNet's parameters here, e.g. ['controlnet'] (the default)"
    return None


def attach_controlnet(model, config):
    """model.controlnet: config.controlnet loaded, or the UNet's encoder copied with a fresh hint encoder drawn
    from the run's seed (every process draws the same)."""
    weight = next(model.unet.parameters())
    if config.controlnet is not None:  # (the UNet itself: a control-LoRA adds to its weights)
        model.controlnet = load_controlnet(config.controlnet, model.unet, weight.dtype).to(weight.device)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model.controlnet = controlnet_from_unet(model.unet)
    model.controlnet.gradient_checkpointing = config.gradient_checkpointing


def meta_controlnet(config, unet_config):
    """The trainee's shape for the checks before the load (built where torch builds now: the meta device):
    config.controlnet's header (an SDXL ControlNet for this UNet), else the UNet's encoder."""
    if config.controlnet is not None:
        cfg = inspect_controlnet(config.controlnet, unet_config)[1]
        if cfg.control_types:
            raise LoadError(f"controlnet={config.controlnet} is a ControlNet-Union, which this task does not train "
                            "(its images would need a kind each); continue a plain ControlNet")
        return ControlNet(cfg)
    return ControlNet(ControlNetConfig(replace(unet_config, time_cond_proj_dim=None)))


def check_control_maps(images, config):
    """DataError naming the first instance image without a control map of its size (data.dreambooth.control_of)."""
    for i in range(len(images.paths)):
        images.control_of(i, config.control_dir)


def export_controlnet(model, config, out, suffix=""):
    """output_dir/controlnet{suffix}/ (config.json, diffusion_pytorch_model.safetensors in export_dtype): what
    --controlnet, diffusers' ControlNetModel.from_pretrained and ComfyUI load. NaN weights are refused."""
    tensors, folder_config = controlnet_to_diffusers(model.controlnet)
    tensors = {n: cast(t.detach().cpu(), DTYPES[config.export_dtype]).contiguous() for n, t in tensors.items()}
    dst = out / f"controlnet{suffix}"
    check_finite(tensors, dst)
    with atomic_folder(dst, overwrite=True) as tmp:
        save_file(tensors, tmp / "diffusion_pytorch_model.safetensors")
        (tmp / "config.json").write_text(json.dumps(folder_config, indent=2) + "\n")
    print(f"wrote {dst}")


def validation_pair(config):
    """(control map, its image) of the first instance image, centre-cropped to the training size."""
    from train.batches import instance_images  # (train.batches imports train.config, which imports this module)

    images = instance_images(config)
    fit = lambda image: ImageOps.fit(image.convert("RGB"), config.size)
    return fit(images.control_of(0, config.control_dir)), fit(open_rgb(images.paths[0]))
