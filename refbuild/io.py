"""Atomic writes, hashing and the library lock.

Every file a stage produces is written to a temp file beside its target and
renamed into place, so a kill at any point leaves either the old file or the
new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from data_manifests import check_table, with_metadata
from refbuild.errors import RefbuildError

TMP_PREFIX = ".tmp-"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_error(target: Path, e: OSError) -> RefbuildError:
    return RefbuildError(f"{target}: could not write ({e.strerror or e}); free space or fix permissions and rerun")


_together = threading.local()  # the renames held back by `outputs_together`, if one is open


@contextlib.contextmanager
def outputs_together() -> Iterator[None]:
    """Write a stage's final outputs as one unit: every file of the block goes to its
    temp file (where a full disk fails), and all are renamed into place only when the
    whole block succeeded. A failure renames none, so the library stays as it was."""
    pending: list[tuple[Path, Path]] = []
    outer = getattr(_together, "pending", None)
    _together.pending = pending
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _together.pending = outer
    for i, (tmp, target) in enumerate(pending):
        try:
            os.replace(tmp, target)
        except OSError as e:
            for t, _ in pending[i:]:
                t.unlink(missing_ok=True)
            raise _write_error(target, e) from e


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    try:  # a full disk (no free inode) or a read-only folder fails here already
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
    except OSError as e:
        raise _write_error(target, e) from e
    tmp_path = Path(tmp)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
        finally:
            os.close(fd)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # again: a writer that makes its own file (safetensors) leaves it 0600
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        pending = getattr(_together, "pending", None)
        if pending is not None:
            pending.append((tmp_path, target))  # renamed by outputs_together
        else:
            os.replace(tmp_path, target)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(target, e) from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(target: Path, data: bytes) -> None:
    with _atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: Path, obj: Any) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_table(target: Path, table: pa.Table, schema_name: str, extra_meta: dict[str, str] | None = None) -> None:
    """Check `table` against its schema, stamp it, and write it atomically."""
    check_table(table, schema_name, str(target))
    table = with_metadata(table, schema_name, extra_meta)
    with _atomic_path(target) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def provenance() -> dict[str, Any]:
    """What made an output: msrface version, git commit (in a checkout), Python and torch versions."""
    import platform
    import subprocess

    from refbuild.cliutil import package_version

    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {"msrface_version": package_version(), "git_commit": commit, "python": platform.python_version(),
            "torch": torch_version}


def resolved_config(cfg: Any, **used: Any) -> dict[str, Any]:
    """A stage's config as it truly ran: absolute paths, the values actually used (`used`:
    device, workers, ...) and `provenance()`, for `LIB/<stage>.config.json`."""
    d = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    return d | {"used": used, "provenance": provenance()}


def remove_orphan_temps(folder: Path, recursive: bool = False) -> int:
    """Delete temp files a killed run left behind in `folder` (and below it if `recursive`)."""
    n = 0
    if folder.is_dir():
        for p in (folder.rglob if recursive else folder.glob)(TMP_PREFIX + "*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


_ORPHAN_WAIT = 5.0  # seconds the workers of a killed holder get to exit (they die with it: refbuild/runners/local.py)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        pass
    return True


def _recorded_pid(record: str) -> int | None:
    """The pid in a lock record `refbuild STAGE (pid N)`, None when there is none."""
    tail = record.rpartition("(pid ")[2]
    return int(tail[:-1]) if tail.endswith(")") and tail[:-1].isdigit() else None


def _openers(path: Path) -> list[int]:
    """The other processes holding `path` open (Linux /proc; empty elsewhere)."""
    try:
        st = path.stat()
    except OSError:
        return []
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError, ValueError):
            if os.path.samestat(fd.stat(), st):
                pids.add(int(fd.parts[2]))
    return sorted(pids - {os.getpid()})


def _read_record(f) -> str:
    f.seek(0)
    return f.read().strip()


@dataclasses.dataclass(frozen=True)
class LockKind:
    """What a folder lock says: its refusal when held (`busy` + holder + `hint`) and how it tells of a takeover."""

    busy: str  # "library is locked by"
    hint: str  # what the refused process should do
    error: type[Exception]
    notice: Callable[[Path, str], None]  # (lock file, the killed holder's record)


def _take_lock(f, folder: Path, lock_path: Path, kind: LockKind) -> str:
    """flock `f` for this process; returns the record the previous holder left, empty unless
    it was killed (a clean release clears it). A holder that is gone but whose orphaned
    workers still hold the lock gets `_ORPHAN_WAIT` seconds, then the orphans are named."""
    deadline = time.monotonic() + _ORPHAN_WAIT
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return _read_record(f)
        except BlockingIOError:
            pass
        holder = ""
        for _ in range(20):  # the holder writes its name right after taking the lock: give it a moment
            if holder := _read_record(f):
                break
            time.sleep(0.05)
        pid = _recorded_pid(holder)
        if pid is None or _alive(pid):
            raise kind.error(f"{folder}: {kind.busy} {holder or 'another process'}; {kind.hint}")
        if time.monotonic() > deadline:
            pids = " ".join(map(str, _openers(lock_path)))
            who, todo = ((f"processes {pids}", f"kill them (kill {pids})") if pids else
                         ("processes", f"find them with `fuser {lock_path}`, kill them"))
            raise kind.error(f"{lock_path}: still held by {who} left behind by {holder}, which is no longer "
                             f"running; {todo} and rerun")
        time.sleep(0.1)


@contextlib.contextmanager
def folder_lock(folder: Path, holder: str, kind: LockKind, recursive: bool = True) -> Iterator[None]:
    """Hold FOLDER/.lock (flock) while `holder` (e.g. "refbuild embed") writes the folder.

    The lock file records the holder while it runs and is emptied when it ends; a record
    found on taking the lock is a killed holder's, taken over with `kind.notice`. Temp
    files left in the folder are then a killed writer's and are removed."""
    lock_path = folder / ".lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+")
    except OSError as e:
        raise kind.error(f"{lock_path}: could not write ({e.strerror or e}); "
                         "free space or fix permissions and rerun") from e
    try:
        if left := _take_lock(f, folder, lock_path, kind):
            kind.notice(lock_path, left)
        try:  # unbuffered, so a failed write leaves nothing for close() to retry
            os.ftruncate(f.fileno(), 0)
            os.write(f.fileno(), f"{holder} (pid {os.getpid()})".encode())
        except OSError as e:  # a full disk: the stage could not write anything either
            raise kind.error(f"{lock_path}: could not write ({e.strerror or e}); "
                             "free space or fix permissions and rerun") from e
        remove_orphan_temps(folder, recursive=recursive)  # no writer but us now: every temp file is a killed run's
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(f.fileno(), 0)  # released, not killed
    finally:
        f.close()


def _library_notice(lock_path: Path, left: str) -> None:
    from refbuild.progress import console

    console.print(f"notice: {lock_path}: {left} ended without releasing the library (killed?); taking over",
                  markup=False, highlight=False, soft_wrap=True)


LIBRARY_LOCK = LockKind("library is locked by", "wait for it to finish (or kill it) and rerun", RefbuildError,
                        _library_notice)


def library_lock(lib: Path, stage: str) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on the library for the duration of a writing stage (`folder_lock`)."""
    return folder_lock(lib, f"refbuild {stage}", LIBRARY_LOCK)
