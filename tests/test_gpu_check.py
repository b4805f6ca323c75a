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


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: `make gpu-train` would run for real")
def test_gpu_train_without_cuda_prints_the_plan_and_exits_0(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--mode", "train", "--degradation", "real_mild",
                        "--out", str(tmp_path / "g")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "gpu-train plan:" in r.stdout
    for step in ("detect", "train", "eval_bicubic", "eval_camera", "export"):
        assert f"  {step} " in r.stdout
    assert "--degradation real_mild" in r.stdout and "--framing" in r.stdout and "msrnet2_x8_real.safetensors" in r.stdout
    assert "  tests " not in r.stdout  # the window is for training, not for the test suite
    assert not (tmp_path / "g").exists()
