"""Device bugs without a GPU: generation and training steps run with every model on PyTorch's meta device, which,
like CUDA, refuses to mix with CPU tensors, so a tensor made on the wrong device fails here with its line. The same runs count
device-to-host syncs: Tensor.item, bool, float, int and tolist of a meta tensor (what would stall a GPU's queue)
are recorded instead of failing, and none may happen inside a sampler's step loop.

Meta has no values, so what reads them runs elsewhere: the NaN check after a stage (one sync per stage, after its
loop: recorded and allowed here) and the decode to PIL pixels (.cpu() of a meta tensor cannot copy), the taps and
attention maps (their records are copied to the CPU): those are tested on the CPU by the parity tests."""

import traceback
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from test_control_cli import images  # noqa: F401 (a fixture)
from test_controlnet import controlnets  # noqa: F401 (a fixture)
from test_ip_adapter import ip_files  # noqa: F401 (a fixture)
from test_pipeline_parity import files  # noqa: F401 (a fixture)
from test_t2i_adapter import adapters  # noqa: F401 (a fixture)

from sampling import samplers
from sampling.pipeline import Pipeline, Settings

READS = {"item": 0.0, "__bool__": True, "__float__": 0.0, "__int__": 0, "tolist": []}  # what a meta tensor "holds"


@contextmanager
def meta_reads():
    """Record each value read of a meta tensor (name, file:line of the caller, whether a sampler loop was running)
    and return a stand-in; other tensors behave as always. Yields the records."""
    records, saved, running = [], {name: getattr(torch.Tensor, name) for name in READS}, [False]

    def reading(name):
        def read(self, *args, **kwargs):
            if self.device.type != "meta":
                return saved[name](self, *args, **kwargs)
            caller = traceback.extract_stack(limit=3)[0]
            records.append((name, f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}", running[0]))
            return READS[name]
        return read

    def looping(sampler):
        def run(*args, **kwargs):
            running[0] = True
            try:
                return sampler(*args, **kwargs)
            finally:
                running[0] = False
        return run

    originals = dict(samplers.SAMPLERS)
    try:
        for name in READS:
            setattr(torch.Tensor, name, reading(name))
        samplers.SAMPLERS.update({name: looping(fn) for name, fn in originals.items()})
        yield records
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        samplers.SAMPLERS.update(originals)


def on_meta(pipe):
    pipe.model.to("meta")  # (the ControlNets and adapters registered on it go too)
    pipe.ip_adapters = [(a.to("meta"), e.to("meta")) for a, e in pipe.ip_adapters]
    return pipe


def generate(pipe, s, refiner=None):
    """pipe.latents on the meta device -> the reads recorded (no error: every tensor met the model's device)."""
    with meta_reads() as records:
        latents = pipe.latents(s, refiner, progress=False)
    scale = s.hires_scale or 1  # (the hi-res pass's size, rounded down to 8 pixels)
    assert latents.device.type == "meta" and latents.shape[-2:] == (int(s.height * scale) // 8, int(s.width * scale) // 8)
    in_loop = [r for r in records if r[2]]
    assert not in_loop, f"device-to-host reads inside the sampler loop: {in_loop}"
    return records


@pytest.fixture(scope="module")
def tiny(files):
    return files / "tiny.safetensors"


@pytest.mark.parametrize("sampler", sorted(samplers.SAMPLERS))
def test_every_sampler_runs_on_meta_without_a_sync_in_its_loop(tiny, sampler):
    s = Settings(prompt="1girl", negative_prompt="lowres", steps=4, cfg=5.0, sampler=sampler, width=64, height=64,
                 num_images=2, seed=1)
    records = generate(on_meta(Pipeline.load(tiny)), s)
    assert [r[0] for r in records] == ["__bool__"], records  # the stage's NaN check, after its loop


def test_two_stage_img2img_inpainting_hires_lora_and_guidance_on_meta(tiny, tmp_path):
    from test_image_conditioning import disc_mask, picture
    from test_lora import kohya_file

    base = Settings(prompt="1girl, [red:blue:0.5] eyes", negative_prompt="", steps=4, sampler="dpmpp_2m_sde",
                    width=64, height=64, seed=2)
    cases = {
        "img2img": dict(init_image=picture(64, 64), strength=0.6),
        "inpainting": dict(init_image=picture(64, 64), mask=disc_mask(64, 64)),
        "hi-res": dict(hires_scale=1.5, hires_steps=2),
        "guidance": dict(pag_scale=2.0, apg=True, cfg_interval=(0.3, 5.0), guidance_rescale=0.5),
    }
    for fields in cases.values():
        generate(on_meta(Pipeline.load(tiny)), replace(base, **fields))
    generate(on_meta(Pipeline.load("plainxl-tiny")), base, refiner=on_meta(Pipeline.load("plainxl-tiny-refiner")))
    kohya_file(Pipeline.load(tiny).model, tmp_path / "lora.safetensors")
    generate(on_meta(Pipeline.load(tiny, loras=[(tmp_path / "lora.safetensors", 0.8)])), base)


def test_adapters_run_on_meta(tiny, controlnets, adapters, ip_files, images):
    pipe = Pipeline.load(tiny, controlnets=[tiny.parent / "controlnet1"], adapters=[tiny.parent / "adapter1"],
                         ip_adapters=[ip_files / "plus.safetensors"])
    s = Settings(prompt="1girl", steps=3, sampler="euler", width=64, height=64, num_images=2,
                 control_images=[images / "edges.png"], adapter_images=[images / "edges.png"],
                 ip_images=[images / "reference.png"])
    for guess_mode, cfg_mode in [(False, "batch"), (True, "batch"), (True, "split")]:
        pipe = on_meta(pipe)
        pipe.cfg_mode = cfg_mode
        generate(pipe, replace(s, guess_mode=guess_mode))


@pytest.mark.parametrize("kind", ["full", "lora", "controlnet", "cached"])
def test_training_steps_run_on_meta(tmp_path, kind):
    """A step's inputs (train/batches.py), its losses and backward (train/losses.py) and the optimizer's step
    (train/optim.py), with the model on the meta device: full fine-tuning, LoRA, a ControlNet, cached latents."""
    import numpy as np
    from PIL import Image

    from models.loading import load
    from models.tokenizer import load_tokenizers
    from sampling.schedule import alphas_cumprod
    from train.batches import encode_images, make_batch, training_data
    from train.config import load_config
    from train.controlnet import attach_controlnet
    from train.dreambooth import Process
    from train.losses import TrainStep
    from train.optim import make_optimization
    from train.preflight import lora_adapters, trainable_parameters

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    fields = {"full": [], "lora": ["--lora_rank=4"], "cached": ["--cache_latents=True", "--center_crop=True",
                                                               "--random_flip=False"],
              "controlnet": ["--task=controlnet", f"--control_dir={tmp_path / 'images'}"]}[kind]
    config = load_config(["--model=plainxl-tiny", f"--instance_data_dir={tmp_path / 'images'}", "--prior_loss_weight=0",
                          "--resolution=64", "--batch_size=2", f"--output_dir={tmp_path / 'out'}", *fields])
    model, meta = load("plainxl-tiny", dtype="fp32"), torch.device("meta")
    process = Process(False, 0, 0, 1, meta)
    data = training_data(config, model, process)
    model.to(meta)
    if kind == "controlnet":
        attach_controlnet(model, config)  # made beside the UNet: on meta too
    if kind == "cached":
        data = {name: encode_images(model, images, config, meta) for name, images in data.items()}
    adapters = lora_adapters(model, config) if kind == "lora" else None
    named = [(n, p) for n, p in adapters.named_parameters()] if adapters else trainable_parameters(model, config.train,
                                                                                                  config.task)
    for _, p in named:
        p.requires_grad_(True)
    optimizer, _, _ = make_optimization(config, named, process)
    step = TrainStep(model, adapters, controlnet=getattr(model, "controlnet", None))
    batch = make_batch(config, data, model, load_tokenizers(), alphas_cumprod(), 0, 0, meta)
    with meta_reads() as records:
        step(**vars(batch)).mean().backward()
        optimizer.step()
    assert all(p.device == meta and p.grad is not None for _, p in named), "every trained tensor stays on the device"
    assert not records, f"device-to-host reads in a training step: {records}"
