"""What the research instruments (sampling/instruments.py) cost: one UNet forward on a CFG batch of 2, with each
instrument active, as a ratio against the plain forward timed in the same process (calls interleaved, medians).
"off" is the forward of the same UNet after every instrument was entered and left, "plain" that of a copy taken
before any was: off must cost nothing.

    python tests/benchmarks/bench_instruments.py [--repeats 15]

The tiny UNet is all per-call overhead (the worst case for hooks); the mid-size one (128 channels, 256²) does
real work. Benchmarks are measurements, never asserts.
"""

import argparse
import copy
import statistics
import time
from contextlib import nullcontext

import torch
from workers import MID_UNET

from models.conditioning import vector_condition
from models.unet import TINY, UNet
from sampling.instruments import attention_maps, intervene, tap
from sampling.interventions import classic_attention, freeu, skipped


class Root(torch.nn.Module):
    """The UNet under the name `unet`, so patterns read as they do on a whole model ("unet.output_blocks.*")."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet


def case(name, model):
    """The context manager of one benchmark case."""
    return {
        "plain": nullcontext, "off": nullcontext,
        "tap: every output block": lambda: tap(model, "unet.output_blocks.*"),
        "intervene: identity on every output block": lambda: intervene(model, "unet.output_blocks.*", lambda n, s, o: o),
        "skip one transformer block": lambda: skipped(model, "unet.output_blocks.3.1.transformer_blocks.0"),
        "classic softmax attention": lambda: classic_attention(model),
        "attention maps: every cross-attention": lambda: attention_maps(model),
    }[name]


def measure(cfg, resolution, repeats):
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    pristine = copy.deepcopy(unet)  # "plain": a copy no instrument ever touched
    model = Root(unet)
    n, r = 2, resolution // 8
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, 4, r, r, generator=g), torch.full((n,), 500.0)
    context = torch.randn(n, 77, cfg.context_dim, generator=g)
    y = vector_condition(torch.randn(n, cfg.adm_in_channels - 6 * cfg.micro_cond_dim, generator=g),
                         torch.tensor([[float(resolution)] * 2 + [0.0, 0.0] + [float(resolution)] * 2] * n),
                         cfg.micro_cond_dim)
    names = ["plain", "tap: every output block", "intervene: identity on every output block",
             "skip one transformer block", "classic softmax attention", "attention maps: every cross-attention"]
    with torch.no_grad():
        for name in names[1:]:
            with case(name, model)():
                unet(x, t, context, y)  # warm-up, and every instrument entered and left before "off"
        with freeu(model):
            unet(x, t, context, y)
        names.insert(1, "off")
        times = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                net = pristine if name == "plain" else unet
                with case(name, model)():
                    start = time.perf_counter()
                    net(x, t, context, y)
                    times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    return plain, {name: statistics.median(v) / plain for name, v in times.items() if name != "plain"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as tests/benchmarks/run.py: one thread, so the two cores do not fight
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats} interleaved calls\n")
    print("| case | tiny UNet, 64² | mid-size UNet, 256² |\n|---|---|---|")
    tiny_plain, tiny = measure(TINY, 64, args.repeats)
    mid_plain, mid = measure(MID_UNET, 256, args.repeats)
    print(f"| plain forward (s) | {tiny_plain:.4f} | {mid_plain:.3f} |")
    for name in tiny:
        print(f"| {name} | {tiny[name]:.3f} | {mid[name]:.3f} |")


if __name__ == "__main__":
    main()
