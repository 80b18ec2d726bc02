"""DreamBooth trainer on the tiny model, on CPU: DDP equals one process, SIGKILL + resume is
bit-identical, frozen parameters stay bit-identical, the prior loss is what it says, the loss
falls, the export generates, and bad input gets one clear sentence."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.loading import load, save_single_file
from models.sdxl import SDXL, TINY
from train.dreambooth import main

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    torch.manual_seed(0)
    save_single_file(SDXL(TINY), root / "tiny.safetensors")
    write_image_folders(root)
    return root


def write_image_folders(root):
    """root/instance (3 random images, one with its own prompt) and root/class (4)."""
    rng = np.random.default_rng(0)
    for folder, size, n in [("instance", (80, 64), 3), ("class", (48, 72), 4)]:
        (root / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    (root / "instance" / "1.txt").write_text("1girl, sks, smile")  # a per-image prompt


def args(setup, out, **overrides):
    fields = dict(model=setup / "tiny.safetensors", instance_data_dir=setup / "instance",
                  class_data_dir=setup / "class", num_class_images=4, resolution=32, max_steps=4, batch_size=2,
                  lr=1e-3, output_dir=out, checkpoint_every=2, keep_checkpoints=10, export_dtype="fp32", seed=3)
    fields.update(overrides)
    return [f"--{k}={v}" for k, v in fields.items()]


def run(cli_args, nproc=1, **popen):
    if nproc == 1:
        cmd = [sys.executable, "-m", "train.dreambooth", *cli_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train.dreambooth", *cli_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def kill_at_first_checkpoint(proc, out):
    """SIGKILL a run as soon as its step-2 checkpoint exists -> its exit status."""
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def killed_then_resumed(setup, out, **fields):
    """A run SIGKILLed at its first checkpoint, then run again with --resume=latest to its end."""
    kill_at_first_checkpoint(run(args(setup, out, **fields)), out)
    finish(run(args(setup, out, resume="latest", **fields)))


def losses(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def final_state(out, step):
    return load_file(Path(out) / "checkpoints" / f"step-{step:06d}" / "state.safetensors")


def weights_apart(a, b, start):
    """(L2 of a - b, L2 of a - start) over every trained weight of two checkpoint states; start is the model's
    state dict (no "param." prefix)."""
    keys = [k for k in a if k.startswith("param.")]
    apart = torch.cat([(a[k].float() - b[k].float()).flatten() for k in keys]).norm().item()
    moved = torch.cat([(a[k].float() - start[k.removeprefix("param.")].float()).flatten() for k in keys]).norm().item()
    return apart, moved


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(setup, tmp_path):
    """batch_size 1 on 2 processes vs batch_size 2 on 1 process: the same samples, the same global mean.

    Only float reduction order differs (gloo sums two half-batch gradients; one process sums one
    batch). Losses agree to ~1e-6 relative. Weights: AdamW divides by sqrt(v), so a gradient that is
    ~0 up to rounding can still move its weight by ~lr in different directions; we bound the
    L2 norm of the difference over all weights relative to how far training moved them.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    finish(run(args(setup, one, batch_size=2, train=["unet"])))
    finish(run(args(setup, two, batch_size=1, train=["unet"]), nproc=2))
    a, b = losses(one), losses(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("instance", "prior", "loss"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(ra[key]), f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
    start = load(setup / "tiny.safetensors").state_dict()
    wa, wb = final_state(one, 4), final_state(two, 4)
    apart, moved = weights_apart(wa, wb, start)
    print(f"DDP: weights apart {apart:.2e}, moved {moved:.2e} (L2)")
    assert moved > 1e-3 and apart <= 0.05 * moved, f"weights differ by {apart:.2e}; training moved them {moved:.2e} (L2)"


@pytest.mark.slow
def test_text_encoder_training_works_under_ddp(setup, tmp_path):
    """CLIP-L's last layer never gets a gradient; DDP must not hang or fail on it."""
    out = tmp_path / "te"
    finish(run(args(setup, out, batch_size=1, max_steps=2, train=["unet.*attn2*", "text_encoder_1", "text_encoder_2"]),
               nproc=2))
    assert len(losses(out)) == 2


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(setup, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(run(args(setup, reference, max_steps=6)))
    kill_at_first_checkpoint(run(args(setup, killed, max_steps=6)), killed)
    assert not (killed / "model.safetensors").exists()
    finish(run(args(setup, killed, max_steps=6, resume="latest")))
    want, got = final_state(reference, 6), final_state(killed, 6)
    assert want.keys() == got.keys()
    for k in want:
        if not k.startswith("rng."):
            assert torch.equal(want[k], got[k]), f"{k} differs after resume"
    assert (reference / "model.safetensors").read_bytes() == (killed / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_exits(setup, tmp_path):
    out = tmp_path / "term"
    proc = run(args(setup, out, max_steps=1000, checkpoint_every=1000))
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() or len(losses(out)) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]  # non-zero, so `train && generate` stops
    assert "interrupted by SIGTERM" in err and "--resume=latest" in err, err[-3000:]
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and int(saved[0].name[5:]) >= 2
    assert not (out / "model.safetensors").exists()  # interrupted: no export


# ----------------------------------------------------------------------------- what trains


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_and_export_generates(setup, tmp_path):
    out = tmp_path / "frozen"
    finish(run(args(setup, out, max_steps=2, train=["unet.*attn2*"])))
    before = load(setup / "tiny.safetensors").state_dict()
    after = load(out / "model.safetensors").state_dict()
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert trained and all(k.startswith("unet.") and "attn2" in k for k in trained)
    assert all(after[k].dtype == torch.float32 for k in after)
    from sampling.pipeline import Pipeline, Settings

    image = Pipeline.load(out / "model.safetensors")(Settings(prompt="1girl, sks", width=32, height=32, steps=3),
                                                     progress=False)[0]
    assert image.size == (32, 32) and np.asarray(image).std() > 0


def test_trainable_selection():
    from train.preflight import trainable_parameters

    with torch.device("meta"):
        model = SDXL(TINY)
    names = lambda patterns: [n for n, _ in trainable_parameters(model, patterns)]
    assert all(n.startswith("unet.") for n in names(["unet"]))
    assert len(names(["unet"])) == len(list(model.unet.parameters()))
    assert names(["unet.*attn2*"]) and all("attn2" in n for n in names(["unet.*attn2*"]))
    te1 = names(["text_encoder_1"])
    last = TINY.text_encoder_1.layers - 1
    assert not any(f"layers.{last}." in n or "final_layer_norm" in n for n in te1) and te1
    assert not names(["unet", "text_encoder_2"]) == names(["unet"])


# ----------------------------------------------------------------------------- the loss


def test_prior_loss_and_pairing_by_hand(setup):
    """make_batch pairs instance j with class j, each with its own prompt and size conditioning;
    the loss is mean_j [mse(instance_j) + w * mse(class_j)], at batch sizes 1 and 3."""
    from data.dreambooth import ImageFolder
    from models.tokenizer import load_tokenizers
    from sampling.schedule import alphas_cumprod
    from train.batches import make_batch
    from train.config import TrainConfig
    from train.losses import TrainStep

    model = load(setup / "tiny.safetensors")
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks"), "class": ImageFolder(setup / "class", "1girl")}
    tokenizers = load_tokenizers()
    for B in (1, 3):
        config = TrainConfig(batch_size=B, resolution=32, prior_loss_weight=0.7, center_crop=True, random_flip=False)
        inputs = make_batch(config, data, model, tokenizers, alphas_cumprod(), step=5, first=0, device="cpu")
        (tokens_1, tokens_2), numbers, noisy, t, target, weight, text_kept, *_ = vars(inputs).values()
        assert text_kept.eq(1).all()  # caption_dropout_rate is 0
        assert noisy.shape[0] == 2 * B
        class_ids = tokenizers[0]("1girl", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        assert all(torch.equal(tokens_1[B + j], class_ids) for j in range(B))  # class prompt for class samples
        assert not any(torch.equal(tokens_1[j], class_ids) for j in range(B))
        # Size conditioning from each image's own file: instance 80x64 (h, w) resized to 40x32, class 48x72
        # resized to 32x48; centred crops of 32x32 start at (4, 0) and (0, 8) of the resized images.
        assert all(numbers[j, :2].tolist() == [80, 64] and numbers[j, 2:4].tolist() == [4, 0] for j in range(B))
        assert all(numbers[B + j, :2].tolist() == [48, 72] and numbers[B + j, 2:4].tolist() == [0, 8] for j in range(B))
        assert numbers[:, 4:].eq(32).all()
        with torch.no_grad():
            per_sample = TrainStep(model)(**vars(inputs))
            context, pooled = model.encode_text(tokens_1, tokens_2)
            from models.conditioning import vector_condition

            pred = model.unet(noisy, t, context, vector_condition(pooled, numbers, TINY.unet.micro_cond_dim))
        mse = ((pred - target) ** 2).flatten(1).mean(1)
        by_hand = (mse[:B] + 0.7 * mse[B:]).mean()
        ours = (per_sample[:B] + config.prior_loss_weight * per_sample[B:]).mean()
        assert torch.allclose(ours, by_hand, rtol=1e-6, atol=0), (ours, by_hand)


def test_tag_and_caption_dropout(setup):
    """Tags past keep_tokens drop at the given rate; a dropped caption trains on zeroed text conditioning."""
    from data.dreambooth import ImageFolder, sample_generator
    from models.conditioning import vector_condition
    from models.tokenizer import load_tokenizers
    from sampling.schedule import alphas_cumprod
    from train.batches import Rules, make_batch, process_caption
    from train.config import TrainConfig
    from train.losses import TrainStep

    drop_tags = lambda prompt, rate, keep, g: process_caption(prompt, Rules(True, False, keep, False, 0.0, rate), g)
    prompt = "1girl, solo, blue hair, red eyes, smile"
    assert drop_tags(prompt, 0.0, 0, sample_generator(0, 0, 0, 5)) == prompt
    assert drop_tags(prompt, 1.0, 2, sample_generator(0, 0, 0, 5)) == "1girl, solo"
    kept = [drop_tags(prompt, 0.3, 1, sample_generator(0, s, 0, 5)).split(", ") for s in range(400)]
    assert all(k[0] == "1girl" for k in kept)
    assert abs(np.mean([len(k) - 1 for k in kept]) / 4 - 0.7) < 0.05  # 70% of the other four tags survive

    model = load(setup / "tiny.safetensors")
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks")}
    config = TrainConfig(batch_size=3, resolution=32, prior_loss_weight=0.0, caption_dropout_rate=1.0)
    inputs = make_batch(config, data, model, load_tokenizers(), alphas_cumprod(), step=0, first=0, device="cpu")
    (tokens_1, tokens_2), numbers, noisy, t, target, weight, text_kept, *_ = vars(inputs).values()
    assert text_kept.eq(0).all()
    with torch.no_grad():
        ours = TrainStep(model)(**vars(inputs))
        context = torch.zeros(3, 77, TINY.unet.context_dim)
        y = vector_condition(torch.zeros(3, TINY.text_encoder_2.projection_dim), numbers, TINY.unet.micro_cond_dim)
        by_hand = ((model.unet(noisy, t, context, y) - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(ours, by_hand, rtol=1e-6, atol=0)


def test_cached_latents_give_the_same_batch(setup):
    """cache_latents encodes each image once up front; a step's inputs equal those of encoding per step."""
    from data.dreambooth import ImageFolder
    from models.tokenizer import load_tokenizers
    from sampling.schedule import alphas_cumprod
    from train.batches import encode_images, make_batch
    from train.config import TrainConfig

    model = load(setup / "tiny.safetensors")
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks"), "class": ImageFolder(setup / "class", "1girl")}
    tokenizers, acp = load_tokenizers(), alphas_cumprod()
    plain = TrainConfig(batch_size=3, resolution=32, prior_loss_weight=1.0, center_crop=True, random_flip=False)
    cached = TrainConfig(**{**plain.__dict__, "cache_latents": True})
    encoded = {name: encode_images(model, images, cached, "cpu", chunk=2) for name, images in data.items()}
    for step in (0, 7):
        want = make_batch(plain, data, model, tokenizers, acp, step, first=0, device="cpu")
        got = make_batch(cached, encoded, model, tokenizers, acp, step, first=0, device="cpu")
        for name, a, b in zip(["tokens_1", "tokens_2", "numbers", "noisy", "t", "target", "weight", "text_kept"],
                              [*want.text, *list(vars(want).values())[1:]], [*got.text, *list(vars(got).values())[1:]]):
            assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-5), name


@pytest.mark.parametrize("name, precision", [("tiny", "no"), ("tiny", "bf16"), ("plainxl-tiny-refiner", "no")])
def test_cached_text_embeddings_give_the_same_loss(setup, name, precision):
    """cache_text_embeddings encodes every prompt once, in batches of its own, under the loop's autocast; each
    sample's loss equals encoding its prompt inside the step (within 1e-5 in float32, 1e-2 in bf16: batches of
    another size round differently), with caption dropout and prior preservation.
    A refiner's dropped captions become the encoded empty prompt, which the cache holds too."""
    from contextlib import nullcontext

    from data.dreambooth import ImageFolder
    from models.tokenizer import load_tokenizers
    from sampling.schedule import alphas_cumprod
    from train.batches import encode_captions, make_batch
    from train.config import TrainConfig
    from train.losses import TrainStep

    model = load(setup / "tiny.safetensors" if name == "tiny" else name, dtype="fp32")
    refiner = model.text_encoder_1 is None
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks"), "class": ImageFolder(setup / "class", "1girl")}
    tokenizers, acp = load_tokenizers(), alphas_cumprod()
    config = TrainConfig(batch_size=3, resolution=32, prior_loss_weight=1.0, caption_dropout_rate=0.5,
                         mixed_precision=precision, cache_text_embeddings=True)
    autocast = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else nullcontext()
    texts = encode_captions(model, data, tokenizers, autocast, "cpu", chunk=2)
    assert set(texts) == {"1girl, sks", "1girl, sks, smile", "1girl"} | ({""} if refiner else set())
    plain, cached = TrainStep(model), TrainStep(model, cached_text=True)
    assert not any(n.startswith("text_encoder") for n, _ in cached.named_parameters())
    dropped = 0
    for step in (0, 7):
        want = make_batch(config, data, model, tokenizers, acp, step, first=0, device="cpu")
        got = make_batch(config, data, model, tokenizers, acp, step, first=0, device="cpu", texts=texts)
        dropped += int((want.text_kept == 0).sum()) if not refiner else int((want.numbers[:, 4] != config.aesthetic_score).sum())
        with torch.no_grad(), autocast:
            a, b = plain(**vars(want)), cached(**vars(got))
        torch.testing.assert_close(b, a, rtol=1e-5 if precision == "no" else 1e-2, atol=0)
    assert dropped > 0  # some caption was dropped: the cached path saw the zeroed or empty-prompt case


def test_cached_parts_leave_the_device_and_validation_brings_them_back(setup, tmp_path, monkeypatch):
    """With cache_latents and cache_text_embeddings the VAE and text encoders go to the CPU once they have encoded
    everything; a validation image moves each to the device while it runs, and back. The device is "cpu:0" (as in
    test_fast_paths' offload test): the same memory, but a name the moves can be told apart by. (The UNet, whose
    parameters report "cpu", looks parked here too, so this cannot check that a part already on the device stays.)"""
    parts = {"AutoencoderKL": "vae", "CLIPTextEncoder": "text_encoder_1", "OpenCLIPTextEncoder": "text_encoder_2"}
    moves, to = [], torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: (
        moves.append((parts[type(self).__name__], str(a[0]))) if type(self).__name__ in parts else None, to(self, *a, **k))[1])
    assert main(args(setup, tmp_path / "o", max_steps=1, checkpoint_every=1, device="cpu:0", cache_latents=True,
                     center_crop=True, random_flip=False, cache_text_embeddings=True, validation_prompt="1girl",
                     validation_every=1, class_steps=2)) == 0
    for part in parts.values():
        assert [device for name, device in moves if name == part] == ["cpu", "cpu:0", "cpu"], (part, moves)
    assert (tmp_path / "o" / "validation" / "step-000001.png").exists()


@pytest.mark.slow
def test_a_short_run_lowers_the_instance_loss(setup, tmp_path):
    out = tmp_path / "learn"
    finish(run(args(setup, out, max_steps=40, prior_loss_weight=0.0, lr=2e-3, checkpoint_every=40)))
    inst = [r["instance"] for r in losses(out)]
    first, last = np.mean(inst[:8]), np.mean(inst[-8:])
    assert last < 0.8 * first, f"instance loss {first:.4f} -> {last:.4f}"


def test_class_images_are_generated_and_resume_without_repeats(setup, tmp_path):
    from data.class_images import generate_class_images, missing_class_images
    from train.config import TrainConfig

    model = load(setup / "tiny.safetensors")
    config = TrainConfig(class_data_dir=str(tmp_path / "cls"), num_class_images=3, resolution=32, class_steps=2)
    (tmp_path / "cls").mkdir()
    todo = missing_class_images(config.class_data_dir, 3)
    generate_class_images(model, config, todo[:1])  # "interrupted" after one image
    first = (tmp_path / "cls" / "class-00000.png").read_bytes()
    todo = missing_class_images(config.class_data_dir, 3)
    assert todo == [1, 2]
    generate_class_images(model, config, todo)
    assert sorted(p.name for p in (tmp_path / "cls").iterdir()) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert (tmp_path / "cls" / "class-00000.png").read_bytes() == first
    assert missing_class_images(config.class_data_dir, 3) == []
    one_by_one = replace(config, class_data_dir=str(tmp_path / "single"), class_batch_size=1)
    (tmp_path / "single").mkdir()
    generate_class_images(model, one_by_one, [1, 2])
    for name in ("class-00001.png", "class-00002.png"):  # made in one batch above: the same images
        batched, single = (np.asarray(Image.open(tmp_path / f / name), dtype=float) for f in ("cls", "single"))
        assert np.abs(batched - single).max() <= 1, name


def test_class_images_are_shared_in_contiguous_batches():
    from data.class_images import batches, share

    todo = [0, 1, 2, 3, 5, 6, 9]
    assert [share(todo, r, 2) for r in range(2)] == [[0, 1, 2, 3], [5, 6, 9]]
    assert sorted(i for r in range(3) for i in share(todo, r, 3)) == todo
    assert batches([3, 4, 5, 9, 10], 2) == [[3, 4], [5], [9, 10]]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, fragment", [
    (["--learning_rate=1e-5"], "unknown config field 'learning_rate'"),
    (["--lr=fast"], "lr must be float"),
    (["--train=unet"], "train must be list"),
    (["--mixed_precision=fp8"], "mixed_precision must be one of no, fp16, bf16"),
    (["--cache_latents=True", "--random_flip=True"], "cache_latents needs center_crop=True and random_flip=False"),
    (["--cache_text_embeddings=True", "--caption_tag_dropout_rate=0.1"], "cache_text_embeddings needs caption_tag_dropout_rate=0"),
    (["--cache_text_embeddings=True", "--train=['unet', 'text_encoder_2']"], "cache_text_embeddings needs frozen text encoders"),
    (["--instance_data_dir=/nonexistent/dir"], "instance_data_dir /nonexistent/dir does not exist"),
    (["--config=/nonexistent/config.py"], "config file /nonexistent/config.py does not exist"),
    (["--resume=/nonexistent/step-000002"], "checkpoint /nonexistent/step-000002 does not exist"),
])
def test_bad_config(setup, tmp_path, capsys, extra, fragment):
    assert main(args(setup, tmp_path / "o") + extra) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and fragment in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bad_config_from_the_command_line_exits_2_in_one_line(setup, tmp_path):
    """The cases above call main(); the real command gives the same line and exit status, and no traceback."""
    proc = run(args(setup, tmp_path / "o") + ["--lr=fast"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "lr must be float" in err, err


def test_bad_images(setup, tmp_path):
    from data.dreambooth import DataError, ImageFolder

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        ImageFolder(tmp_path / "empty", "x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"cannot read image {tmp_path / 'bad' / 'broken.png'}"):
        ImageFolder(tmp_path / "bad", "x")


def test_shipped_configs_are_valid():
    from train.config import load_config

    for path in sorted(Path(__file__).parents[1].glob("configs/*.py")):
        if path.name != "__init__.py" and not path.name.startswith("ablation_"):  # those are sampling.ablate's
            config = load_config(["--config", str(path), "--max_steps=7", "--instance_prompt=a photo of sks dog"])
            assert config.max_steps == 7 and config.instance_prompt == "a photo of sks dog"


def test_gradient_checkpointing_gives_the_same_gradients():
    from models.unet import UNet

    torch.manual_seed(0)
    unet = UNet(TINY.unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    context, y = torch.randn(2, 77, TINY.unet.context_dim), torch.randn(2, TINY.unet.adm_in_channels)
    grads = []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = checkpointing
        unet(x, t, context, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])


def test_min_snr_weights_by_hand(setup):
    from data.dreambooth import ImageFolder
    from models.tokenizer import load_tokenizers
    from sampling.schedule import alphas_cumprod
    from train.batches import make_batch
    from train.config import TrainConfig

    model = load(setup / "tiny.safetensors")
    data = {"instance": ImageFolder(setup / "instance", "1girl, sks"), "class": ImageFolder(setup / "class", "1girl")}
    acp = alphas_cumprod()
    config = TrainConfig(batch_size=3, resolution=32, snr_gamma=5.0)
    batch = make_batch(config, data, model, load_tokenizers(), acp, step=1, first=0, device="cpu")
    t, weight = batch.t, batch.weight
    snr = acp[t.long()] / (1 - acp[t.long()])
    assert torch.allclose(weight, torch.clamp(snr, max=5.0) / snr)  # per sample, so per pair at any batch size
    assert weight.shape == (6,) and (weight < 1).any() and (weight == 1).any()


@pytest.mark.slow
def test_bf16_mixed_precision_and_gradient_checkpointing_run(setup, tmp_path):
    out = tmp_path / "bf16"
    finish(run(args(setup, out, max_steps=2, mixed_precision="bf16", gradient_checkpointing=True)))
    assert all(np.isfinite(r["loss"]) for r in losses(out)) and (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------- the "vae" task


@pytest.mark.slow
def test_vae_task_trains_the_vae_only(setup, tmp_path):
    out = tmp_path / "vae"
    finish(run(args(setup, out, task="vae", train=["vae"], prior_loss_weight=0.0, max_steps=3, resolution=32)))
    before = load(setup / "tiny.safetensors").state_dict()
    after = load(out / "model.safetensors").state_dict()
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    assert trained and all(k.startswith("vae.") for k in trained)
    proc = run(args(setup, tmp_path / "o", task="vae", train=["unet"]))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "matches no parameter of the vae task" in err


def test_vae_loss_by_hand(setup):
    from train.losses import VAEStep

    model = load(setup / "tiny.safetensors")
    torch.manual_seed(0)
    pixels, eps = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        ours = VAEStep(model.vae, kl_weight=0.01)(pixels, eps)
        mean, logvar = model.vae.encode(pixels)
        z = mean + (0.5 * logvar).exp() * eps
        mse = ((model.vae.decode(z) - pixels) ** 2).flatten(1).mean(1)
        var = logvar.exp()
        kl = 0.5 * (mean**2 + var - 1 - torch.log(var)).flatten(1).sum(1)
    assert torch.allclose(ours, mse + 0.01 * kl, rtol=1e-5)
