"""Two runs on one library at once, with real processes: while one stage holds the
library, every other writing stage refuses with a clear message and changes
nothing; the holder then finishes with the same bytes as a run alone."""
from __future__ import annotations

import json
import os
import signal

import pytest

from rb_helpers import build, invoke
from rel_helpers import assert_no_temps, assert_same, record, refbuild_proc, snapshot, start_paused

pytestmark = pytest.mark.slow


def _stage_args(b, stage: str) -> list:
    return {
        "detect": ["detect", b.src, "--out", b.lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q"],
        "embed": ["embed", b.lib, "--backbone", "pixels", "--views", "hr,lr", "--device", "cpu", "-q"],
        "split": ["split", b.lib, "-q"],
        "pair": ["pair", b.lib, "-m", 2, "--manifest-dir", b.manifests.parent, "--device", "cpu", "-q"],
    }[stage]


@pytest.fixture
def lib(tmp_path):
    b = build(tmp_path)  # the same options as _stage_args
    return b


def test_second_run_refused_while_first_holds_the_lock(lib, tmp_path):
    before = snapshot(lib.lib, lib.manifests)
    holder = start_paused(_stage_args(lib, "embed") + ["--overwrite"], tmp_path, tmp_path / "gate")
    try:
        lock_text = (lib.lib / ".lock").read_text()
        assert f"refbuild embed (pid {holder.pid})" == lock_text
        # every writing stage, as a real process, at the same time as the holder
        others = {s: refbuild_proc(_stage_args(lib, s), tmp_path) for s in ("detect", "embed", "split", "pair")}
        outs = {s: p.communicate(timeout=120)[0] for s, p in others.items()}
        assert holder.poll() is None, "the holder ended before the others ran: nothing was tested"
        for s, p in others.items():
            out = " ".join(outs[s].split())  # rich may wrap the line
            assert p.returncode == 1, f"{s}: exit {p.returncode}\n{outs[s]}"
            assert "Traceback" not in out
            assert f"library is locked by refbuild embed (pid {holder.pid})" in out, out
            assert "wait for it to finish" in out
            record("concurrent_runs_refused", s)
        # readers need no lock: query works while the holder writes
        res = invoke("query", lib.lib, "SELECT count(*) AS n FROM faces", "--format", "csv")
        assert res.output.splitlines()[1] == "41"
    finally:
        (tmp_path / "gate" / "release").touch()
        out = holder.communicate(timeout=120)[0]
    assert holder.returncode == 0, out
    after = snapshot(lib.lib, lib.manifests)
    cfg = "lib/embed.config.json"  # records the holder's --overwrite; every other byte is as before
    assert json.loads(after.pop(cfg)) == json.loads(before.pop(cfg)) | {"overwrite": True}
    assert_same(after, before, "library after the holder finished")
    assert_no_temps(lib.lib, lib.manifests)
    invoke("audit", lib.lib)


def test_lock_of_a_killed_holder_is_released(lib, tmp_path):
    """flock dies with its process: after kill -9 of the holder, the next run proceeds
    (no stale lock to delete by hand) and finishes the interrupted stage."""
    before = snapshot(lib.lib, lib.manifests)
    holder = start_paused(_stage_args(lib, "split"), tmp_path, tmp_path / "gate")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    p = refbuild_proc(_stage_args(lib, "split"), tmp_path)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert_same(snapshot(lib.lib, lib.manifests), before, "library after the killed split was rerun")
    assert_no_temps(lib.lib)


def test_two_detects_started_together(tmp_path):
    """Two identical detects launched at the same moment on a new library: one may
    be refused by the lock, none fails otherwise, and the result is a clean library."""
    from rb_helpers import make_faces

    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src)
    args = ["detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "--shard-size", 2, "-q"]
    procs = [refbuild_proc(args, tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 1]), (codes, outs)
    for p, out in zip(procs, outs):
        if p.returncode == 1:
            assert "library is locked by refbuild detect" in " ".join(out.split()), out
    clean = tmp_path / "clean"
    lib2 = clean / "lib"
    invoke("detect", src, "--out", lib2, "--aligned", "--identity-from-folder", "--crop-size", 32, "--shard-size", 2, "-q")
    a, b = snapshot(lib), snapshot(lib2)
    a = {k: v for k, v in a.items() if not k.endswith("detect.config.json")}  # holds the library path
    b = {k: v for k, v in b.items() if not k.endswith("detect.config.json")}
    assert_same(a, b, "library written by two racing detects")
    assert_no_temps(lib)
