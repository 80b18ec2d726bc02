"""plainxl against diffusers on identical random weights, one command: time, peak memory, full-size parity.

    python tests/benchmarks/run.py [--quick] [--rounds N] [--only TEXT ...] [--json FILE] [--dir CACHE]

Every measurement runs in a fresh process (`--worker SPEC`), plainxl and diffusers alternating, so each
peak resident memory (VmHWM) is its own; a process does one warm-up call, then `repeats` timed ones (more
for a fast call), and the table gives the median over all rounds. Full-size random weights (seeded, std 1/sqrt(fan_in)) are
written once in bf16 to the cache folder, in our layout and, through the project's converter, in
diffusers'; each process reads them one tensor at a time, so loading adds one tensor to the peak.
Benchmarks are measurements, never asserts. Writes tests/benchmarks/RESULTS.md (machine, torch, the tables).

Workloads (tests/benchmarks/workers.py builds each): the UNet forward with a classifier-free-guidance batch of
2 (the tiny config; full SDXL at 512², bf16 and, without --quick, fp32); the full-size VAE decode to 512²; both
full-size text encoders; the whole text-to-image call (20 steps) on a mid-size model, in fp32 and bf16, and (4
steps, bf16) on the full-size single file; one DreamBooth step
(tiny and mid-size UNet, with and without gradient checkpointing); loading a full-size fp16 single file (as
fp16, and as fp32 without --quick); the full-size UNet's outputs compared in fp32 (256² with --quick, 512²
without); this machine's matmul peak with each full-size forward's FLOPs (torch.utils.flop_counter) as a
fraction of it; and, without --quick, plainxl's scaling over resolution and batch with each curve's exponent.
"""

import argparse
import json
import math
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


# ----------------------------------------------------------------------------- one process


def worker(spec):
    """Run one spec in this process and print one JSON line: seconds per timed call, peak memory."""
    import torch
    from workers import BUILDERS

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]]
    if spec["kind"] == "matmul":
        return print(json.dumps(matmul_peak()))
    call = BUILDERS[spec["kind"]](spec, dtype)
    warm_up = spec["kind"] != "load"  # a load is timed once: a second would hold two models
    times = []
    with torch.inference_mode(spec["kind"] != "train"):
        # At least `repeats` timed calls, and for fast calls as many as fill 3 s (up to 50), so that a 0.1 s
        # workload's median is not three samples of noise.
        fill = warm_up and spec["repeats"] > 0  # not for a load, nor for parity's single saved call
        while len(times) < warm_up + spec["repeats"] or (fill and sum(times[1:]) < 3 and len(times) < 51):
            start = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - start)
    if spec.get("save"):
        from safetensors.torch import save_file

        save_file({"out": out.float().contiguous()}, spec["save"])
    print(json.dumps({"seconds": times[warm_up:], "peak": peak_bytes(), "weights": out if spec["kind"] == "load" else 0}))


def matmul_peak(n=4096, repeats=5):
    """GFLOP/s of the best of `repeats` n x n matmuls, fp32 and bf16: this machine's reachable peak. A CPU
    without native bf16 (no AVX512-BF16 or AMX) emulates it hundreds of times slower than fp32: a 512² probe
    finds that in a second, and bf16 is then reported as None (its workloads are skipped)."""
    import torch

    out = {}
    for name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        a, b = torch.randn(512, 512).to(dtype), torch.randn(512, 512).to(dtype)
        a @ b
        if name == "bf16" and 2 * 512**3 / timed(lambda: a @ b) / 1e9 < out["fp32"] / 10:
            out[name] = None
            continue
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


KEPT = "<!-- run.py rewrites what is above this line and keeps what is below it -->"


def run_worker(spec):
    """One spec in a fresh process -> the JSON line it printed."""
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise SystemExit(f"{spec}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec, rounds, impls=("ours", "diffusers")):
    """Alternate the implementations in fresh processes -> {impl: (median seconds, peak bytes, weight bytes)}."""
    runs = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in runs:
            if spec["kind"] == "load":  # each load reads the file from the page cache, none from the disk
                subprocess.run(["cat", str(Path(spec["cache"]) / "sdxl_fp16.safetensors")], stdout=subprocess.DEVNULL,
                               check=True)
            runs[impl].append(run_worker(spec | {"impl": impl}))
    return {impl: (statistics.median(s for r in rs for s in r["seconds"]), max(r["peak"] for r in rs),
                   rs[0]["weights"]) for impl, rs in runs.items()}


def exponent(sizes, seconds):
    """The least-squares slope of log(seconds) on log(size): time grows as size ** exponent."""
    xs, ys = [math.log(x) for x in sizes], [math.log(y) for y in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def parity(cache, resolution, tmp):
    """The full-size UNet's fp32 outputs, ours against diffusers': max |diff| and relative L2."""
    from safetensors.torch import load_file

    spec = dict(kind="unet", size="full", dtype="fp32", resolution=resolution, batch=2, repeats=0, cache=str(cache))
    for impl in ("ours", "diffusers"):
        run_worker(spec | {"impl": impl, "save": str(tmp / f"{impl}.safetensors")})
    a, b = (load_file(tmp / f"{impl}.safetensors")["out"] for impl in ("ours", "diffusers"))
    return float((a - b).abs().max()), float((a - b).norm() / b.norm()), float(b.abs().max())


def workloads(quick, bf16):
    """(name, spec) of every side-by-side workload; --quick keeps the cheaper half. Without native bf16 (bf16 False)
    the bf16 rows are left out, and --quick runs the full-size UNet in fp32 at 256² instead."""
    unet = dict(kind="unet", size="full", batch=2, resolution=512)
    rows = [
        ("UNet, tiny config, 256², batch 2", dict(kind="unet", size="tiny", dtype="fp32", resolution=256, batch=2)),
        ("UNet, tiny config, 256², batch 2, bf16", dict(kind="unet", size="tiny", dtype="bf16", resolution=256, batch=2)),
        ("UNet, full SDXL, 512², batch 2, bf16", unet | dict(dtype="bf16")),
        ("VAE decode, full SDXL, to 512², bf16", dict(kind="vae", dtype="bf16", resolution=512)),
        ("UNet, full SDXL, 256², batch 2, fp32", unet | dict(dtype="fp32", resolution=256)),
        ("text encoders, full size, 2 prompts", dict(kind="text", dtype="fp32")),
        ("text to image, mid-size model, 256², 20 steps, CFG 5", dict(kind="pipeline", dtype="fp32", resolution=256)),
        ("text to image, mid-size model, 256², 20 steps, CFG 5, bf16", dict(kind="pipeline", dtype="bf16",
                                                                           resolution=256)),
        ("text to image, full SDXL, 512², 4 steps, CFG 5, bf16", dict(kind="pipeline", size="full", dtype="bf16",
                                                                     resolution=512, steps=4, repeats=1)),
        ("DreamBooth step, tiny config, 256², 1+1", dict(kind="train", size="tiny", dtype="fp32", resolution=256,
                                                       checkpointing=False)),
        ("DreamBooth step, mid-size UNet, 256², 1+1, checkpointing", dict(kind="train", size="mid", dtype="fp32",
                                                                         resolution=256, checkpointing=True)),
        ("load the full-size fp16 file as fp16", dict(kind="load", dtype="fp16")),
    ]
    if not quick:
        rows += [
            ("UNet, tiny config, 256², batch 2, torch.compile", dict(kind="unet", size="tiny", dtype="fp32",
                                                                    resolution=256, batch=2, compile=True)),
            ("UNet, full SDXL, 512², batch 2, fp32", unet | dict(dtype="fp32")),
            ("VAE decode, full SDXL, to 512², fp32", dict(kind="vae", dtype="fp32", resolution=512)),
            ("text encoders, full size, 2 prompts, bf16", dict(kind="text", dtype="bf16")),
            ("DreamBooth step, tiny config, 256², 1+1, checkpointing", dict(kind="train", size="tiny", dtype="fp32",
                                                                           resolution=256, checkpointing=True)),
            ("DreamBooth step, mid-size UNet, 256², 1+1", dict(kind="train", size="mid", dtype="fp32", resolution=256,
                                                              checkpointing=False)),
            ("load the full-size fp16 file as fp32", dict(kind="load", dtype="fp32")),
        ]
    if not bf16:
        rows = [(name, spec) for name, spec in rows if spec["dtype"] != "bf16"]
    if bf16 or not quick:
        rows = [(name, spec) for name, spec in rows if not name.startswith("UNet, full SDXL, 256²")]
    return rows


def scaling(cache, repeats, dtype):
    """plainxl's full-size UNet forward over resolution (batch 1) and batch (512²) -> table rows, exponents."""
    rows, curves = [], {}
    for axis, points in [("resolution", [(r, 1) for r in (256, 512, 768, 1024)]), ("batch", [(512, b) for b in (1, 2, 4)])]:
        seconds = []
        for resolution, batch in points:
            spec = dict(kind="unet", size="full", dtype=dtype, resolution=resolution, batch=batch, repeats=repeats,
                        cache=str(cache))
            s, peak, _ = measure(spec, 1, impls=("ours",))["ours"]
            seconds.append(s)
            rows.append(f"| {resolution}² | {batch} | {s:.2f} | {peak / GiB:.2f} |")
            print("  " + rows[-1], flush=True)
        sizes = [r * r if axis == "resolution" else b for r, b in points]
        curves[axis] = exponent(sizes, seconds)
    return rows, curves


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer workloads and rounds: under 10 minutes on 2 CPU cores")
    parser.add_argument("--rounds", type=int, help="rounds of fresh processes per workload (default 1 with --quick, 3 "
                                                 "without); issue 12's targets ask for medians over at least 5")
    parser.add_argument("--json", help="also write every number here")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the workloads whose name contains TEXT (repeatable; the table holds just those)")
    parser.add_argument("--dir", default=str(Path.home() / ".cache" / "plainxl-bench"), help="random weights (24 GB)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    import torch
    from workers import write_weights

    cache = Path(args.dir)
    started = time.time()
    write_weights(cache)
    rounds, repeats = (1, 3) if args.quick else (3, 3)
    rounds = args.rounds or rounds
    peak = run_worker({"kind": "matmul", "dtype": "fp32"})
    rows, loads, results = [], [], {"matmul_gflops": peak}
    chosen = [(name, spec) for name, spec in workloads(args.quick, bf16=peak["bf16"] is not None)
              if not args.only or any(text in name for text in args.only)]
    for name, spec in chosen:
        print(f"{name} ...", flush=True)
        got = measure({"repeats": 1 if spec["kind"] == "load" else repeats, "cache": str(cache)} | spec, rounds)
        (ours_s, ours_peak, ours_bytes), (theirs_s, theirs_peak, theirs_bytes) = got["ours"], got["diffusers"]
        results[name] = {"ours_s": ours_s, "diffusers_s": theirs_s, "ours_peak": ours_peak, "diffusers_peak": theirs_peak}
        rows.append(f"| {name} | {ours_s:.3f} | {theirs_s:.3f} | **{ours_s / theirs_s:.2f}** | {ours_peak / GiB:.2f} | "
                    f"{theirs_peak / GiB:.2f} | **{ours_peak / theirs_peak:.2f}** |")
        print("  " + rows[-1], flush=True)
        if spec["kind"] == "load":
            file = (cache / "sdxl_fp16.safetensors").stat().st_size
            results[name] |= {"file": file, "ours_weights": ours_bytes, "diffusers_weights": theirs_bytes}
            loads.append(f"| {name} | {file / GiB:.2f} | {ours_bytes / GiB:.2f} | {ours_peak / file:.2f} | "
                         f"{ours_peak / ours_bytes:.2f} | {theirs_peak / file:.2f} | {theirs_peak / theirs_bytes:.2f} |")

    print("full-size parity and matmul peak ...", flush=True)
    tmp = cache / "outputs"
    tmp.mkdir(exist_ok=True)
    resolution = 256 if args.quick else 512
    max_diff, rel_l2, scale = parity(cache, resolution, tmp)
    results["parity"] = {"resolution": resolution, "max_abs_diff": max_diff, "relative_l2": rel_l2, "output_max": scale}
    fraction = []
    for name, spec in chosen:
        if spec["kind"] == "unet" and spec["size"] == "full":
            r, dtype, flops = results[name], spec["dtype"], unet_flops(spec["resolution"])
            rate = {impl: flops / r[f"{impl}_s"] / 1e9 for impl in ("ours", "diffusers")}
            r["fraction_of_peak"] = {impl: rate[impl] / peak[dtype] for impl in rate}
            fraction.append(f"| {name} | {flops / 1e12:.2f} | {rate['ours']:.0f} ({rate['ours'] / peak[dtype]:.0%}) | "
                            f"{rate['diffusers']:.0f} ({rate['diffusers'] / peak[dtype]:.0%}) |")
    scale_rows, curves = [], {}
    if not args.quick:
        print("scaling ...", flush=True)
        scale_dtype = "bf16" if peak["bf16"] else "fp32"
        scale_rows, curves = scaling(cache, repeats, scale_dtype)
        results["scaling_exponents"] = curves

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    machine = f"{cpu}, {os.cpu_count()} cores"
    report = [
        "# Benchmark results", "",
        f"`python tests/benchmarks/run.py{' --quick' if args.quick else ''}"
        f"{''.join(f' --only {text!r}' for text in args.only or ())}` on {date.today()}: {machine}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, diffusers {version('diffusers')}; "
        f"{rounds} round(s) of fresh processes, each one warm-up call, then {repeats} timed calls or as many as "
        f"fill 3 s (a load: one call); {(time.time() - started) / 60:.1f} minutes.", "",
        "Time is the median seconds per call; peak is the process's VmHWM (weights + what the call allocates). "
        "Ratios are plainxl / diffusers: below 1 is better.", "",
        "| workload | plainxl s | diffusers s | time ratio | plainxl peak GiB | diffusers peak GiB | memory ratio |",
        "|---|---|---|---|---|---|---|", *rows, "",
    ]
    if loads:
        report += [
            "**Loading** (the whole pipeline from one random full-size single file, every weight read once; the "
            "file is in the page cache for both):", "",
            "| load | file GiB | plainxl weights GiB | plainxl peak / file | plainxl peak / weights | diffusers peak / "
            "file | diffusers peak / weights |", "|---|---|---|---|---|---|---|", *loads, "",
        ]
    report += [
        f"**Full-size UNet parity** (fp32, {resolution}², batch 2, identical random weights): max |diff| "
        f"{max_diff:.2e} on outputs up to {scale:.2f}, relative L2 {rel_l2:.2e}.", "",
        f"**Matmul peak** (best 4096² matmul): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 "
        + (f"{peak['bf16']:.0f} GFLOP/s." if peak["bf16"] else "not native on this CPU (emulated at under a tenth of "
           "fp32's rate), so the bf16 workloads are left out."), "",
        "| full-size UNet forward | TFLOP | plainxl GFLOP/s (of peak) | diffusers GFLOP/s (of peak) |",
        "|---|---|---|---|", *fraction, "",
    ]
    if scale_rows:
        report += [
            f"**Scaling** (plainxl's full-size UNet forward, {scale_dtype}): time grows as pixels^"
            f"{curves['resolution']:.2f} over resolution and as batch^{curves['batch']:.2f} over batch.", "",
            "| resolution | batch | seconds | peak GiB |", "|---|---|---|---|", *scale_rows, "",
        ]
    out = ROOT / "tests" / "benchmarks" / "RESULTS.md"
    old = out.read_text() if out.exists() else ""
    kept = old[old.index(KEPT):] if KEPT in old else ""  # earlier runs and notes, kept by hand below the marker
    out.write_text("\n".join(report) + ("\n" + kept if kept else ""))
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def version(package):
    from importlib.metadata import version as v

    return v(package)


if __name__ == "__main__":
    main()
