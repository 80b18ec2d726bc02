"""One DreamBooth training step of the tiny UNet: plainxl vs diffusers' UNet2DConditionModel with the
same weights, same inputs, same AdamW, on this machine; and the memory a full-size SDXL UNet
fine-tune needs, measured on the meta device.

    python tests/benchmarks/bench_train_step.py [--resolution 128] [--pairs 2] [--steps 10]

Step = UNet forward on a batch of instance + class latents, MSE to the noise, backward, AdamW step
(text encoders and VAE frozen, as with train=["unet"]). Each implementation runs in its own process
so that its peak resident memory (VmHWM) is its own.
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STEP = """
import time, torch
torch.manual_seed(0)
from models.unet import TINY, UNet
from models.conditioning import vector_condition
ours = UNet(TINY)
n, r = 2 * {pairs}, {resolution} // 8
x, noise = torch.randn(n, 4, r, r), torch.randn(n, 4, r, r)
t = torch.randint(0, 1000, (n,)).float()
context, pooled = torch.randn(n, 77, TINY.context_dim), torch.randn(n, 48)
time_ids = torch.tensor([[{resolution}, {resolution}, 0, 0, {resolution}, {resolution}]] * n, dtype=torch.float32)
if {diffusers}:
    from diffusers import UNet2DConditionModel
    from models.keys import unet_to_diffusers
    from models.diffusers_layout import unet_config_to_diffusers
    config = {{k: v for k, v in unet_config_to_diffusers(TINY).items() if not k.startswith("_")}}
    net = UNet2DConditionModel(**config)
    net.load_state_dict(unet_to_diffusers(ours.state_dict(), TINY.num_res_blocks))
    net.enable_gradient_checkpointing() if {checkpointing} else None
    forward = lambda: net(x, t, encoder_hidden_states=context,
                          added_cond_kwargs={{"text_embeds": pooled, "time_ids": time_ids}}).sample
else:
    net = ours
    net.gradient_checkpointing = {checkpointing}
    y = vector_condition(pooled, time_ids, TINY.micro_cond_dim)
    forward = lambda: net(x, t, context, y)
net.train()
opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
times = []
for i in range({steps} + 2):
    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(forward(), noise)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
times = sorted(times[2:])  # the first two steps pay one-time costs
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(times[len(times) // 2], peak)
"""


def measure(diffusers, checkpointing, args):
    code = STEP.format(diffusers=diffusers, checkpointing=checkpointing, pairs=args.pairs,
                       resolution=args.resolution, steps=args.steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    seconds, peak = out.stdout.split()[-2:]
    return float(seconds), int(peak) / 2**20


def full_size_memory(pairs=1, resolution=1024):
    """Bytes of a full-size SDXL UNet fine-tune, from tensors built on the meta device: weights, grads,
    AdamW moments, and the activations autograd saves (counted with saved_tensors_hooks), without
    and with gradient checkpointing (block boundaries + the largest block's own activations)."""
    import torch

    from models.unet import SDXL_BASE, UNet

    with torch.device("meta"):
        unet = UNet(SDXL_BASE)
    params = sum(p.numel() for p in unet.parameters())
    n, r = 2 * pairs, resolution // 8
    with torch.device("meta"):
        x, t = torch.randn(n, 4, r, r), torch.zeros(n)
        context, y = torch.randn(n, 77, 2048), torch.randn(n, SDXL_BASE.adm_in_channels)
    saved = {"bytes": 0, "attention": 0}
    tokens = {(r // 2**i) ** 2 for i in range(len(SDXL_BASE.channel_mult))}  # H*W of each level

    def pack(tensor):
        size = tensor.numel() * tensor.element_size()
        saved["bytes"] += size
        # The meta device runs PyTorch's math attention, which saves the (B, heads, N, M) probabilities;
        # flash / memory-efficient attention on a GPU does not store them. Count them apart.
        if tensor.ndim == 4 and tensor.shape[-2] in tokens and tensor.shape[-1] in tokens | {77}:
            saved["attention"] += size
        return tensor

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        unet.to(dtype)
        saved["bytes"] = saved["attention"] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x.to(dtype), t, context.to(dtype), y.to(dtype))
        whole, attention = saved["bytes"], saved["attention"]
        # Checkpointed: only each block's inputs stay; one block is recomputed at a time in backward.
        boundaries, largest = 0, 0
        emb = torch.randn(n, 4 * SDXL_BASE.model_channels, device="meta", dtype=dtype)
        h, skips = x.to(dtype), []
        for block in unet.input_blocks:
            saved["bytes"] = 0
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                h = block(h, emb, context.to(dtype))
            largest, boundaries = max(largest, saved["bytes"]), boundaries + h.numel() * h.element_size()
            skips.append(h)
        blocks = [(unet.middle_block, None)] + [(b, None) for b in unet.output_blocks]
        for i, (block, _) in enumerate(blocks):
            if i > 0:
                h = torch.cat([h, skips.pop()], dim=1)
            saved["bytes"] = 0
            size = skips[-1].shape[-2:] if i > 0 and skips else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                h = block(h, emb, context.to(dtype), size) if i > 0 else block(h, emb, context.to(dtype))
            largest, boundaries = max(largest, saved["bytes"]), boundaries + h.numel() * h.element_size()
        results[dtype] = (whole, attention, boundaries + largest)
    return params, results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"tiny UNet, {2 * args.pairs} latents of {args.resolution // 8}x{args.resolution // 8}, float32, CPU")
    for checkpointing in (False, True):
        (ours_s, ours_mb), (theirs_s, theirs_mb) = measure(False, checkpointing, args), measure(True, checkpointing, args)
        print(f"  checkpointing={checkpointing}: plainxl {ours_s * 1000:.0f} ms, {ours_mb:.0f} MiB peak RSS; "
              f"diffusers {theirs_s * 1000:.0f} ms, {theirs_mb:.0f} MiB; time ratio {ours_s / theirs_s:.2f}")

    GiB = 2**30
    params, results = full_size_memory()
    print(f"full-size SDXL UNet fine-tune (meta device), 1 instance + 1 class latent at 1024x1024 per GPU:")
    print(f"  weights fp32 {params * 4 / GiB:.1f} GiB + grads {params * 4 / GiB:.1f} + AdamW moments "
          f"{params * 8 / GiB:.1f} = {params * 16 / GiB:.1f} GiB (+ frozen text encoders and VAE in fp16: 1.8 GiB)")
    for dtype, (whole, attention, checkpointed) in results.items():
        print(f"  activations saved for backward, {str(dtype)[6:]}: {whole / GiB:.1f} GiB, of which attention "
              f"probabilities {attention / GiB:.1f} GiB (not stored by flash attention); "
              f"with gradient checkpointing {checkpointed / GiB:.1f} GiB (upper bound, same caveat)")


if __name__ == "__main__":
    main()
