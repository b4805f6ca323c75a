"""CUDA paths of the model half: bf16 training, one-process nccl DDP, evaluation/inference on GPU.

Skipped without CUDA (`make gpu-check` runs them where a GPU is at hand)."""
from __future__ import annotations

import csv
import math
import socket

import pytest
import torch

from model.evaluate import evaluate
from model.train import TrainConfig, train
from refbuild.torchutil import resolve_precision

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run `make gpu-check` on a GPU machine)")]


def _cfg(manifest, runs, **kw) -> TrainConfig:
    base = dict(manifest=manifest, model="msrnet2_tiny_x4", runs_dir=runs, steps=50, batch_size=4, num_refs=2,
                log_every=5, ckpt_every=25, sample_every=1000, ema_decay=0.0, progress=False, device="cuda", lr=1e-3)
    return TrainConfig(**{**base, **kw})


def _losses(run) -> list[float]:
    with open(run / "metrics.csv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]


def test_50_step_bf16_training_on_cuda_learns(synthetic_manifest, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"  # what precision="auto" trains in
    run = train(_cfg(synthetic_manifest, tmp_path, name="bf16", precision="auto"))
    losses = _losses(run)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns


def test_one_process_nccl_ddp_run(synthetic_manifest, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    run = train(_cfg(synthetic_manifest, tmp_path, name="nccl", steps=10))
    assert (run / "last.safetensors").is_file()
    assert all(math.isfinite(v) for v in _losses(run))


def test_eval_on_cuda_matches_cpu(synthetic_manifest, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    run = train(_cfg(synthetic_manifest, tmp_path, name="e", steps=4, precision="fp32"))
    ck = run / "last.safetensors"
    _, gpu = evaluate(ck, synthetic_manifest, tmp_path / "g", device="cuda")
    _, cpu = evaluate(ck, synthetic_manifest, tmp_path / "c", device="cpu")
    assert gpu["sr"]["psnr_y"] == pytest.approx(cpu["sr"]["psnr_y"], abs=0.05)
