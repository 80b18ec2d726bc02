"""The memory a full-size SDXL fine-tune needs per GPU, counted on the meta device (no weights are allocated):
parameters, gradients and optimizer state by dtype, and the activations autograd saves for backward, with a
saved-tensor byte counter. Full fine-tuning per optimizer option (train/optim.py) and LoRA.

    python tests/benchmarks/bench_train_step.py

The time and memory of one training step against diffusers' UNet is a workload of tests/benchmarks/run.py.
"""


def saved_bytes(unet, dtype, pairs=1, resolution=1024):
    """What autograd keeps for backward in one forward of a UNet on the meta device (dtype inputs), counted
    with saved_tensors_hooks -> (whole forward, of which attention probabilities, with gradient checkpointing).
    Weights saved for backward are not counted (they are there anyway); nor are the attention probabilities
    that PyTorch's math attention (all the meta device runs) keeps, since flash and memory-efficient
    attention on a GPU do not: they are reported apart. Checkpointed = the blocks' inputs and outputs + the
    largest block's own activations (recomputed one block at a time in backward): an upper bound."""
    import torch

    cfg = unet.config
    n, r = 2 * pairs, resolution // 8
    with torch.device("meta"):
        x, t = torch.randn(n, 4, r, r, dtype=dtype), torch.zeros(n)
        context = torch.randn(n, 77, cfg.context_dim, dtype=dtype)
        y = torch.randn(n, cfg.adm_in_channels, dtype=dtype)
        emb = torch.randn(n, 4 * cfg.model_channels, dtype=dtype)
    weights = {id(p) for p in unet.parameters()}
    tokens = {(r // 2**i) ** 2 for i in range(len(cfg.channel_mult))}  # H*W of each level
    saved = {"bytes": 0, "attention": 0}

    def pack(tensor):
        if id(tensor) in weights or (tensor._base is not None and id(tensor._base) in weights):
            return tensor
        size = tensor.numel() * tensor.element_size()
        if tensor.ndim == 4 and tensor.shape[-2] in tokens and tensor.shape[-1] in tokens | {77}:
            saved["attention"] += size  # (B, heads, N, M) probabilities
        else:
            saved["bytes"] += size
        return tensor

    def count(fn, *args):
        saved["bytes"] = saved["attention"] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args)
        return out, saved["bytes"]

    _, whole = count(unet, x, t, context, y)
    attention = saved["attention"]
    boundaries, largest, h, skips = 0, 0, x, []
    for block in unet.input_blocks:
        h, size = count(block, h, emb, context)
        largest, boundaries = max(largest, size), boundaries + h.numel() * h.element_size()
        skips.append(h)
    h, size = count(unet.middle_block, h, emb, context)
    largest, boundaries = max(largest, size), boundaries + h.numel() * h.element_size()
    for block in unet.output_blocks:
        skip = skips.pop()
        h, size = count(block, h, emb, context, skips[-1].shape[-2:] if skips else None, skip)
        largest, boundaries = max(largest, size), boundaries + h.numel() * h.element_size()
    return whole, attention, boundaries + largest


def full_size_memory(pairs=1, resolution=1024):
    """Full-size SDXL UNet fine-tune: parameter count, and saved_bytes() in float32 and bfloat16."""
    import torch

    from models.unet import SDXL_BASE, UNet

    with torch.device("meta"):
        unet = UNet(SDXL_BASE)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        results[dtype] = saved_bytes(unet.to(dtype), dtype, pairs, resolution)
    return sum(p.numel() for p in unet.parameters()), results


def lora_memory(rank=32, pairs=1, resolution=1024):
    """Full-size SDXL LoRA DreamBooth (kohya's default UNet set at `rank`, bf16 base, gradient checkpointing):
    bytes of each part. The meta device has no autocast, so the adapters are cast to bf16 for the activation
    count, as autocast runs them; their parameters, gradients and AdamW moments are counted in float32."""
    import torch

    from models.adapters import KOHYA_TARGETS, add_adapters
    from models.sdxl import BASE, SDXL

    with torch.device("meta"):
        model = SDXL(BASE).requires_grad_(False)
        allowed = {n for n, _ in model.named_parameters() if n.startswith("unet.")}
        adapters = add_adapters(model, KOHYA_TARGETS, rank, rank, allowed=allowed)
    adapters.to(torch.bfloat16)
    count = lambda module: sum(p.numel() for p in module.parameters())
    n_lora = count(adapters)
    whole, attention, checkpointed = saved_bytes(model.unet.to(torch.bfloat16), torch.bfloat16, pairs, resolution)
    return {"UNet weights, bf16": count(model.unet) * 2,
            "text encoders, bf16": (count(model.text_encoder_1) + count(model.text_encoder_2)) * 2,
            "VAE, float32": count(model.vae) * 4,
            f"adapters ({n_lora / 1e6:.1f} M parameters) + gradients + AdamW moments, float32": n_lora * 16,
            "activations saved for backward, with gradient checkpointing": checkpointed,
            "(without gradient checkpointing)": whole,
            "(attention probabilities, math attention only)": attention}


def full_finetune_budget(pairs=1, resolution=1024):
    """Full-size SDXL UNet fine-tuning (train=["unet"], bf16 autocast, gradient checkpointing, 1 instance + 1 class
    latent at `resolution`): bytes per GPU of each part, for each combination of the trainer's optimizer options
    (train/optim.py). Returns {combination: {part: bytes}}.

    Weights, gradients and optimizer state follow from the parameter shapes (meta device); activations from
    saved_bytes(). fused_backward holds one tensor's gradient at a time (counted: the largest); bf16 master weights
    add a float32 copy of one tensor while it steps. With float32 weights, autocast keeps a bf16 copy of every
    weight it has cast until the forward ends (counted in full: an upper bound, as gradient checkpointing's
    recomputation casts again). Text encoders are held in the weights' dtype, the VAE in float32; with cache_latents
    and cache_text_embeddings both leave the GPU once they have encoded the data. parallel=fsdp holds 1/N of the
    weights, gradients and moments, plus two units' weights whole (the one running and the one prefetched) and one
    unit's whole gradient before its reduce-scatter, the largest unit of train/optim.fsdp_units counted."""
    import torch

    from models.sdxl import BASE, SDXL
    from train.optim import fsdp_units

    with torch.device("meta"):
        model = SDXL(BASE)
    seen, unit = set(), 0  # the largest unit's own weights (nested units hold theirs)
    for module in fsdp_units(model.unet):
        own = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        unit = max(unit, sum(p.numel() for p in own))
    shapes = [p.shape for p in model.unet.parameters()]
    n = sum(s.numel() for s in shapes)
    largest = max(s.numel() for s in shapes)
    frozen_text = sum(p.numel() for part in (model.text_encoder_1, model.text_encoder_2) for p in part.parameters())
    vae = sum(p.numel() for p in model.vae.parameters())
    # torch's Adafactor: a row and a column factor (float32) per matrix or conv kernel (over its last two dims),
    # a full second moment per vector.
    adafactor = sum((s[:-1].numel() + s[:-2].numel() * s[-1]) if len(s) >= 2 else s.numel() for s in shapes) * 4
    _, _, activations = saved_bytes(model.unet.to(torch.bfloat16), torch.bfloat16, pairs, resolution)
    rows = {}
    # (optimizer, master_dtype, fused_backward, parallel, GPUs, cache_latents + cache_text_embeddings)
    for optimizer, master, fused, parallel, gpus, cached in [
            ("adamw", "fp32", False, "ddp", 1, False), *[("adamw", "fp32", False, "zero", k, False) for k in (2, 4, 8)],
            *[("adamw", "fp32", False, "fsdp", k, False) for k in (2, 4, 8)], ("adamw", "fp32", False, "fsdp", 8, True),
            ("adamw", "fp32", False, "ddp", 1, True), ("adafactor", "fp32", False, "ddp", 1, False),
            ("adafactor", "fp32", True, "ddp", 1, False), ("adafactor", "fp32", True, "ddp", 1, True),
            ("adamw", "bf16", True, "ddp", 1, False), ("adafactor", "bf16", False, "ddp", 1, False),
            ("adafactor", "bf16", True, "ddp", 1, False), ("adafactor", "bf16", True, "ddp", 1, True)]:
        size = 4 if master == "fp32" else 2
        state = n * 8 if optimizer == "adamw" else adafactor
        name = f"{optimizer}, {master} weights" + (", fused_backward" if fused else "") + (
            f", parallel={parallel} on {gpus} GPUs" if gpus > 1 else "") + (", cached latents + text" if cached else "")
        shards = gpus if parallel == "fsdp" else 1
        rows[name] = {
            "UNet weights": n * size // shards + (2 * unit * size if shards > 1 else 0),
            "gradients": largest * size if fused else n * size // shards + (unit * size if shards > 1 else 0),
            "optimizer state": state // gpus,
            "float32 copy of the tensor stepping": largest * 8 if master == "bf16" else 0,
            "autocast's bf16 weight copies": n * 2 if master == "fp32" else 0,
            "text encoders + VAE": 0 if cached else frozen_text * size + vae * 4,  # cached: parked on the CPU
            "activations (checkpointed, no attention probabilities)": activations,
        }
    return rows


def main():
    GiB = 2**30
    params, results = full_size_memory()
    print("full-size SDXL UNet fine-tune (meta device), 1 instance + 1 class latent at 1024x1024 per GPU:")
    print(f"  weights fp32 {params * 4 / GiB:.1f} GiB + grads {params * 4 / GiB:.1f} + AdamW moments "
          f"{params * 8 / GiB:.1f} = {params * 16 / GiB:.1f} GiB (+ frozen text encoders and VAE in fp16: 1.8 GiB)")
    for dtype, (whole, attention, checkpointed) in results.items():
        print(f"  activations saved for backward, {str(dtype)[6:]}: {whole / GiB:.1f} GiB (+ attention probabilities "
              f"{attention / GiB:.1f} GiB, not stored by flash attention); with gradient checkpointing "
              f"{checkpointed / GiB:.1f} GiB (upper bound)")
    parts = lora_memory()
    print("full-size SDXL LoRA DreamBooth (rank 32, kohya's UNet set, bf16 base, gradient checkpointing, "
          "1 instance + 1 class latent at 1024x1024, meta device):")
    for name, size in parts.items():
        print(f"  {name}: {size / GiB:.2f} GiB")
    total = sum(size for name, size in parts.items() if not name.startswith("("))
    print(f"  total {total / GiB:.1f} GiB")
    rows = full_finetune_budget()
    parts = list(next(iter(rows.values())))
    print("\nfull-size SDXL UNet fine-tuning per GPU (train=['unet'], bf16 autocast, gradient checkpointing, "
          "1 instance + 1 class latent at 1024x1024, meta device), GiB:\n")
    print("| combination | " + " | ".join(parts) + " | total |")
    print("|---" * (len(parts) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[p] / GiB:.2f}" for p in parts) + f" | **{sum(row.values()) / GiB:.1f}** |")

if __name__ == "__main__":
    main()
