"""Data-parallel training: 2 gloo processes with batch b == 1 process with batch 2b, resume included."""
from __future__ import annotations

import csv
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from model import MsrError
from model.distributed import DistInfo, from_env
from model.train import TrainConfig, train
from refbuild.io import TMP_PREFIX


def _cfg(manifest, runs, **kw) -> TrainConfig:
    base = dict(manifest=manifest, model="msrnet_tiny_x4", runs_dir=runs, steps=4, batch_size=2, num_refs=1,
                log_every=1, ckpt_every=2, sample_every=4, ema_decay=0.9, progress=False, flip=False,
                precision="fp32")  # exact: bf16 rounding differs between batch layouts
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, runs: list[tuple[TrainConfig, int]]) -> None:
    """One torchrun-like process: the environment torchrun would set, then the runs in order."""
    torch.set_num_threads(1)  # 2 processes on a small CPU box
    for cfg, port in runs:  # a fresh port per process group: the previous store may still hold its port
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        train(cfg)


def _losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh) if r["loss"]]


def _assert_same_state(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    keys = [k for k in x if k.startswith(("model.", "ema.", "optim."))]
    assert keys and set(keys) <= set(y)
    bad = [k for k in keys if not torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-6)]
    assert not bad, bad


def test_from_env_without_torchrun_is_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert from_env() == DistInfo() and not from_env().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MsrError, match="outside WORLD_SIZE"):
        from_env()


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_doubled_batch(synthetic_manifest, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(_cfg(synthetic_manifest, tmp_path, name="single", batch_size=4))
    finally:
        torch.set_num_threads(threads)
    straight = _cfg(synthetic_manifest, tmp_path, name="ddp")
    split = _cfg(synthetic_manifest, tmp_path, name="split", stop_after=2)
    runs = [(straight, _free_port()), (split, _free_port()), (replace(split, stop_after=None, resume=True), _free_port())]
    mp.spawn(_worker, args=(2, runs), nprocs=2, join=True)

    want = _losses(single)
    assert len(want) == 4
    for run in (tmp_path / "ddp", tmp_path / "split"):
        assert _losses(run) == pytest.approx(want, rel=1e-4), run.name  # one row per step: only rank 0 logs
        _assert_same_state(single, run)
        assert not list(run.glob(TMP_PREFIX + "*"))
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
