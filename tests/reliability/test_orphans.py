"""Orphans a killed run leaves behind (issue 15).

- A multi-worker stage killed (kill -9 or SIGTERM of the parent only) takes its
  worker processes down with it, so none keeps the library lock (an inherited fd)
  and a rerun proceeds, with a one-line notice that it took the lock over.
- A lock still held by the workers of a dead holder is waited for a moment, then
  refused with a line naming the processes to kill.
- `refbuild report` killed mid-thumbnail: the rerun removes the temp files it left.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rb_helpers import invoke, make_faces, one_line_error
from rel_helpers import assert_no_temps, assert_same, record, refbuild_proc, run_killed, snapshot, temps

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DETECT = ["--aligned", "--identity-from-folder", "--crop-size", 32, "--shard-size", 4, "-q"]

# `refbuild ARGS` whose (forked) workers each announce themselves in $RB_BUSY and then
# hang in their first shard, so the test can kill the parent while they are mid-work
BUSY_MAIN = r"""
import os, sys, time
from pathlib import Path
from refbuild import detect
def busy(self, task):
    Path(os.environ["RB_BUSY"], str(os.getpid())).touch()
    time.sleep(60)
detect.DetectWorker.__call__ = busy
sys.argv[0] = "refbuild"
from refbuild.cli import main
main()
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie waiting for init to reap it has let go of everything


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _files(lib: Path) -> dict[str, bytes]:
    """The library's files by relative path, but the config (it names the library path)."""
    return {k.split("/", 1)[1]: v for k, v in snapshot(lib).items() if not k.endswith("detect.config.json")}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("orphans") / "src"
    make_faces(s)  # 41 images
    return s


@pytest.fixture(scope="module")
def clean(src) -> dict[str, bytes]:
    """What detect writes when nothing goes wrong."""
    lib = src.parent / "clean"
    invoke("detect", src, "--out", lib, *DETECT)
    return _files(lib)


@pytest.mark.skipif(sys.platform != "linux", reason="fork workers, /proc and pgrep")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_killed_parent_takes_its_workers_down(src, clean, tmp_path, sig):
    lib, busy = tmp_path / "lib", tmp_path / "busy"
    busy.mkdir()
    args = ["detect", src, "--out", lib, "--workers", 2, *DETECT]
    env = dict(os.environ, RB_BUSY=str(busy), KMP_DUPLICATE_LIB_OK="TRUE")
    proc = subprocess.Popen([sys.executable, "-c", BUSY_MAIN, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: len(list(busy.iterdir())) == 2 or proc.poll() is not None, 120, "workers never started")
        assert proc.poll() is None, proc.stdout.read()
        workers = _children(proc.pid)
        assert {int(p.name) for p in busy.iterdir()} <= set(workers), workers
        os.kill(proc.pid, sig)  # the parent only, as `kill PID` from a shell
        proc.wait(timeout=30)
        assert proc.returncode == -sig
        deadline = time.monotonic() + 10
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [p for p in workers if not _gone(p)]
        assert not alive, f"workers {alive} outlived their parent (killed by {sig.name})"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started: orphans of a failed run
        except ProcessLookupError:
            pass
        proc.stdout.close()
    rerun = refbuild_proc(["detect", src, "--out", lib, *DETECT], ROOT)
    out = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, out
    notice = [ln for ln in out.splitlines() if ln.startswith("notice:")]
    assert len(notice) == 1 and f"refbuild detect (pid {proc.pid})" in notice[0] and ".lock" in notice[0], out
    got = _files(lib)
    assert_same(got, clean, "library rerun after its multi-worker detect was killed")
    assert_no_temps(lib)
    record("orphans", ("detect workers", sig.name))


HOLDER = r"""
import fcntl, os, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
os.ftruncate(f.fileno(), 0)
os.write(f.fileno(), f"refbuild detect (pid {sys.argv[2]})".encode())
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _orphan_holding(lib: Path, seconds: float) -> subprocess.Popen:
    """A process holding LIB/.lock the way an orphaned worker does: its recorded holder is dead."""
    lib.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lib / ".lock"), str(_dead_pid()), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_of_a_dead_holder_is_taken_over_once_its_workers_exit(src, clean, tmp_path):
    lib = tmp_path / "lib"
    holder = _orphan_holding(lib, 1.0)
    try:
        res = invoke("detect", src, "--out", lib, *DETECT)
    finally:
        holder.kill()
        holder.communicate()
    notice = [ln for ln in res.output.splitlines() if ln.startswith("notice:")]
    assert len(notice) == 1 and "taking over" in notice[0] and str(lib / ".lock") in notice[0], res.output
    got = _files(lib)
    assert_same(got, clean, "library of a run that waited for a dead holder's workers")
    res = invoke("detect", src, "--out", lib, *DETECT)  # a clean release leaves nothing to take over
    assert "notice:" not in res.output, res.output
    record("orphans", "dead holder's lock taken over")


def test_lock_kept_by_orphans_names_them(src, tmp_path, monkeypatch):
    import refbuild.io

    monkeypatch.setattr(refbuild.io, "_ORPHAN_WAIT", 0.5)
    lib = tmp_path / "lib"
    holder = _orphan_holding(lib, 60)
    try:
        line = one_line_error(invoke("detect", src, "--out", lib, *DETECT, ok=False))
    finally:
        holder.kill()
        holder.communicate()
    assert str(lib / ".lock") in line and "no longer running" in line and "kill" in line, line
    if sys.platform == "linux":
        assert str(holder.pid) in line, line
    assert not (lib / "faces.parquet").exists()
    record("orphans", "lock kept by orphans")


@pytest.mark.skipif(not hasattr(os, "getppid"), reason="needs os.getppid")
def test_fallback_watch_ends_a_worker_whose_parent_died(tmp_path):
    """Where prctl is missing, a thread polling os.getppid() ends the worker instead."""
    mid = r"""
import subprocess, sys, time
w = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(w.pid, flush=True)
time.sleep(60)
"""
    worker = r"""
import os, time
from refbuild.runners.local import _watch_parent
_watch_parent(os.getppid())
print("watching", flush=True)
time.sleep(60)
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", mid, worker], stdout=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        wpid = int(p.stdout.readline())
        assert p.stdout.readline().strip() == "watching"
        p.kill()
        p.wait()
        deadline = time.monotonic() + 5
        while not _gone(wpid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(wpid), "the worker outlived its parent"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.stdout.close()


# -- refbuild report ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def lib(clean, src) -> Path:
    return src.parent / "clean"


def test_report_killed_mid_thumbnail_leaves_no_temps_after_rerun(lib, tmp_path):
    out = tmp_path / "report"
    args = ["report", lib, "--out", out, "-q"]
    proc = run_killed(args, 6, "created", ROOT)  # the 1st write is report.json, then thumbnails
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = temps(out)
    assert left, "the kill left no temp file: nothing was tested"
    mine = {"notes.txt": b"mine", "tmp-notes.txt": b"mine too", "thumbs/.tmpnote": b"and this"}
    for rel, data in mine.items():
        (out / rel).write_bytes(data)
    invoke(*args)
    assert_no_temps(out)
    assert all((out / rel).read_bytes() == data for rel, data in mine.items()), "a user file was removed"
    fresh = tmp_path / "fresh"
    invoke("report", lib, "--out", fresh, "-q")
    want = {k.split("/", 1)[1]: v for k, v in snapshot(fresh).items() if not k.endswith("report.json")}
    got = {k.split("/", 1)[1]: v for k, v in snapshot(out).items() if not k.endswith("report.json")}
    for rel in mine:
        got.pop(rel)
    assert_same(got, want, "report rerun after a kill, against a fresh one")
    record("orphans", "report temps")


def test_second_report_into_the_same_folder_is_refused(lib, tmp_path):
    """The rerun removes temp files only while no other report writes the folder."""
    out = tmp_path / "report"
    invoke("report", lib, "--out", out, "-q")
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a report in progress holds it
        (out / "thumbs" / ".tmp-x.jpg.abc").write_bytes(b"")  # that report's temp file
        line = one_line_error(invoke("report", lib, "--out", out, "-q", ok=False))
        assert str(out) in line and "another refbuild report" in line, line
        assert (out / "thumbs" / ".tmp-x.jpg.abc").exists(), "removed the temp file of a report in progress"
    finally:
        os.close(fd)
