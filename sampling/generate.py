"""Command line generation: text-to-image, img2img, inpainting, base + refiner, hi-res fix.

    python -m sampling.generate --model M --prompt P [--negative-prompt N] --width W --height H --steps S
        --cfg G --sampler {euler,euler_a,dpmpp_2m,ddim,ddpm} [--karras] [--guidance-rescale R] --seed SEED
        --num-images B --dtype {fp32,fp16,bf16} --device D [--config FOLDER_OR_CONFIG_JSON] [--vae VAE]
        [--refiner-config FOLDER_OR_CONFIG_JSON]
        [--lora FILE[:SCALE] ...] [--controlnet MODEL[:SCALE] --control-image IMG ... [--control-start F]
        [--control-end F] [--guess-mode]] [--adapter MODEL[:SCALE] --adapter-image IMG ... [--adapter-factor F]]
        [--ip-adapter MODEL[:SCALE] --ip-image IMG ... [--ip-encoder FOLDER_OR_FILE]]
        [--no-prompt-weights] [--save-attention DIR] [--intervention NAME ...] [--tap PATTERN ... --tap-out FILE]
        --out DIR
      [--refiner R --refiner-start F [--aesthetic-score A] [--negative-aesthetic-score NA]]
      [--init-image IMG --strength S [--mask MASK]]
      [--hires-scale K --hires-strength S [--hires-steps N] [--hires-upscaler latent|lanczos]]
    python -m sampling.generate --from-png outputs/00003-42.png      # re-run a generation

Step counts: --init-image runs diffusers' int(steps x strength) steps (AUTOMATIC1111's img2img tab runs
int(steps x min(strength, 0.999)) + 1); the hi-res pass runs exactly --hires-steps, the tail of an
int(hires_steps / strength)-step schedule, as AUTOMATIC1111's hi-res fix does.

Image i of a batch uses seed SEED + i and equals a single-image run with that seed. Every setting is
checked against the model's headers before the weights load. Each PNG carries its parameters
(AUTOMATIC1111's format), is written as soon as it is decoded, under a temporary name then renamed,
and never replaces a file. Ctrl-C keeps the images already written and exits 130.

    main, generate      the command: check everything, load, then write each image as it is decoded
    prepare             every check (the flags: sampling/arguments.py; the model's headers:
                        sampling/preflight.py), then the load -> a Job
    write_images        the generation with its instruments, each image saved (sampling/outputs.py)
"""

import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from sampling.arguments import check_settings, fail, parse_args, request_from
from sampling.outputs import save_attention, save_next, save_taps
from sampling.preflight import (
    check_adapter,
    check_controlnet,
    check_embeddings,
    check_fits,
    check_instruments,
    check_ip_adapter,
    check_loras,
    check_steps,
)


class Interrupts:
    """Ctrl-C, taken at safe points. The first press is only noted, and the run stops at the next sampler
    step or image (a KeyboardInterrupt raised inside torch's imports can surface as another exception, or
    kill the process by signal); a second press interrupts at once."""

    def __init__(self):
        self.asked = False

    def __call__(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def check(self, *_):
        if self.asked:
            raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    written, interrupts = [], Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts)
    try:
        return generate(args, written, interrupts.check)
    except KeyboardInterrupt:
        return fail(f"interrupted; {len(written)} image(s) were written and kept"
                    + (f" ({', '.join(map(str, written))})" if written else ""), 130)
    finally:
        signal.signal(signal.SIGINT, previous)


def generate(args, written, check_interrupt):
    """The command after its flags parse -> exit code; `written` collects the paths of the images saved."""
    from models.loading import LoadError, out_of_memory
    from sampling.pipeline import NonFiniteError

    out = Path(args.out)
    try:
        job = prepare(args)
    except (ValueError, LoadError) as e:
        return fail(str(e))
    except OSError as e:  # a path that cannot even be looked at: no permission, a name too long
        return fail(f"cannot read {e.filename or 'a file'} ({e.strerror or e}); check the path and its permissions")
    try:
        out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder behind
        if job.attention_dir is not None:
            job.attention_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"cannot create {e.filename} ({e.strerror}); choose a folder you can write to")
    check_interrupt()
    if job.recorded_hash and job.model_hash and job.recorded_hash != job.model_hash:
        print(f"note: the PNG was made with a model whose hash is {job.recorded_hash}; {job.model} has "
              f"{job.model_hash}", file=sys.stderr)
    settings = job.settings
    try:
        write_images(job, args, out, written, check_interrupt)
    except (MemoryError, RuntimeError) as e:  # the estimate (check_fits) was short
        if not out_of_memory(e):
            raise
        return fail(f"{job.device} ran out of memory at {settings.width}x{settings.height} x {settings.num_images}; "
                    f"use a smaller size or --num-images ({len(written)} image(s) were written)")
    except NonFiniteError as e:
        kept = f"; the {len(written)} image(s) before it were written" if written else "; nothing was written"
        return fail(str(e).rstrip(".") + kept + ".")
    except ValueError as e:  # a combination the pipeline refuses that the checks above missed: one line still
        return fail(str(e).rstrip(".") + (f"; {len(written)} image(s) were written" if written else "; nothing was written"))
    except OSError as e:
        return fail(f"writing to {out} failed ({e.strerror}); {len(written)} image(s) were written")
    return 0


@dataclass
class Job:
    """A checked command line with its models loaded: what write_images needs."""

    settings: object  # sampling.settings.Settings as the PNG records it (paths), at the final size
    opened: object  # the same, its init image and mask opened: what the pipeline runs
    pipe: object  # sampling.pipeline.Pipeline
    refiner_pipe: object  # another Pipeline, or None
    device: object  # torch.device
    attention_dir: Path | None  # --save-attention
    interventions: list  # --intervention's names
    parameters: object  # seed -> the PNG's parameters text (sampling/pnginfo.py)
    model: str
    model_hash: str | None  # AUTOMATIC1111's, of the model file (None for a folder)
    recorded_hash: str | None  # --from-png's PNG's, when the model is the PNG's


def prepare(args):
    """Every check, each before anything it guards is read, then the load -> Job. Raises ValueError or
    LoadError (one sentence with the fix), OSError for a path that cannot be looked at."""
    from models.embeddings import embedding_hash
    from models.files import check_output
    from models.loading import check_device, inspect, model_hash, out_of_memory, resolve
    from models.lora import addnet_hash
    from sampling.control import check_control
    from sampling.pnginfo import format_parameters
    from sampling.prompts import used_embeddings
    from sampling.settings import check, with_output_size

    request = request_from(args)  # the PNG's, overridden by the flags (paths)
    settings, model, vae, refiner = request.settings, request.model, request.vae, request.refiner
    opened = check_settings(settings)  # the same, its init image and mask read
    check_output(args.out, "--out")  # it, or a folder above it, a file: refused before any work
    device = check_device(args.device)
    if args.vae_tiling is not None and args.vae_tiling < 8:
        raise ValueError(f"--vae-tiling {args.vae_tiling} is too small: it is a tile size in latents, at least 8 "
                         "(128 = 1024 px, the default when the flag is given alone)")
    attention_dir = Path(args.save_attention) if args.save_attention else None
    if attention_dir is not None:
        check_output(attention_dir, "--save-attention")
    if attention_dir is not None and (opened.hires_scale is not None or refiner):
        raise ValueError("--save-attention maps one pass of one model at one size; drop --hires-scale and "
                         "--refiner (or map the first pass alone)")
    if args.offload and device.type == "cpu":
        raise ValueError("--offload moves the model's parts to --device while they run; with --device cpu "
                         "there is nothing to offload: give --device cuda, or drop --offload")
    if args.refiner_config and not refiner:
        raise ValueError("--refiner-config gives a refiner's architecture; name the refiner with --refiner too")
    info = inspect(model, args.config)  # headers and configs only: the settings are checked before the weights load
    refiner_info = inspect(refiner, args.refiner_config) if refiner else None
    check(opened, info.config, refiner_info.config if refiner_info else None)
    if vae is not None:
        resolve(vae)  # it exists (or is downloaded) before the big load
    loras = [(resolve(path), scale) for path, scale in request.loras]
    check_loras(info, loras)
    if settings.control_types and len(settings.control_types) != len(request.controlnets):
        raise ValueError(f"{len(settings.control_types)} --control-type for {len(request.controlnets)} ControlNet(s): "
                         "give one per --controlnet, in order (none for a plain ControlNet)")
    if args.offload and (request.controlnets or request.adapters or request.ip_adapters):
        raise ValueError("--offload with ControlNets or adapters is not supported yet; drop --offload")
    types = settings.control_types or (None,) * len(request.controlnets)
    controlnets = [check_controlnet(info, source, kind) for (source, _), kind in zip(request.controlnets, types)]
    adapters = [check_adapter(info, source) for source, _ in request.adapters]
    ip_adapters = [check_ip_adapter(info, source, args.ip_encoder) for source, _ in request.ip_adapters]
    embeddings = check_embeddings(info, refiner_info, request.embeddings, settings)
    opened = with_output_size(opened, info.config)
    settings = replace(settings, width=opened.width, height=opened.height)
    check_control(opened, len(controlnets), len(adapters), len(ip_adapters))
    check_steps(info, refiner_info, opened)
    check_fits(info, opened, args.dtype, device, refiner_info, args.offload)
    check_instruments(info, request.interventions, args.tap, args.tap_out, opened, controlnets, adapters, ip_adapters)
    try:
        pipe, refiner_pipe = load_pipelines(args, info, refiner_info, vae, loras, embeddings, device, controlnets,
                                            adapters, ip_adapters)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        models = "these models" if refiner else "this model"
        fix = "use --dtype bf16 or fp16" if args.dtype == "fp32" else "use a device with more memory"
        raise ValueError(f"{args.device} has too little memory for {models} in {args.dtype}; {fix}") from None
    model_file_hash = model_hash(info.path) if info.path.is_file() else None
    refiner_hash = model_hash(refiner_info.path) if refiner and refiner_info.path.is_file() else None
    lora_records = [(path, scale, addnet_hash(path)) for path, scale in loras]
    used = used_embeddings(settings, pipe.embeddings)  # A1111 records the embeddings a prompt uses
    embedding_records = [(e.name, e.path, embedding_hash(e.path)) for name, e in pipe.loaded_embeddings.items()
                         if name in used]
    parameters = lambda seed: format_parameters(
        settings, seed, model, model_hash=model_file_hash, vae=vae, refiner=refiner, refiner_hash=refiner_hash,
        loras=lora_records, interventions=request.interventions, embeddings=embedding_records,
        controlnets=request.controlnets, adapters=request.adapters, ip_adapters=request.ip_adapters)
    return Job(settings, opened, pipe, refiner_pipe, device, attention_dir, request.interventions, parameters, model,
               model_file_hash, request.recorded_hash)


def load_pipelines(args, info, refiner_info, vae, loras, embeddings, device, controlnets=(), adapters=(),
                   ip_adapters=()):
    """The model's Pipeline and the refiner's (or None), set to run as the flags ask."""
    from sampling.pipeline import Pipeline

    home = "cpu" if args.offload else device  # with --offload the weights stay on the CPU between uses
    pipe = Pipeline.load(info.path, dtype=args.dtype, device=home, vae=vae, loras=loras, config=args.config,
                         embeddings=embeddings, controlnets=controlnets, adapters=adapters, ip_adapters=ip_adapters)
    # --vae replaces both stages' VAE: the refiner decodes, and the PNG records one VAE.
    refiner_pipe = (Pipeline.load(refiner_info.path, dtype=args.dtype, device=home, vae=vae, config=args.refiner_config,
                                  embeddings=embeddings) if refiner_info else None)
    for p in filter(None, (pipe, refiner_pipe)):  # ways to run that leave the images as they are
        p.cfg_mode, p.vae_tiling = args.cfg_mode, args.vae_tiling
        p.offload = device if args.offload else None
        if args.compile:
            p.model.unet.compile()  # in place: the module and its parameter names stay as they are
    return pipe, refiner_pipe


def write_images(job, args, out, written, check_interrupt):
    """Generate with the instruments the flags ask for, saving each image as soon as it is decoded."""
    from sampling.instruments import attention_maps, tap
    from sampling.interventions import named

    pipe, opened = job.pipe, job.opened
    with ExitStack() as instruments:  # each undone when the generation ends, however it ends
        for name in job.interventions:
            instruments.enter_context(named(pipe.model, name))
        taps = instruments.enter_context(tap(pipe.model, args.tap)) if args.tap else None
        maps = instruments.enter_context(attention_maps(pipe.model)) if job.attention_dir is not None else None
        images = pipe.images(opened, job.refiner_pipe, callback=check_interrupt)  # Ctrl-C checked every step
        for i, image in enumerate(images):
            seed = job.settings.seed + i
            parameters = job.parameters(seed)
            written.append(save_next(image, out, seed, parameters))
            print(written[-1])
            if maps is not None:
                grid = save_attention(maps, image, i, opened, pipe, job.attention_dir / written[-1].name,
                                      parameters)
                if grid is not None:
                    print(grid)
            check_interrupt()  # after the write: a finished image is kept
        if taps is not None:
            print(save_taps(taps, Path(args.tap_out)))


if __name__ == "__main__":
    raise SystemExit(main())
