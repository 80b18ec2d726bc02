"""LoRA in the DreamBooth loop (models.lora's adapters, train.dreambooth): kohya's default set on the full-size
model, step 0 equal to the base, adapters equal to their merge, the kohya export read by diffusers'
load_lora_weights with every module placed and the same images, the frozen base bit-identical, DDP equal to
one process and SIGKILL + resume bit-identical with adapters, and bad LoRA settings one clear line."""

import copy
import signal

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_dreambooth import args, final_state, finish, kill_at_first_checkpoint, losses, run, write_image_folders
from test_pipeline_parity import assert_close_images, diffusers_images, tiny_model

from models import lora
from models.adapters import CONV_TARGETS, KOHYA_TARGETS, add_adapters, kohya_metadata, save_adapters
from models.loading import load, save_single_file
from models.sdxl import BASE, SDXL, TINY
from sampling.pipeline import Pipeline, Settings
from train.batches import Batch
from train.dreambooth import main
from train.losses import TrainStep
from train.preflight import trainable_parameters

pytestmark = pytest.mark.filterwarnings("ignore")
EVERYTHING = ["unet", "text_encoder_1", "text_encoder_2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """test_dreambooth's folders, with a tiny model whose images are not saturated (for the pixel comparison)."""
    root = tmp_path_factory.mktemp("lora_training")
    save_single_file(tiny_model(), root / "tiny.safetensors")
    write_image_folders(root)
    return root


def adapters_on(model, patterns=KOHYA_TARGETS + CONV_TARGETS, train=EVERYTHING, rank=4, alpha=8.0, conv_rank=2):
    allowed = {n for n, _ in trainable_parameters(model, train)}
    return add_adapters(model, patterns, rank, alpha, conv_rank, allowed, seed=1)


def step_inputs(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch((torch.randint(0, 49407, (n, 77), generator=g), torch.randint(0, 49407, (n, 77), generator=g)),
                 torch.tensor([[64.0, 64, 0, 0, 64, 64]] * n), torch.randn(n, 4, 8, 8, generator=g),
                 torch.tensor([10.0, 500.0]), torch.randn(n, 4, 8, 8, generator=g), torch.ones(n), torch.ones(n))


def test_the_default_targets_are_kohyas_sdxl_set():
    """On the full-size base (meta device): 722 UNet modules, bigG's 192 (its fused in_proj as q, k, v) and
    CLIP-L's 66: kohya's 72 less the last layer, whose output SDXL never reads (no gradient reaches it)."""
    with torch.device("meta"):
        model = SDXL(BASE)
        adapters = adapters_on(model, KOHYA_TARGETS, rank=32, alpha=32, conv_rank=0)
    counts = {prefix: sum(k.startswith(prefix) for k in adapters) for prefix in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert counts == {"lora_unet_": 722, "lora_te1_": 66, "lora_te2_": 192}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in adapters
    assert "lora_te2_text_model_encoder_layers_31_self_attn_v_proj" in adapters
    assert "lora_te1_text_model_encoder_layers_11_mlp_fc1" not in adapters  # the unused last layer
    q = adapters["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    assert (q.down.weight.shape, q.up.weight.shape) == ((32, 2048), (640, 32))
    with torch.device("meta"):
        conv = adapters_on(SDXL(BASE), KOHYA_TARGETS + CONV_TARGETS, ["unet"], rank=32, alpha=32, conv_rank=8)
    # + 17 ResBlocks' in, emb and out layers (51), their 11 skip convs, 2 downsamplers and 2 upsamplers: 66
    assert len(conv) == 722 + 51 + 11 + 2 + 2
    assert conv["lora_unet_input_blocks_1_0_in_layers_2"].down.weight.shape == (8, 320, 3, 3)
    assert conv["lora_unet_output_blocks_2_2_conv"].up.weight.shape == (1280, 8, 1, 1)
    assert conv["lora_unet_input_blocks_1_0_in_layers_2"].alpha == 8  # alpha / rank the same as the linear ones'


def test_step_zero_equals_the_base_and_adapters_equal_their_merged_export(tmp_path):
    model, base = tiny_model(), tiny_model()
    adapters = adapters_on(model)
    inputs = step_inputs()
    assert torch.equal(TrainStep(model, adapters)(**vars(inputs)), TrainStep(base)(**vars(inputs)))  # up = 0: exactly the base
    with torch.no_grad():
        for a in adapters.values():
            a.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(a.up.weight)))
    save_adapters(adapters, tmp_path / "l.safetensors", torch.float32, kohya_metadata(adapters, "sdxl_base_v1-0", "x"))
    merged = copy.deepcopy(base)
    lora.merge_lora(merged, tmp_path / "l.safetensors")
    with torch.no_grad():
        hooked, plain, flat = (TrainStep(m)(**vars(inputs)) for m in (model, merged, base))
        context = [m.text_encoder_2(inputs.text[1])[0] for m in (model, merged, base)]
    assert (hooked - flat).abs().max() > 1e-2 and (context[0] - context[2]).abs().max() > 1e-2  # they do something
    torch.testing.assert_close(plain, hooked, rtol=0, atol=1e-5)
    torch.testing.assert_close(context[1], context[0], rtol=0, atol=1e-5)  # bigG's q/k/v written apart, exactly
    with safe_open(tmp_path / "l.safetensors", "pt") as f:
        meta, names = f.metadata(), list(f.keys())
        alpha = f.get_tensor("lora_unet_input_blocks_4_1_proj_in.alpha")
    assert {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name"} <= set(meta)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"].startswith("sdxl_")
    assert alpha.ndim == 0 and alpha.item() == 8.0
    assert len(names) == 3 * len(adapters) and all(n.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for n in names)


def trained_lora(setup, out, **overrides):
    fields = dict(lora_rank=4, lora_alpha=8.0, lora_conv_rank=2, lr=2e-2, max_steps=3, merge_lora=True) | overrides
    finish(run(args(setup, out, **fields)))
    return out / "lora.safetensors"


@pytest.mark.slow
def test_a_lora_trained_here_loaded_by_diffusers_gives_our_images(setup, tmp_path):
    """The export (UNet with LoCon convs): diffusers' load_lora_weights places every module, and its images
    equal ours with --lora and with the merged model.safetensors."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    from models.diffusers_layout import save_diffusers

    path = trained_lora(setup, tmp_path / "run")
    save_diffusers(load(setup / "tiny.safetensors"), tmp_path / "tiny")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny", add_watermarker=False).to(torch.float32)
    pipe.scheduler_config_as_saved = dict(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="ours")
    placed = sum(isinstance(m, LoraLayer) and "ours" in m.lora_A for m in pipe.unet.modules())
    with safe_open(path, "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    assert placed == len(modules) and any("in_layers_2" in m for m in modules)  # no key left over, LoCon included

    s = Settings(prompt="1girl, sks", negative_prompt="lowres", width=64, height=64, steps=8, sampler="euler_a",
                 seed=4, num_images=2)
    ours = Pipeline.load(setup / "tiny.safetensors", loras=[(path, 1.0)])(s, progress=False)
    assert_close_images(ours, diffusers_images(pipe, s), "a LoRA trained here, in diffusers")
    merged = Pipeline.load(tmp_path / "run" / "model.safetensors")(s, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, merged))
    plain = Pipeline.load(setup / "tiny.safetensors")(s, progress=False)
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(plain[0]))  # the LoRA trained


def test_text_encoder_adapters_load_in_diffusers_with_the_same_conditioning(tmp_path):
    """Every text-encoder module of a file with CLIP-L and bigG adapters (bigG's q, k, v from the fused in_proj)
    lands in diffusers' encoders, and the prompt embeddings equal ours."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    from models.diffusers_layout import save_diffusers

    model = tiny_model()
    save_diffusers(model, tmp_path / "tiny")
    adapters = adapters_on(model, KOHYA_TARGETS, ["text_encoder_1", "text_encoder_2"])
    with torch.no_grad():
        for i, a in enumerate(adapters.values()):
            a.up.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
    save_adapters(adapters, tmp_path / "te.safetensors", torch.float32, kohya_metadata(adapters, "sdxl_base_v1-0", "x"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny", add_watermarker=False).to(torch.float32)
    pipe.load_lora_weights(str(tmp_path / "te.safetensors"), adapter_name="ours")
    placed = [sum(isinstance(m, LoraLayer) and "ours" in m.lora_A for m in e.modules())
              for e in (pipe.text_encoder, pipe.text_encoder_2)]
    assert placed == [sum(k.startswith("lora_te1_") for k in adapters), sum(k.startswith("lora_te2_") for k in adapters)]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt("1girl, red eyes", do_classifier_free_guidance=False)
    (our_context, y), _ = Pipeline(model).conditioning(Settings(prompt="1girl, red eyes", width=64, height=64, cfg=1.0))
    torch.testing.assert_close(our_context, context, rtol=0, atol=1e-5)
    torch.testing.assert_close(y[:, :pooled.shape[1]], pooled, rtol=0, atol=1e-5)


def train_in_process(monkeypatch, cli_args):
    """dreambooth.main in this process; returns the model as export_lora saw it, after the last step."""
    from train import dreambooth
    from train import export as exports

    seen, export = {}, exports.export_lora

    def spy(model, adapters, config, out, suffix=""):
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        export(model, adapters, config, out, suffix)

    monkeypatch.setattr(exports, "export_lora", spy)
    assert dreambooth.main([str(a) for a in cli_args]) == 0
    return seen["state"]


@pytest.mark.slow
def test_a_lora_run_keeps_the_base_bit_identical(setup, tmp_path, monkeypatch, capsys):
    """Prior preservation on, adapters in the UNet and both text encoders: after the last step every base
    weight in memory is the file's, bit for bit; only adapters are in the checkpoint; the merged export is
    the base wherever no adapter reaches, and W + (alpha / rank) up @ down where one does."""
    out = tmp_path / "run"
    fields = dict(lora_rank=4, lora_alpha=8.0, lora_conv_rank=2, lr=2e-2, max_steps=3, merge_lora=True, train=EVERYTHING)
    in_memory = train_in_process(monkeypatch, args(setup, out, **fields))
    before = load(setup / "tiny.safetensors").state_dict()
    assert in_memory.keys() == before.keys() and all(torch.equal(in_memory[k], before[k]) for k in before)
    state = final_state(out, 3)
    assert state and all(k.startswith(("param.lora.", "optimizer.", "rng.")) for k in state)
    after = load(out / "model.safetensors").state_dict()
    t = load_file(out / "lora.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    in_file = {name.split(".")[0] for name in t}
    with torch.device("meta"):
        reached = {official.replace(".in_proj", ".in_proj_") + (".weight" if not official.endswith("in_proj") else "weight")
                   for official, _, _, paths in lora.sites(SDXL(TINY))
                   if any(lora.kohya_name(official, path) in in_file for path, _ in paths)}
    assert changed and changed <= reached, sorted(changed - reached)[:3]
    assert any(k.startswith("text_encoder_2.") and "in_proj" in k for k in changed)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    want = before["unet.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] + 2.0 * (
        t[f"{key}.lora_up.weight"] @ t[f"{key}.lora_down.weight"])
    torch.testing.assert_close(after["unet.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"], want)
    capsys.readouterr()
    # Resuming it with another rank would be another run: one line, before anything loads.
    assert main(args(setup, out, **(fields | dict(lora_rank=8, max_steps=6, resume="latest")))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was made with lora_rank=4, this run has 8" in err, err


@pytest.mark.slow
def test_a_bf16_base_trains_float32_adapters(setup, tmp_path, monkeypatch):
    """The frozen UNet and text encoders in bf16 (class images made with them too), the VAE and adapters float32."""
    import shutil

    shutil.copytree(setup / "class", tmp_path / "class")  # 4 there: 2 more are generated
    out = tmp_path / "bf16"
    state = train_in_process(monkeypatch, args(setup, out, class_data_dir=tmp_path / "class", num_class_images=6,
                                               lora_rank=4, base_dtype="bf16", mixed_precision="bf16", max_steps=2,
                                               gradient_checkpointing=True, validation_prompt="1girl", validation_every=2,
                                               class_steps=3))
    dtypes = {part: {v.dtype for k, v in state.items() if k.startswith(part + ".")} for part in ("unet", "text_encoder_1",
                                                                                                   "text_encoder_2", "vae")}
    assert dtypes == {"unet": {torch.bfloat16}, "text_encoder_1": {torch.bfloat16}, "text_encoder_2": {torch.bfloat16},
                      "vae": {torch.float32}}
    assert len(list((tmp_path / "class").glob("*.png"))) == 6
    ups = [v for k, v in final_state(out, 2).items() if k.startswith("param.lora.") and k.endswith("up.weight")]
    assert ups and all(v.dtype == torch.float32 for v in ups) and any(v.abs().max() > 0 for v in ups)
    assert all(np.isfinite(r["loss"]) for r in losses(out)) and (out / "validation" / "step-000002.png").exists()


@pytest.mark.slow
def test_a_refiner_trains_a_lora_of_its_unet_and_bigg(setup, tmp_path):
    """A refiner has no CLIP-L: kohya's CLIP-L patterns are passed over, bigG's adapters are lora_te2_."""
    from models.loading import resolve

    out = tmp_path / "refiner"
    finish(run(args(setup, out, model=resolve("plainxl-tiny-refiner"), prior_loss_weight=0.0, lora_rank=4, lr=2e-2,
                    max_steps=2, train=["unet", "text_encoder_2"])))
    with safe_open(out / "lora.safetensors", "pt") as f:
        names, meta = list(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_refiner_v1-0"
    assert any(n.startswith("lora_te2_") for n in names) and not any(n.startswith("lora_te1_") for n in names)
    base, merged = load("plainxl-tiny-refiner"), load("plainxl-tiny-refiner")
    lora.merge_lora(merged, out / "lora.safetensors")
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any(k.startswith("unet.") for k in moved) and any(k.startswith("text_encoder_2.") for k in moved)


@pytest.mark.slow
def test_lora_two_processes_equal_one(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    fields = dict(lora_rank=4, lora_conv_rank=2, lr=1e-2, train=EVERYTHING)
    finish(run(args(setup, one, batch_size=2, **fields)))
    finish(run(args(setup, two, batch_size=1, **fields), nproc=2))
    for ra, rb in zip(losses(one), losses(two), strict=True):
        for key in ("instance", "prior", "loss"):
            assert abs(ra[key] - rb[key]) <= 1e-5 * abs(ra[key]), f"step {ra['step']} {key}: {ra[key]} vs {rb[key]}"
    # AdamW divides by sqrt(v): a gradient that is ~0 up to rounding moves its weight by ~lr either way, so single
    # adapter weights can differ by ~lr. What the adapters do, each module's ΔW = up @ down, must agree as a whole.
    wa, wb = final_state(one, 4), final_state(two, 4)
    da, db = torch.cat(list(weight_changes(wa))), torch.cat(list(weight_changes(wb)))
    apart = ((da - db).norm() / da.norm()).item()
    print(f"LoRA DDP: ΔW relative L2 {apart:.2e}, |ΔW| {da.norm():.2e}")
    assert da.norm() > 1e-3 and apart <= 1e-2, f"the adapters' ΔW differ by {apart:.2e} relative L2"


def weight_changes(state):
    """Each adapter's up @ down, flattened, from a checkpoint's param.* tensors."""
    for key in sorted(k for k in state if k.endswith("up.weight")):
        up, down = state[key], state[key.replace("up.weight", "down.weight")]
        yield (up.flatten(1) @ down.flatten(1)).flatten()


@pytest.mark.slow
def test_lora_sigkill_then_resume_is_bit_identical(setup, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    fields = dict(lora_rank=4, lora_conv_rank=2, max_steps=6, train=EVERYTHING)
    finish(run(args(setup, reference, **fields)))
    status = kill_at_first_checkpoint(run(args(setup, killed, **fields)), killed)
    assert status == -signal.SIGKILL and not (killed / "lora.safetensors").exists()  # killed mid-run
    finish(run(args(setup, killed, resume="latest", **fields)))
    want, got = final_state(reference, 6), final_state(killed, 6)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want if not k.startswith("rng."))
    a, b = load_file(reference / "lora.safetensors"), load_file(killed / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, fragment", [
    (["--lora_rank=4", "--lora_targets=['unet.*.attn3.to_q']"], "pattern 'unet.*.attn3.to_q' matches no module"),
    (["--lora_rank=4", "--lora_targets=['unet.*.in_layers.2']"], "set lora_conv_rank"),
    (["--lora_rank=4", "--train=['text_encoder_1']", "--lora_targets=['unet.*.to_k']"], "have no module in common"),
    (["--base_dtype=bf16"], "base_dtype applies to LoRA runs"),
    (["--lora_rank=4", "--base_dtype=fp16"], "needs mixed_precision=bf16 or fp16"),
    (["--lora_rank=-1"], "lora_rank must be 0 (off) or a positive rank"),
    (["--lora_rank=4", "--lora_alpha=-1.0"], "lora_alpha must be a number more than 0"),
    (["--lora_alpha=16"], "lora_alpha applies to LoRA runs"),
    (["--lora_rank=4", "--lora_targets=[1]"], "lora_targets must be a list of name patterns"),
    (["--lora_rank=4", "--lora_type=glora"], "lora_type must be one of lora, loha, lokr, dora"),
    (["--lora_type=loha"], "lora_type applies to LoRA runs"),
    (["--lora_rank=4", "--lora_type=loha", "--lokr_factor=8"], "lokr_factor applies to lora_type='lokr'"),
    (["--lora_rank=4", "--lora_type=lokr", "--lokr_factor=0"], "lokr_factor must be -1"),
])
def test_bad_lora_settings_are_one_line_before_anything_loads(setup, tmp_path, capsys, extra, fragment):
    assert main(args(setup, tmp_path / "o") + extra) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and fragment in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_full_size_lora_step_is_budgeted_under_16_gib():
    """Issue 4's way, on the meta device with a saved-tensor byte counter (tests/benchmarks/bench_train_step.py):
    rank 32 on kohya's UNet set, bf16 base, 1024², 1 instance + 1 class latent, gradient checkpointing."""
    from bench_train_step import lora_memory

    parts = lora_memory(rank=32)
    total = sum(size for name, size in parts.items() if not name.startswith("("))
    assert total <= 16 * 2**30, {name: round(size / 2**30, 2) for name, size in parts.items()}
    checkpointed = parts["activations saved for backward, with gradient checkpointing"]
    assert checkpointed < parts["(without gradient checkpointing)"] / 5  # checkpointing is what makes it fit
