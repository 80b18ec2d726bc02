"""tests/benchmarks/gpu.py --dry-run: every code path of the GPU benchmark runs on the CPU with the tiny models (so
the script works when a GPU appears), and reports a time for plainxl and diffusers in every side-by-side row. The
numbers themselves are measurements, not asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_gpu_benchmark_dry_run_covers_every_workload(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "gpu.py"), "--dry-run", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    side_by_side = [f"{w}, {m}" for m in ("eager bf16", "compiled bf16")
                    for w in ("text to image", "denoising loop", "VAE decode")] + ["base + refiner, eager bf16"]
    for name in side_by_side:
        assert all(results[name][side][0] > 0 for side in ("plainxl", "diffusers")), (name, results[name])
    training = [name for name in results if name.startswith("training step")]
    assert len(training) == 2 and all(results[name]["plainxl"][0] > 0 for name in training)
    assert "| denoising loop, eager bf16 |" in r.stdout
