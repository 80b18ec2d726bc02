"""plainxl against diffusers on identical random weights, one command: time, peak memory, full-size parity.

    python tests/benchmarks/run.py [--quick] [--json FILE] [--dir CACHE]

Every measurement runs in a fresh process (`--worker SPEC`), plainxl and diffusers alternating, so each
peak resident memory (VmHWM) is its own; a process does one warm-up call, then `repeats` timed ones, and
the table gives the median over all rounds. Full-size random weights (seeded, std 1/sqrt(fan_in)) are
written once in bf16 to the cache folder, in our layout and, through the project's converter, in
diffusers'; each process reads them one tensor at a time, so loading adds one tensor to the peak.
Benchmarks are measurements, never asserts. Writes tests/benchmarks/RESULTS.md (machine, torch, the tables).

Workloads: the UNet forward with a classifier-free-guidance batch of 2 (the tiny config; full SDXL at 512²
in bf16, and in fp32 without --quick), the full-size UNet's outputs compared in fp32 (256² with --quick,
512² without), the full-size VAE decode to 512² (bf16; fp32 without --quick), and this machine's matmul
peak with each full-size forward's FLOPs (torch.utils.flop_counter) as a fraction of it.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
GiB = 2**30


def peak_bytes():
    """This process's peak resident memory (not ru_maxrss, which survives fork+exec)."""
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024


# ----------------------------------------------------------------------------- weights


def random_weights(module, seed=0):
    """A state dict for `module` (built on the meta device): matrices and kernels ~ N(0, 1/fan_in), norm
    scales 1, biases 0, each tensor from its own seeded generator."""
    import torch

    out = {}
    for i, (name, p) in enumerate(module.state_dict().items()):
        if p.ndim >= 2:
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            out[name] = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5)
        else:
            out[name] = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
    return out


def write_weights(cache):
    """cache/{unet,vae}_{ours,diffusers}.safetensors in bf16, and the diffusers configs; once."""
    import torch
    from safetensors.torch import save_file

    from models.diffusers_layout import unet_config_to_diffusers, vae_config_to_diffusers
    from models.keys import unet_to_diffusers, vae_to_diffusers
    from models.unet import SDXL_BASE, UNet
    from models.vae import SDXL_VAE, AutoencoderKL

    cache.mkdir(parents=True, exist_ok=True)
    for name, build, config, to_diffusers, config_to_diffusers in [
        ("unet", lambda: UNet(SDXL_BASE), SDXL_BASE, lambda sd: unet_to_diffusers(sd, SDXL_BASE.num_res_blocks),
         unet_config_to_diffusers),
        ("vae", lambda: AutoencoderKL(SDXL_VAE), SDXL_VAE, vae_to_diffusers, vae_config_to_diffusers),
    ]:
        if (cache / f"{name}_diffusers.safetensors").exists():
            continue
        print(f"writing random full-size {name} weights to {cache} (once)", flush=True)
        with torch.device("meta"):
            module = build()
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in random_weights(module).items()}
        save_file(sd, cache / f"{name}_ours.safetensors")
        save_file({k: v.contiguous() for k, v in to_diffusers(sd).items()}, cache / f"{name}_diffusers.safetensors")
        (cache / f"{name}_diffusers.json").write_text(json.dumps(config_to_diffusers(config)))


def assign(module, path, dtype):
    """Load a meta-device module's weights from a file, one tensor at a time, cast to dtype."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        module.load_state_dict({k: f.get_tensor(k).to(dtype) for k in f.keys()}, assign=True)
    return module.eval()


# ----------------------------------------------------------------------------- workers (one per process)


def build_unet(spec, dtype):
    """-> a callable running one forward of the chosen UNet on the spec's inputs."""
    import torch

    from models.conditioning import vector_condition
    from models.diffusers_layout import unet_config_to_diffusers
    from models.keys import unet_to_diffusers
    from models.unet import SDXL_BASE, TINY, UNet

    cfg = SDXL_BASE if spec["size"] == "full" else TINY
    cache = Path(spec["cache"])
    if spec["size"] == "full":
        with torch.device("meta"):
            ours = UNet(cfg)
        state = None
    else:
        torch.manual_seed(0)
        ours = UNet(cfg)
        state = ours.state_dict()
    n, r = spec["batch"], spec["resolution"] // 8
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(n, 4, r, r, generator=g).to(dtype), torch.full((n,), 500.0)
    context = torch.randn(n, 77, cfg.context_dim, generator=g).to(dtype)
    pooled = torch.randn(n, cfg.adm_in_channels - 6 * cfg.micro_cond_dim, generator=g).to(dtype)
    time_ids = torch.tensor([[spec["resolution"]] * 2 + [0, 0] + [spec["resolution"]] * 2] * n, dtype=torch.float32)
    if spec["impl"] == "ours":
        net = assign(ours, cache / "unet_ours.safetensors", dtype) if state is None else ours.to(dtype).eval()
        y = vector_condition(pooled, time_ids, cfg.micro_cond_dim).to(dtype)
        return lambda: net(x, t, context, y)
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    if state is None:
        with torch.device("meta"):
            net = UNet2DConditionModel(**config)
        net = assign(net, cache / "unet_diffusers.safetensors", dtype)
    else:
        del ours
        net = UNet2DConditionModel(**config)
        net.load_state_dict(unet_to_diffusers(state, cfg.num_res_blocks))
        net = net.to(dtype).eval()
    added = {"text_embeds": pooled, "time_ids": time_ids.to(dtype)}
    return lambda: net(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def build_vae(spec, dtype):
    import torch

    from models.vae import SDXL_VAE, AutoencoderKL

    cache = Path(spec["cache"])
    r = spec["resolution"] // 8
    z = torch.randn(1, 4, r, r, generator=torch.Generator().manual_seed(1)).to(dtype)
    if spec["impl"] == "ours":
        with torch.device("meta"):
            vae = AutoencoderKL(SDXL_VAE)
        vae = assign(vae, cache / "vae_ours.safetensors", dtype)
        return lambda: vae.decode(z)
    from diffusers import AutoencoderKL as DiffusersVAE

    config = {k: v for k, v in json.loads((cache / "vae_diffusers.json").read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = DiffusersVAE(**config)
    vae = assign(vae, cache / "vae_diffusers.safetensors", dtype)
    return lambda: vae.decode(z).sample


def worker(spec):
    """Run one spec in this process and print one JSON line: seconds per timed call, peak memory."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    if spec["kind"] == "matmul":
        return print(json.dumps(matmul_peak()))
    call = (build_unet if spec["kind"] == "unet" else build_vae)(spec, dtype)
    times = []
    with torch.inference_mode():
        for _ in range(1 + spec["repeats"]):
            start = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - start)
    if spec.get("save"):
        from safetensors.torch import save_file

        save_file({"out": out.float().contiguous()}, spec["save"])
    print(json.dumps({"seconds": times[1:], "peak": peak_bytes()}))


def matmul_peak(n=4096, repeats=5):
    """GFLOP/s of the best of `repeats` n x n matmuls, fp32 and bf16: this machine's reachable peak."""
    import torch

    out = {}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        best = min(timed(lambda: a @ b) for _ in range(repeats))
        out[name] = 2 * n**3 / best / 1e9
    return out


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unet_flops(resolution, batch=2):
    """FLOPs of one full-size UNet forward (torch.utils.flop_counter, on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.unet import SDXL_BASE, UNet

    with torch.device("meta"):
        net = UNet(SDXL_BASE)
        r = resolution // 8
        args = (torch.randn(batch, 4, r, r), torch.zeros(batch), torch.randn(batch, 77, 2048),
                torch.randn(batch, SDXL_BASE.adm_in_channels))
        with FlopCounterMode(display=False) as counter:
            net(*args)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- the parent


def run_worker(spec):
    """One spec in a fresh process -> the JSON line it printed."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise SystemExit(f"{spec}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec, rounds):
    """Alternate ours / diffusers in fresh processes -> {impl: (median seconds, peak bytes)}."""
    runs = {"ours": [], "diffusers": []}
    for _ in range(rounds):
        for impl in runs:
            runs[impl].append(run_worker(spec | {"impl": impl}))
    return {impl: (statistics.median(s for r in rs for s in r["seconds"]), max(r["peak"] for r in rs))
            for impl, rs in runs.items()}


def parity(cache, resolution, tmp):
    """The full-size UNet's fp32 outputs, ours against diffusers': max |diff| and relative L2."""
    from safetensors.torch import load_file

    spec = dict(kind="unet", size="full", dtype="fp32", resolution=resolution, batch=2, repeats=0, cache=str(cache))
    for impl in ("ours", "diffusers"):
        run_worker(spec | {"impl": impl, "save": str(tmp / f"{impl}.safetensors")})
    a, b = (load_file(tmp / f"{impl}.safetensors")["out"] for impl in ("ours", "diffusers"))
    return float((a - b).abs().max()), float((a - b).norm() / b.norm()), float(b.abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer workloads and rounds: under 10 minutes on 2 CPU cores")
    parser.add_argument("--json", help="also write every number here")
    parser.add_argument("--dir", default=str(Path.home() / ".cache" / "plainxl-bench"), help="random weights (10 GB)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import torch

    cache = Path(args.dir)
    started = time.time()
    write_weights(cache)
    rounds, repeats = (1, 3) if args.quick else (3, 3)
    rows, results = [], {}
    workloads = [
        ("UNet, tiny config, 256², batch 2", dict(kind="unet", size="tiny", dtype="fp32", resolution=256, batch=2)),
        ("UNet, tiny config, 256², batch 2, bf16", dict(kind="unet", size="tiny", dtype="bf16", resolution=256, batch=2)),
        ("UNet, full SDXL, 512², batch 2, bf16", dict(kind="unet", size="full", dtype="bf16", resolution=512, batch=2)),
        ("VAE decode, full SDXL, to 512², bf16", dict(kind="vae", dtype="bf16", resolution=512)),
    ]
    if not args.quick:
        workloads += [
            ("UNet, full SDXL, 512², batch 2, fp32", dict(kind="unet", size="full", dtype="fp32", resolution=512, batch=2)),
            ("VAE decode, full SDXL, to 512², fp32", dict(kind="vae", dtype="fp32", resolution=512)),
        ]
    for name, spec in workloads:
        print(f"{name} ...", flush=True)
        got = measure(spec | {"repeats": repeats, "cache": str(cache)}, rounds)
        (ours_s, ours_peak), (theirs_s, theirs_peak) = got["ours"], got["diffusers"]
        results[name] = {"ours_s": ours_s, "diffusers_s": theirs_s, "ours_peak": ours_peak, "diffusers_peak": theirs_peak}
        rows.append(f"| {name} | {ours_s:.3f} | {theirs_s:.3f} | **{ours_s / theirs_s:.2f}** | {ours_peak / GiB:.2f} | "
                    f"{theirs_peak / GiB:.2f} | **{ours_peak / theirs_peak:.2f}** |")
        print("  " + rows[-1], flush=True)

    print("full-size parity and matmul peak ...", flush=True)
    tmp = cache / "outputs"
    tmp.mkdir(exist_ok=True)
    resolution = 256 if args.quick else 512
    max_diff, rel_l2, scale = parity(cache, resolution, tmp)
    results["parity"] = {"resolution": resolution, "max_abs_diff": max_diff, "relative_l2": rel_l2, "output_max": scale}
    peak = run_worker({"kind": "matmul", "dtype": "fp32"})
    results["matmul_gflops"] = peak
    flops = unet_flops(512)
    fraction = []
    for name, r in results.items():
        if name.startswith("UNet, full SDXL, 512²"):
            dtype = "bf16" if "bf16" in name else "fp32"
            rate = {impl: flops / r[f"{impl}_s"] / 1e9 for impl in ("ours", "diffusers")}
            r["fraction_of_peak"] = {impl: rate[impl] / peak[dtype] for impl in rate}
            fraction.append(f"| {name} | {flops / 1e12:.2f} | {rate['ours']:.0f} ({rate['ours'] / peak[dtype]:.0%}) | "
                            f"{rate['diffusers']:.0f} ({rate['diffusers'] / peak[dtype]:.0%}) |")

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    report = [
        "# Benchmark results", "",
        f"`python tests/benchmarks/run.py{' --quick' if args.quick else ''}` on {date.today()}: {machine}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, diffusers {version('diffusers')}; "
        f"{rounds} round(s) of fresh processes, {repeats} timed calls each after a warm-up; "
        f"{(time.time() - started) / 60:.1f} minutes.", "",
        "Time is the median seconds per call; peak is the process's VmHWM (weights + what the call allocates). "
        "Ratios are plainxl / diffusers: below 1 is better.", "",
        "| workload | plainxl s | diffusers s | time ratio | plainxl peak GiB | diffusers peak GiB | memory ratio |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"**Full-size UNet parity** (fp32, {resolution}², batch 2, identical random weights): max |diff| "
        f"{max_diff:.2e} on outputs up to {scale:.2f}, relative L2 {rel_l2:.2e}.", "",
        f"**Matmul peak** (best 4096² matmul): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s.", "",
        "| full-size UNet forward | TFLOP | plainxl GFLOP/s (of peak) | diffusers GFLOP/s (of peak) |",
        "|---|---|---|---|", *fraction, "",
    ]
    out = ROOT / "tests" / "benchmarks" / "RESULTS.md"
    out.write_text("\n".join(report))
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def version(package):
    from importlib.metadata import version as v

    return v(package)


if __name__ == "__main__":
    main()
