"""`make gpu-check` on a machine without CUDA: prints its plan, runs nothing, exits 0."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: `make gpu-check` would run for real")
def test_gpu_check_without_cuda_prints_the_plan_and_exits_0(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "g")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for step in ("tests", "bench", "train", "eval_matched"):
        assert f"  {step} " in r.stdout
    assert "-m gpu" in r.stdout and "no CUDA" in r.stdout
    assert not (tmp_path / "g").exists()  # nothing run, nothing written
