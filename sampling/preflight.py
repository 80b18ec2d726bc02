"""sampling.generate's checks that need the model's headers, made before its weights load: each stage's steps
against its sampling schedule, the LoRAs and the instruments' patterns against a weightless (meta-device)
copy of the model, and whether the generation fits in the device's free memory."""

import re
from dataclasses import replace
from pathlib import Path


def check_steps(info, refiner_info, s):
    """Each stage's steps against its model's schedule (e.g. 1000 'leading' steps reach past t = 999), and
    that each stage runs at least one step, before the weights load."""
    from sampling.schedule import make_schedule
    from sampling.settings import hires_second_pass, schedule_steps, window

    stages = [("--steps", info, s)]
    if refiner_info is not None:
        stages = [("--steps", info, replace(s, denoising_end=s.refiner_start)),
                  ("--steps", refiner_info, replace(s, denoising_start=s.refiner_start))]
    if s.hires_scale is not None:
        stages.append(("--hires-steps", info, hires_second_pass(s)))
    for flag, model, stage in stages:
        try:
            schedule = make_schedule(stage.sampler, schedule_steps(stage), schedule=stage.schedule, spacing=stage.spacing,
                                     karras=True if stage.karras else None, config=model.scheduler_config)
        except ValueError as e:
            raise ValueError(f"{flag} {stage.steps} with --sampler {stage.sampler}: {e}") from None
        window(stage, schedule, model.scheduler_config)


def check_embeddings(info, refiner_info, paths, s):
    """--embeddings' files, each read and checked against the models' encoder widths, and the prompts' names
    against them, before the load -> the files."""
    from models.embeddings import embedding_files, encoder_widths, read_embeddings
    from sampling.prompts import with_embeddings

    files = [file for path in paths for file in embedding_files(path)]
    for config in filter(None, (info.config, refiner_info and refiner_info.config)):
        names = dict.fromkeys(read_embeddings(files, encoder_widths(config)), "")  # (the tokens do not matter here)
    for text in (s.prompt, s.negative_prompt, s.prompt_2, s.negative_prompt_2):
        with_embeddings(text or "", names)  # an embedding:name that is not loaded: PromptError
    return files


def check_loras(info, loras):
    """Each LoRA against the model's modules and shapes, on a weightless copy of it (meta device), before the load."""
    import torch

    from models.lora import merge_lora
    from models.sdxl import SDXL

    with torch.device("meta"):
        shell = SDXL(info.config)
    for path, scale in loras:
        merge_lora(shell, path, scale, apply=False)


def check_controlnet(info, source, control_type=None):
    """A --controlnet's header against the model (an SDXL ControlNet for this UNet) and its --control-type, before
    any weight loads -> its local path."""
    from models.controlnet import inspect_controlnet
    from sampling.control import control_type_index

    path, cfg, _ = inspect_controlnet(source, info.config.unet)
    control_type_index(cfg, control_type)
    return path


def check_adapter(info, source):
    """A --adapter's header against the model (an SDXL T2I-Adapter whose maps fit this UNet) -> its local path."""
    from models.t2i_adapter import inspect_adapter

    return inspect_adapter(source, info.config.unet)[0]


def check_ip_adapter(info, source, encoder=None):
    """A --ip-adapter's header against the model's cross-attentions (built on the meta device), and its image
    encoder's (--ip-encoder, or the one beside it) -> (the adapter's path, the encoder's path)."""
    import torch

    from models.ip_adapter import image_encoder_for, inspect_ip_adapter
    from models.unet import UNet

    with torch.device("meta"):
        unet = UNet(info.config.unet)
    path, cfg = inspect_ip_adapter(source, unet)
    return path, image_encoder_for(source, cfg, encoder)


def check_instruments(info, interventions, taps, tap_out, settings, controlnets=(), adapters=(), ip_adapters=()):
    """--intervention's, --tap's and --pag-layers' patterns against the model's module names (built on the meta
    device, no weights, with the ControlNets', T2I-Adapters' and IP-Adapters' headers: their local paths, as the
    pipeline registers them), and --tap-out, before the load: ValueError naming what to fix."""
    import torch
    import torch.nn as nn

    from models.controlnet import ControlNet, inspect_controlnet
    from models.files import check_output
    from models.ip_adapter import IPAdapter, inspect_ip_adapter
    from models.sdxl import SDXL
    from models.t2i_adapter import T2IAdapter, inspect_adapter
    from sampling.guidance import pag_modules
    from sampling.instruments import matching

    if bool(taps) != bool(tap_out):
        raise ValueError("--tap and --tap-out go together: --tap PATTERN names what to record, --tap-out FILE where")
    if tap_out and Path(tap_out).exists():
        raise ValueError(f"--tap-out {tap_out} exists; name a new file (it is never replaced)")
    if tap_out:
        check_output(tap_out, "--tap-out", folder=False)
    patterns = [name.removeprefix("skip=") for name in interventions if name.startswith("skip=")] + list(taps or [])
    if patterns or settings.pag_scale:
        with torch.device("meta"):
            model = SDXL(info.config)
            unet = info.config.unet
            model.controlnets = nn.ModuleList(ControlNet(inspect_controlnet(c, unet)[1]) for c in controlnets)
            model.adapters = nn.ModuleList(T2IAdapter(inspect_adapter(a, unet)[1]) for a in adapters)
            model.ip_adapters = nn.ModuleList(IPAdapter(inspect_ip_adapter(a, model.unet)[1]) for a, _ in ip_adapters)
        for pattern in patterns:
            matching(model, pattern)
        if settings.pag_scale:
            pag_modules(model.unet, settings.pag_layers)  # --pag-layers name self-attention of this UNet


def available_memory(device):
    """Bytes free for a generation on `device`, or None where it cannot be told."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
            return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024
        except (OSError, TypeError):
            return None
    return None


def check_fits(info, settings, dtype, device, refiner_info=None, offload=False):
    """Refuse a generation whose estimated memory exceeds what the device has free (sampling.settings.memory_estimate);
    with the hi-res fix, at its second pass's size; with a refiner, its weights loaded too; with offload, only the
    UNet's weights (the largest part, and the only one on the device while it runs)."""
    import torch

    from models.unet import UNet
    from sampling.settings import hires_second_pass, memory_estimate, size_multiple

    s = settings
    if s.hires_scale is not None:
        settings = hires_second_pass(s, multiple=size_multiple(info.config))  # the largest size of the run
    dtype_bytes = {"fp32": 4}.get(dtype, 2)
    parameters = info.parameters
    if offload:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in UNet(info.config.unet).parameters())
    need = memory_estimate(info.config, settings, parameters, dtype_bytes)
    if refiner_info is not None and not offload:
        need += refiner_info.parameters * dtype_bytes
    free = available_memory(device)
    if free is not None and need > free:
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        raise ValueError(f"{settings.width}x{settings.height} x {settings.num_images} image(s) needs about "
                         f"{gib(need)} on {device}, which has {gib(free)} free; use a smaller --width/--height"
                         + (", --hires-scale" if s.hires_scale else "") + " or --num-images"
                         + (", or --dtype bf16" if dtype == "fp32" else ""))
