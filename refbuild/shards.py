"""Deterministic shards with done-markers: the unit of resumable work.

A stage splits its input into numbered shards. Each shard writes its output
files (atomically) and then a `.done` marker, last. A rerun skips shards whose
marker exists, so a run killed at any point resumes where it stopped and ends
with the same outputs as an uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from refbuild.errors import RefbuildError
from refbuild.io import remove_orphan_temps, write_bytes, write_json


def work_dir(lib: Path, stage: str) -> Path:
    return lib / ".work" / stage


def prepare(wdir: Path, fingerprint: dict[str, Any], overwrite: bool, inputs: dict[str, Any] | None = None) -> None:
    """Make `wdir` ready for a run whose result-affecting settings are `fingerprint`
    and whose input files had the sha256s `inputs`.

    Finished shards of an earlier run are kept when that run had the same
    settings and inputs. An earlier run with other settings is refused unless
    `overwrite` is set (finished: its outputs would be replaced by other ones;
    unfinished: a resume with a mistyped option never mixes two configurations).
    An earlier run with the same settings whose inputs changed is redone: that is
    how a stale stage is brought up to date.
    """
    fp_path = wdir / "fingerprint.json"
    want = json.loads(json.dumps(fingerprint | {"inputs": inputs or {}}, default=str))
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        complete = (wdir / "complete").exists()
        # keys an older refbuild kept beside the settings (input hashes, counts) are not settings
        changed = sorted(k for k in want if k != "inputs" and k in old and old[k] != want[k])
        if overwrite or (old != want and complete and not changed):
            shutil.rmtree(wdir)
        elif changed:
            what = "a finished earlier run (its outputs are in place)" if complete else "an unfinished earlier run"
            fix = "add --overwrite to replace its outputs" if complete else \
                "rerun with the same options to resume it, or add --overwrite to discard it"
            raise RefbuildError(f"{wdir}: {what} used other settings ({', '.join(changed)}); {fix}")
        elif old != want:  # unfinished, same settings, other inputs: its shards are of the old inputs
            shutil.rmtree(wdir)
    try:
        wdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no free inode, or a read-only library
        raise RefbuildError(f"{wdir}: could not create ({e.strerror or e}); free space or fix permissions and rerun") from e
    remove_orphan_temps(wdir)
    write_json(fp_path, want)


def finish(wdir: Path) -> None:
    """Mark the stage's run complete (its final outputs are in place)."""
    write_bytes(wdir / "complete", b"")


def shard_file(wdir: Path, index: int, kind: str) -> Path:
    return wdir / f"shard-{index:05d}.{kind}.parquet"


def is_done(wdir: Path, index: int) -> bool:
    return (wdir / f"shard-{index:05d}.done").exists()


def mark_done(wdir: Path, index: int, record: dict[str, Any] | None = None) -> None:
    """Write the done-marker, last; `record` (what the shard was made from) goes inside it."""
    data = b"" if record is None else json.dumps(record, sort_keys=True).encode()
    write_bytes(wdir / f"shard-{index:05d}.done", data)


def done_record(wdir: Path, index: int) -> dict[str, Any] | None:
    """The record a finished shard was marked with; None when unfinished, or marked without one."""
    try:
        return json.loads((wdir / f"shard-{index:05d}.done").read_text())
    except (OSError, ValueError):
        return None


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
