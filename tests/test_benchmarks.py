"""`benchmarks/gpu.sh --quick`: the GPU benchmark script's two scripts run end to end at the tiny size on the CPU."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_quick_runs_on_the_cpu(demo_data, tmp_path):
    env = {**os.environ, "DATA_ROOT": str(demo_data), "WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quick"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    # the step benchmark: each level timed and compared with stock
    for variant in ("stock", "vision", "prefix"):
        assert f"batch 2 {variant:>10}: step" in out, out[-3000:]
    assert "batch 2:     prefix" in out and "steps/s" in out
    # the end-to-end stage: both tools ran the same steps on video-stored data
    line = next(ln for ln in out.splitlines() if "ours/stock" in ln)
    assert "lerobot-train" in line and "steps/s" in line
    assert "video 128x96" in out
