"""Resume after SIGKILL: a stage killed mid-run and rerun ends with the same files
as an uninterrupted run, and leaves no temp file behind."""
from __future__ import annotations

import json

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rb_helpers import invoke, make_faces

pytestmark = pytest.mark.slow

# `python -m refbuild` with every rename into place slowed by 50 ms, like a slow
# disk: an unslowed --aligned run of 41 images ends in ~0.3 s, so a kill would race
# the end of the run. The sleep sits between writing a temp file and renaming it,
# so the kill usually lands while a temp file exists, the worst moment.
SLOW_MAIN = (
    "import os, sys, time; _replace = os.replace\n"
    "def slow(a, b): time.sleep(0.05); return _replace(a, b)\n"
    "os.replace = slow; sys.argv[0] = 'refbuild'\n"
    "from refbuild.cli import main; main()\n"
)


def _kill_after(args: list, done_glob: Path, n_done: int, cwd: Path, timeout: float = 90) -> int:
    """Run refbuild ARGS (slowed) and SIGKILL it once `n_done` files match `done_glob`.
    Returns how many matched at the kill."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MAIN, *map(str, args)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            n = len(list(done_glob.parent.glob(done_glob.name))) if done_glob.parent.is_dir() else 0
            if n >= n_done:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return n
            if proc.poll() is not None:
                pytest.fail(f"refbuild {args[0]} ended (exit {proc.returncode}) before it could be killed:\n"
                            f"{proc.stderr.read().decode()}")
            time.sleep(0.01)
        pytest.fail(f"refbuild {args[0]}: fewer than {n_done} {done_glob.name} after {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _no_temps(*roots: Path) -> None:
    left = [p for r in roots for p in r.rglob(".tmp-*")]
    assert not left, f"temp files left behind: {left}"


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs between resumed and clean runs"


def _same_crops(a: Path, b: Path) -> None:
    ca = sorted(p.relative_to(a).as_posix() for p in (a / "crops").rglob("*") if p.is_file())
    cb = sorted(p.relative_to(b).as_posix() for p in (b / "crops").rglob("*") if p.is_file())
    assert ca == cb
    for rel in ca:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _detect_args(src: Path, lib: Path) -> list:
    return ["detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "--shard-size", 4, "-q"]


def test_detect_resume_after_kill(tmp_path):
    src = tmp_path / "src"
    make_faces(src)  # 41 images: 11 shards of 4
    lib, ref = tmp_path / "killed", tmp_path / "clean"
    n = _kill_after(_detect_args(src, lib), lib / ".work" / "detect" / "shard-*.done", 3, tmp_path)
    assert n < 11, "the run finished before the kill"
    assert not (lib / "faces.parquet").exists()
    invoke(*_detect_args(src, lib))
    invoke(*_detect_args(src, ref))
    # faces.parquet's metadata holds src_root, the same folder for both runs: whole files compare
    _same_files(lib, ref, ["faces.parquet", "rejects.parquet"])
    _same_crops(lib, ref)
    _no_temps(lib)


@pytest.mark.parametrize("backbone", [["pixels"], ["dlib", "--weights", "random"]])
def test_embed_resume_after_kill(tmp_path, backbone):
    src = tmp_path / "src"
    make_faces(src)
    lib, ref = tmp_path / "killed", tmp_path / "clean"
    for d in (lib, ref):
        invoke(*_detect_args(src, d))
    args = ["embed", "--backbone", *backbone, "--views", "hr,lr", "--shard-size", 4, "--device", "cpu", "-q"]
    n = _kill_after([args[0], lib, *args[1:]], lib / ".work" / "embed-hr" / "shard-*.done", 3, tmp_path)
    assert n < 11, "the run finished before the kill"
    invoke(args[0], lib, *args[1:])
    invoke(args[0], ref, *args[1:])
    _same_files(lib, ref, ["features.parquet", "features_lr.parquet"])
    _no_temps(lib)


def test_pair_resume_after_kill(tmp_path):
    # pair's shards are 2048 queries (not an option), so 41 queries make one shard:
    # the kill lands after that shard's done-marker, while pairs.parquet and the
    # manifests are being written.
    src = tmp_path / "src"
    make_faces(src)
    lib, ref = tmp_path / "killed", tmp_path / "clean"
    for d in (lib, ref):
        invoke(*_detect_args(src, d))
        invoke("embed", d, "--backbone", "pixels", "--device", "cpu", "-q")
        invoke("split", d, "-q")
    mk, mr = tmp_path / "m_killed", tmp_path / "m_clean"
    _kill_after(["pair", lib, "-m", 2, "--manifest-dir", mk, "--name", "x", "--device", "cpu", "-q"],
                lib / ".work" / "pair" / "shard-*.done", 1, tmp_path)
    invoke("pair", lib, "-m", 2, "--manifest-dir", mk, "--name", "x", "--device", "cpu", "-q")
    invoke("pair", ref, "-m", 2, "--manifest-dir", mr, "--name", "x", "--device", "cpu", "-q")
    _same_files(lib, ref, ["pairs.parquet", "splits.parquet"])  # pairs metadata says "self", no paths
    # Manifests record hr_root/ref_root, the absolute library paths, which differ
    # between the two folders by design: compare the tables and the rest of the metadata.
    for s in ("train", "val", "test"):
        a, b = pq.read_table(mk / "x" / f"{s}.parquet"), pq.read_table(mr / "x" / f"{s}.parquet")
        assert a.equals(b), s
        ma, mb = dict(a.schema.metadata), dict(b.schema.metadata)
        assert ma.pop(b"hr_root") == str(lib.resolve()).encode() and ma.pop(b"ref_root") == str(lib.resolve()).encode()
        assert mb.pop(b"hr_root") == str(ref.resolve()).encode() and mb.pop(b"ref_root") == str(ref.resolve()).encode()
        for m_, d, md in ((ma, lib, mk), (mb, ref, mr)):  # input fingerprints and the rerun command: absolute too
            assert all(k.startswith(str(d.resolve())) for k in json.loads(m_.pop(b"inputs")))
            assert str(md.resolve()).encode() in m_.pop(b"command")
        assert ma == mb, s
    _no_temps(lib, mk)
    invoke("audit", lib)


def test_kill_then_rerun_with_other_settings_is_refused(tmp_path):
    src = tmp_path / "src"
    make_faces(src)
    lib = tmp_path / "lib"
    _kill_after(_detect_args(src, lib), lib / ".work" / "detect" / "shard-*.done", 2, tmp_path)
    res = invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 48, "--shard-size", 4, "-q", ok=False)
    assert res.exit_code == 1 and "--overwrite" in res.output
    invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 48, "--shard-size", 4, "--overwrite", "-q")
    assert len(pq.read_table(lib / "faces.parquet")) == 41
    _no_temps(lib)
    shutil.rmtree(lib)
