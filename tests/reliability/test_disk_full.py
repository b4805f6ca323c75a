"""Disk full: a stage that runs out of space (or of inodes) fails with one clear
line and leaves the library as it was; after space is freed, a rerun ends
byte-identical to a run that never failed.

Two ways: a real small tmpfs mounted over the library's folder (needs root and
mount; skipped, saying so, where it is not permitted), and a simulated ENOSPC
raised at seeded random writes (runs everywhere).

"As it was": every file that existed before the stage is there with the same
bytes, no temp file is left, and the only new files are the stage's resumable
progress (work shards under .work/, detect's crops): no final output appears.
"""
from __future__ import annotations

import errno
import math
import os
import random
import subprocess
import tempfile
from pathlib import Path

import pytest

from rb_helpers import invoke, one_line_error
from rel_helpers import (STAGES, Reference, assert_no_temps, assert_same, build_reference, record, stage_args)

pytestmark = pytest.mark.slow

PAGE = 4096
PROGRESS = ("lib/.work/", "lib/crops/")  # where a failed stage may leave resumable progress


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    return build_reference(tmp_path_factory.mktemp("full"))


def assert_as_it_was(before: dict[str, bytes], now: dict[str, bytes], what: str) -> None:
    changed = [k for k in before if now.get(k) != before[k]]
    assert not changed, f"{what}: files changed or removed: {changed[:8]}"
    new = [k for k in now if k not in before and not k.startswith(PROGRESS)]
    assert not new, f"{what}: new final outputs after a failed stage: {new}"


def _nospace(res, what: str) -> str:
    line = one_line_error(res)
    assert "No space left on device" in line and "free space" in line, f"{what}: {line}"
    return line


# -- a real, small file system ----------------------------------------------------------

def _mount(where: Path, opts: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True, capture_output=True, text=True)


def _umount(where: Path) -> None:
    import gc

    gc.collect()  # a file a failed writer left open (kept alive by a traceback) makes the mount busy
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("mount-probe")
    try:
        _mount(probe, "size=64k")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        msg = getattr(e, "stderr", "") or str(e)
        pytest.skip(f"cannot mount a tmpfs here ({msg.strip()}); the simulated ENOSPC tests still run")
    _umount(probe)


def _used_pages(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_blocks - st.f_bfree


def _pages(snap: dict[str, bytes]) -> int:
    return sum(math.ceil(len(v) / PAGE) for v in snap.values())


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("room", ["none", "half", "inodes"])
def test_real_small_filesystem(ref, can_mount, stage, room):
    """The library's folder is a tmpfs holding exactly the earlier stages' files plus
    `room`: no free page, half the pages the stage needs, or no free inode."""
    for d in (ref.lib, ref.man):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    ref.vol.mkdir(exist_ok=True)
    _mount(ref.vol, "size=64m")
    try:
        ref.reset_to(ref.before[stage])
        used = _used_pages(ref.vol)
        if room == "inodes":
            st = os.statvfs(ref.vol)
            inodes = st.f_files - st.f_ffree + 1  # +1: the mount's root
            _mount_opts = f"remount,size=64m,nr_inodes={inodes}"
        else:
            need = _pages(ref.after[stage]) - _pages(ref.before[stage])
            _mount_opts = f"remount,size={max(1, used + (need // 2 if room == 'half' else 0)) * PAGE}"  # size=0: unlimited
        subprocess.run(["mount", "-o", _mount_opts, str(ref.vol)], check=True, capture_output=True)
        before = ref.now()
        res = invoke(*stage_args(stage, ref.base), ok=False)
        line = _nospace(res, f"{stage} with room={room}")
        assert_as_it_was(before, ref.now(), f"{stage} with room={room}")
        assert_no_temps(ref.lib, ref.man)
        # space is freed: the same command finishes, byte-identical to a run that never failed
        subprocess.run(["mount", "-o", "remount,size=64m,nr_inodes=100000", str(ref.vol)], check=True, capture_output=True)
        invoke(*stage_args(stage, ref.base))
        assert_same(ref.now(), ref.after[stage], f"{stage} rerun after ENOSPC")
        assert_no_temps(ref.lib, ref.man)
        record("disk_full:tmpfs", (stage, room))
        record("disk_full", ("tmpfs", stage, room, line.split(":")[1].strip()))
    finally:
        _umount(ref.vol)


# -- a simulated ENOSPC, at seeded random writes ------------------------------------------

SIMULATED_PER_STAGE = 4


class _Full:
    """Raise ENOSPC at the `at`-th call of a wrapped write function."""

    def __init__(self, real, at: int):
        self.real, self.at, self.n = real, at, 0

    def __call__(self, *a, **kw):
        self.n += 1
        if self.n == self.at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(*a, **kw)


@pytest.mark.parametrize("stage", STAGES)
def test_simulated_enospc_at_random_writes(ref, stage, monkeypatch):
    """ENOSPC while writing the k-th file (raised by fsync, as on a file system that
    allocates late) or while creating it (no free inode): clear error, library as it
    was, and the rerun completes identically."""
    rng = random.Random(f"enospc-{stage}")
    n = ref.writes[stage]
    points = sorted({(rng.randint(1, n), rng.choice(["fsync", "mkstemp"])) for _ in range(SIMULATED_PER_STAGE)})
    for at, where in points:
        ref.reset_to(ref.before[stage])
        before = ref.now()
        with monkeypatch.context() as m:
            if where == "fsync":
                m.setattr(os, "fsync", _Full(os.fsync, at))
            else:
                m.setattr(tempfile, "mkstemp", _Full(tempfile.mkstemp, at))
            res = invoke(*stage_args(stage, ref.base), ok=False)
        _nospace(res, f"{stage}: ENOSPC at {where} #{at}")
        assert_as_it_was(before, ref.now(), f"{stage}: ENOSPC at {where} #{at}")
        assert_no_temps(ref.lib, ref.man)
        invoke(*stage_args(stage, ref.base))
        assert_same(ref.now(), ref.after[stage], f"{stage} rerun after simulated ENOSPC at {where} #{at}")
        record("disk_full:simulated", (stage, at, where))
        record("disk_full", ("simulated", stage, at, where))


def test_library_already_full_refuses_before_touching_anything(ref, monkeypatch):
    """Even the lock file cannot be written: one clear line, nothing changed."""
    ref.reset_to(ref.before["split"])
    before = ref.now()
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/.lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    res = invoke(*stage_args("split", ref.base), ok=False)
    monkeypatch.undo()
    assert ".lock" in _nospace(res, "lock write")
    assert_same(ref.now(), before, "library after a refused split")
    record("disk_full", ("simulated", "lock file"))


@pytest.mark.parametrize("stage,other", [("split", ["--seed", 7]), ("pair", ["-m", 3]), ("embed", ["--grid", 8])])
def test_rerun_with_other_settings_on_a_full_disk(ref, stage, other, monkeypatch):
    """A finished library, rerun with other settings on a disk that fills at the last
    output (the config JSON): the old outputs stay, together and unchanged (never half
    old, half new)."""
    ref.reset_to(ref.after["pair"])
    before = ref.now()
    args = stage_args(stage, ref.base) + list(other) + ["--overwrite"]  # other settings are refused without it
    real = os.fsync

    def full_at_config(fd):  # the config JSON is the last file of the stage's outputs
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".tmp-{stage}.config.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_at_config)
        res = invoke(*args, ok=False)
    _nospace(res, f"{stage} {other} rerun")
    now = ref.now()
    finals = [k for k in before if not k.startswith(PROGRESS)]
    assert_same({k: now.get(k) for k in finals}, {k: before[k] for k in finals}, f"{stage} {other}: final outputs")
    assert_no_temps(ref.lib, ref.man)
    record("disk_full", ("simulated", "rerun with other settings", stage))


def test_detect_rerun_with_other_crop_size_on_a_full_disk(ref, monkeypatch):
    ref.reset_to(ref.after["detect"])
    before = ref.now()
    args = [a if a != 32 else 48 for a in stage_args("detect", ref.base)] + ["--overwrite"]
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _Full(os.fsync, 12))
        _nospace(invoke(*args, ok=False), "detect --crop-size 48")
    now = ref.now()
    changed = [k for k in before if k.startswith("lib/crops/") and now.get(k) != before[k]]
    assert not changed, f"{len(changed)} crops rewritten at the new size while faces.parquet is the old run's"
