"""`model train` against tampered manifests and damaged checkpoints: a clear
one-line error, never a traceback, never unpickling; `--resume` after a kill
in the middle of a checkpoint save continues from the last good checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rb_helpers import build
from rel_helpers import one_line, record
from tampering import TAMPERS, clone

model_cli = pytest.importorskip("model.cli", reason="model package not importable")

TINY = "msrnet_tiny_x4"  # 16 -> 64: the library's crops are 64 px


def mtrain(*args, ok: bool = True):
    res = CliRunner().invoke(model_cli.app, ["train", *map(str, args)])
    if ok:
        assert res.exit_code == 0, f"model train {args} exited {res.exit_code}:\n{res.output}\n{res.exception!r}"
    return res


def _args(manifest: Path, runs: Path, name: str = "r", steps: int = 1, model: str = TINY) -> list:
    return ["--manifest", manifest, "--model", model, "--name", name, "--runs-dir", runs, "--steps", steps,
            "--batch-size", 2, "--device", "cpu", "--ckpt-every", 1, "--log-every", 1, "--sample-every", 1000,
            "--allow-enlarged"]  # the library's 64 px crops are cut from 48 px photos: not what these tests are about


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    b = build(tmp_path_factory.mktemp("mpristine"), extra_detect=("--crop-size", 64))
    return b.lib, b.manifests


def test_clean_manifest_trains(pristine, tmp_path):
    _, man = clone(*pristine, tmp_path)
    mtrain(*_args(man / "train.parquet", tmp_path / "runs"))
    assert (tmp_path / "runs" / "r" / "last.safetensors").is_file()


# what `model train` must say for each tampered manifest the issue lists
MODEL_REFUSES = {
    "manifest ref path to a missing file": "missing",
    "manifest hr file deleted": "missing",
    "manifest identity in two splits": "identity",
    "manifest wrong schema version": "version 2",
    "manifest of another schema": "schema is 'splits'",
    "manifest path with ..": "without '..'",
    "manifest absolute path": "without '..'",
    "manifest truncated": "not a readable Parquet file",
    "manifest column dropped": "columns do not match",
    "manifest null reference list": "ref_paths",
}


MODEL_BUGS: dict[str, str] = {}  # known model bugs: strict xfail so a test turns red-to-green when fixed


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=MODEL_BUGS[n]))
                                  if n in MODEL_BUGS else n for n in MODEL_REFUSES])
def test_model_train_refuses_tampered_manifest(pristine, tmp_path, name):
    tamper, _, on_manifest = TAMPERS[name]
    assert on_manifest
    lib, man = clone(*pristine, tmp_path)
    tamper(lib, man)
    res = mtrain(*_args(man / "train.parquet", tmp_path / "runs"), "--val-manifest", man / "val.parquet", ok=False)
    line = one_line(res)
    assert MODEL_REFUSES[name] in line, f"{name}: {line}"
    assert not (tmp_path / "runs" / "r" / "last.safetensors").exists()
    record("tamperings:model_train", name)


# -- checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(pristine, tmp_path_factory):
    """One finished 1-step run of TINY."""
    tmp = tmp_path_factory.mktemp("ckpt")
    _, man = clone(*pristine, tmp)
    mtrain(*_args(man / "train.parquet", tmp / "runs", name="x4"))
    return man / "train.parquet", tmp / "runs"


def _resume(trained, tmp_path, last_bytes: bytes):
    manifest, runs = trained
    run = tmp_path / "runs" / "x4"
    shutil.copytree(runs / "x4", run)
    (run / "last.safetensors").write_bytes(last_bytes)
    return mtrain(*_args(manifest, tmp_path / "runs", name="x4", steps=2), "--resume", ok=False)


def _forged(trained, tmp_path, model_name: str | None = None, tensors_of: str | None = None) -> bytes:
    """The run's checkpoint with its metadata's model name and/or its model tensors replaced."""
    from model.registry import create_model

    src = trained[1] / "x4" / "last.safetensors"
    with safe_open(str(src), framework="pt") as fh:
        ck = json.loads(fh.metadata()["msrface.checkpoint"])
    tensors = load_file(str(src))
    if model_name:
        ck["model"] = model_name
    if tensors_of:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model.")}
        tensors |= {f"model.{k}": v.contiguous() for k, v in create_model(tensors_of).state_dict().items()}
    out = tmp_path / "forged.safetensors"
    save_file(tensors, str(out), metadata={"msrface.checkpoint": json.dumps(ck)})
    return out.read_bytes()


def test_truncated_checkpoint(trained, tmp_path):
    data = (trained[1] / "x4" / "last.safetensors").read_bytes()
    line = one_line(_resume(trained, tmp_path, data[: len(data) // 2]))
    assert "truncated or not a safetensors file" in line, line
    record("checkpoint_faults", "truncated")


def test_checkpoint_of_another_architecture(trained, tmp_path):
    line = one_line(_resume(trained, tmp_path, _forged(trained, tmp_path, model_name="msrnet_x16")))
    assert "msrnet_x16" in line and TINY in line, line
    record("checkpoint_faults", "other architecture (named)")


def test_checkpoint_with_foreign_weights_under_our_name(trained, tmp_path):
    """Metadata says TINY, the tensors are the paper-width model's: the strict load says so."""
    line = one_line(_resume(trained, tmp_path, _forged(trained, tmp_path, tensors_of="msrnet_x4")))
    assert "do not fit" in line and "other architecture" in line, line
    record("checkpoint_faults", "other architecture (disguised)")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_is_never_unpickled(trained, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker)}, evil)
    line = one_line(_resume(trained, tmp_path, evil.read_bytes()))
    assert "not a safetensors file" in line, line
    assert not marker.exists(), "loading the checkpoint ran code"
    record("checkpoint_faults", "pickle payload")


KILL_SAVE = r"""
import os, signal, sys
AT = int(os.environ["KILL_AT_SAVE"])
import model.checkpoint as c
_save, n = c.save_file, [0]
def save_file(tensors, path, metadata=None):
    n[0] += 1
    _save(tensors, path, metadata=metadata)
    if n[0] == AT:  # half the file is on disk when the process dies
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
c.save_file = save_file
sys.argv[0] = "model"
from model.cli import main
main()
"""


@pytest.mark.slow
def test_resume_after_kill_mid_save(pristine, tmp_path):
    """Killed while writing its 3rd checkpoint file, the run resumes from the last
    good one and ends with the same weights as a run never killed."""
    _, man = clone(*pristine, tmp_path)
    args = ["train", *map(str, _args(man / "train.parquet", tmp_path / "runs", name="k", steps=3))]
    # the child trains with this process's thread count: fp32 results depend on it
    env = dict(os.environ, KILL_AT_SAVE="3", KMP_DUPLICATE_LIB_OK="TRUE", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", KILL_SAVE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "runs" / "k"
    with safe_open(str(run / "last.safetensors"), framework="pt") as fh:
        step_before = json.loads(fh.metadata()["msrface.checkpoint"])["step"]
    assert 1 <= step_before < 3
    mtrain(*_args(man / "train.parquet", tmp_path / "runs", name="k", steps=3), "--resume")
    mtrain(*_args(man / "train.parquet", tmp_path / "runs", name="clean", steps=3))
    a, b = load_file(str(run / "last.safetensors")), load_file(str(tmp_path / "runs" / "clean" / "last.safetensors"))
    with safe_open(str(run / "last.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["msrface.checkpoint"])["step"] == 3
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"
    record("kill_points", ("model train", "checkpoint save 3", "mid-write"))
    record("checkpoint_faults", "kill mid-save, resume")
