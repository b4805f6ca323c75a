"""`model train` guards its run folder and its checkpoints (issue 15): one run per
folder at a time, a resume that keeps the run's settings, metrics.csv with one
header and no duplicated steps after a kill, and damaged or forged checkpoints
refused in one line that names the file (never a traceback, a huge allocation,
or NaN weights loaded silently)."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rel_helpers import one_line, record

model_cli = pytest.importorskip("model.cli", reason="model package not importable")

REPO = Path(__file__).resolve().parents[2]
META_KEY = "msrface.checkpoint"
TINY = "msrnet_tiny_x4"
FIELDS = ["step", "loss", "lr", "samples_per_s", "val_psnr_y"]


def _model_conftest():
    spec = importlib.util.spec_from_file_location("model_conftest", REPO / "tests" / "model" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """8 smooth synthetic 256x256 faces, 4 references each (as tests/model's synthetic_manifest)."""
    mc = _model_conftest()
    root = tmp_path_factory.mktemp("guard_faces")
    rng = np.random.default_rng(0)
    names = []
    for i in range(8):
        mc._smooth_image(rng).save(root / f"img{i}.png")
        names.append(f"img{i}.png")
    rows = [{"face_id": f"f{i}", "hr_path": names[i], "identity": f"id{i}",
             "ref_paths": [names[(i + k) % 8] for k in range(1, 5)]} for i in range(8)]
    return mc.write_manifest(root / "train.parquet", rows, root, root)


def _args(manifest: Path, runs: Path, name: str = "r", steps: int = 4, *extra) -> list[str]:
    return ["train", "--manifest", manifest, "--model", TINY, "--name", name, "--runs-dir", runs, "--steps", steps,
            "--batch-size", 2, "--num-refs", 1, "--device", "cpu", "--log-every", 1, "--ckpt-every", 2,
            "--sample-every", 1000, *extra]


def invoke(*args):
    return CliRunner().invoke(model_cli.app, [str(a) for a in args])


def mtrain(*args):
    res = invoke(*args)
    assert res.exit_code == 0, f"exit {res.exit_code}:\n{res.output}\n{res.exception!r}"
    return res


def steps_logged(run: Path) -> list[int]:
    text = (run / "metrics.csv").read_text()
    assert text.count("step,") == 1 and text.startswith(",".join(FIELDS)), text
    return [int(r["step"]) for r in csv.DictReader(text.splitlines()) if r["loss"]]


# -- 1. one run per folder ------------------------------------------------------------------

HOLD = r"""
import fcntl, os, sys, time
fh = open(sys.argv[1], "a+")
fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
os.ftruncate(fh.fileno(), 0)
os.write(fh.fileno(), f"model train (pid {os.getpid()})".encode())
print("held", flush=True)
sys.stdin.read()
"""


def test_second_run_on_a_held_run_folder_fails_at_once(manifest, tmp_path):
    run = tmp_path / "runs" / "same"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        line = one_line(invoke(*_args(manifest, tmp_path / "runs", "same", 2)))
        assert time.monotonic() - t0 < 30
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert str(run) in line and f"pid {holder.pid}" in line and "--name" in line, line
    assert sorted(p.name for p in run.iterdir()) == [".lock"], "the refused run wrote into the folder"
    mtrain(*_args(manifest, tmp_path / "runs", "same", 2))  # the holder gone, the folder is free
    record("run_folder_faults", "two runs on one folder")


def test_lock_of_a_dead_run_is_taken_over_with_a_notice(manifest, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / ".lock").write_text(f"model train (pid {dead.pid})")  # what a killed run leaves
    mtrain(*_args(manifest, tmp_path / "runs", "r", 2))
    notices = [r.getMessage() for r in caplog.records if f"pid {dead.pid}" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0] and str(run) in notices[0], notices
    assert (run / ".lock").read_text() == "", "a finished run leaves its lock file naming no holder"
    record("run_folder_faults", "lock of a killed run")


# -- 2. resume keeps the run's settings -----------------------------------------------------

@pytest.fixture(scope="module")
def halfway(manifest, tmp_path_factory) -> Path:
    """A 4-step run stopped (checkpointed) at step 2: runs/r."""
    runs = tmp_path_factory.mktemp("guard_half") / "runs"
    mtrain(*_args(manifest, runs, "r", 4, "--stop-after", 2))
    return runs / "r"


def _copy(halfway: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r"
    shutil.copytree(halfway, run)
    return run


def test_resume_refuses_changed_settings(manifest, halfway, tmp_path):
    run = _copy(halfway, tmp_path)
    other = tmp_path / "other.parquet"
    shutil.copyfile(manifest, other)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = one_line(invoke(*_args(other, tmp_path / "runs", "r", 6), "--resume", "--lr", 1e-3, "--batch-size", 4))
    for want in (f"manifest {manifest.resolve()} -> {other.resolve()}", "steps 4 -> 6", "lr 0.0002 -> 0.001",
                 "batch_size 2 -> 4", "--allow-changed-config", str(run)):
        assert want in line, (want, line)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before, "a refused resume changed the run folder (config.json overwritten?)"
    record("run_folder_faults", "resume with changed settings")


def test_resume_refuses_a_setting_newer_than_the_run(manifest, halfway, tmp_path):
    """A run made before a setting existed (its config.json lacks the key) used that setting's default:
    resuming with another value is a change like any other."""
    run = _copy(halfway, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg.pop("shift") == 0.0
    (run / "config.json").write_text(json.dumps(cfg))
    line = one_line(invoke(*_args(manifest, tmp_path / "runs", "r", 4), "--resume", "--shift", 0.05))
    assert "shift 0.0 -> 0.05" in line, line


def test_resume_allows_runtime_changes_and_explicit_setting_changes(manifest, halfway, tmp_path, caplog):
    run = _copy(halfway, tmp_path)
    # runtime-only: intervals, stop_after, workers, device are free to change
    mtrain(*_args(manifest, tmp_path / "runs", "r", 4), "--resume", "--log-every", 3, "--sample-every", 7,
           "--stop-after", 3, "--workers", 0)
    mtrain(*_args(manifest, tmp_path / "runs", "r", 5), "--resume", "--allow-changed-config")
    assert json.loads((run / "config.json").read_text())["steps"] == 5
    assert any("steps 4 -> 5" in r.getMessage() for r in caplog.records)
    with safe_open(str(run / "last.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()[META_KEY])["step"] == 5


# -- 3. metrics.csv after a kill --------------------------------------------------------------

@pytest.mark.parametrize("left", ["", "step,loss,lr,samples_per_s,val_psnr_y\r\n1,0.5,0.0002,1.0,\r\n"],
                         ids=["empty (kill before the first flush)", "rows (kill before the first checkpoint)"])
def test_metrics_after_a_kill_before_the_first_checkpoint(manifest, tmp_path, left):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(left, newline="")  # what the killed run left; no checkpoint
    mtrain(*_args(manifest, tmp_path / "runs", "r", 2))
    assert steps_logged(run) == [1, 2]
    record("run_folder_faults", f"metrics after kill before checkpoint ({'rows' if left else 'empty'})")


def test_metrics_after_a_kill_after_a_checkpoint(manifest, halfway, tmp_path):
    run = _copy(halfway, tmp_path)
    assert steps_logged(run) == [1, 2]
    with open(run / "metrics.csv", "a", newline="") as fh:  # logged after the step-2 checkpoint, then killed
        fh.write("3,0.5,0.0002,1.0,\r\n")
    mtrain(*_args(manifest, tmp_path / "runs", "r", 4), "--resume")
    assert steps_logged(run) == [1, 2, 3, 4]
    assert not list(run.glob(".tmp-*")) and not list(run.glob("*.tmp"))
    record("run_folder_faults", "metrics after kill after checkpoint")


# -- 4, 5. damaged and forged checkpoints --------------------------------------------------------

def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()[META_KEY])
    return meta, load_file(str(path))


def _forge(path: Path, meta=None, tensors=None, raw: str | None = None) -> None:
    m, t = _read(path)
    save_file(tensors if tensors is not None else t, str(path),
              metadata={META_KEY: raw if raw is not None else json.dumps(meta if meta is not None else m)})


def _first_model_weight(t: dict) -> str:
    return next(k for k, v in t.items() if k.startswith("model.") and v.is_floating_point() and v.numel() > 1)


def _nan(t):
    k = _first_model_weight(t)
    t[k] = t[k].clone().fill_(float("nan"))
    return t


def _int8(t):
    k = _first_model_weight(t)
    t[k] = t[k].to(torch.int8)
    return t


FORGED = {  # name: (forge(path), what the line must say)
    "metadata not JSON": (lambda p: _forge(p, raw="{not json"), "not a JSON object"),
    "metadata a JSON list": (lambda p: _forge(p, raw="[1, 2]"), "not a JSON object"),
    "model_kwargs of petabytes": (lambda p: _forge(p, meta=_read(p)[0] | {"model_kwargs": {"embed_dim": 10**12}}),
                                  "do not fit"),
    "model_kwargs of another width": (lambda p: _forge(p, meta=_read(p)[0] | {"model_kwargs": {"embed_dim": 24}}),
                                      "do not fit"),
    "NaN weights": (lambda p: _forge(p, tensors=_nan(_read(p)[1])), "NaN"),
    "int8 weights": (lambda p: _forge(p, tensors=_int8(_read(p)[1])), "torch.int8"),
}


@pytest.mark.parametrize("name", list(FORGED))
def test_export_refuses_damaged_checkpoint(halfway, tmp_path, name):
    """export (as eval and infer) rebuilds the model the metadata describes and loads its weights."""
    ck = tmp_path / "last.safetensors"
    shutil.copyfile(halfway / "last.safetensors", ck)
    forge, want = FORGED[name]
    forge(ck)
    line = one_line(invoke("export", "--checkpoint", ck, "--out", tmp_path / "w.safetensors"))
    assert str(ck) in line and want in line, line
    if "weights" in name:
        assert _first_model_weight(_read(halfway / "last.safetensors")[1]) in line, line
    assert not (tmp_path / "w.safetensors").exists()
    record("checkpoint_faults", name)


def _bad_rng(p):
    _, t = _read(p)
    _forge(p, tensors=t | {"rng.torch": torch.zeros(3, dtype=torch.uint8)})


def _bad_python_rng(p):
    _forge(p, meta=_read(p)[0] | {"python_rng": "x"})


def _bad_optim_shape(p):
    _, t = _read(p)
    k = next(k for k in t if k.startswith("optim.") and k.endswith("exp_avg"))
    _forge(p, tensors=t | {k: torch.zeros(3)})


def _bad_optim_nan(p):
    _, t = _read(p)
    k = next(k for k in t if k.startswith("optim.") and k.endswith("exp_avg_sq"))
    _forge(p, tensors=t | {k: torch.full_like(t[k], float("nan"))})


def _no_optim_groups(p):
    m, _ = _read(p)
    del m["optim_param_groups"]
    _forge(p, meta=m)


RESUME_FORGED = {
    "rng state of 3 bytes": (_bad_rng, "damaged RNG state"),
    "python rng not a state": (_bad_python_rng, "damaged RNG state"),
    "optimizer state of another shape": (_bad_optim_shape, "damaged optimizer state"),
    "optimizer state NaN": (_bad_optim_nan, "damaged optimizer state"),
    "optimizer param groups missing": (_no_optim_groups, "damaged optimizer state"),
    "NaN weights (resume)": (lambda p: _forge(p, tensors=_nan(_read(p)[1])), "NaN"),
    "int8 weights (resume)": (lambda p: _forge(p, tensors=_int8(_read(p)[1])), "torch.int8"),
    "metadata not JSON (resume)": (lambda p: _forge(p, raw="{not json"), "not a JSON object"),
}


@pytest.mark.parametrize("name", list(RESUME_FORGED))
def test_resume_refuses_damaged_checkpoint(manifest, halfway, tmp_path, name):
    run = _copy(halfway, tmp_path)
    forge, want = RESUME_FORGED[name]
    forge(run / "last.safetensors")
    line = one_line(invoke(*_args(manifest, tmp_path / "runs", "r", 4), "--resume"))
    assert str(run / "last.safetensors") in line and want in line, line
    assert "another checkpoint" in line or "use another one" in line, line
    record("checkpoint_faults", name)
