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


def prepare(wdir: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Make `wdir` ready for a run whose result-affecting settings are `fingerprint`.

    Finished shards of an earlier run are kept when that run had the same
    fingerprint. An earlier run with other settings that completed is replaced;
    one that did not complete is refused unless `overwrite` is set, so a resume
    with a mistyped option never mixes two configurations.
    """
    fp_path = wdir / "fingerprint.json"
    want = json.loads(json.dumps(fingerprint, default=str))
    if fp_path.exists():
        old = json.loads(fp_path.read_text())
        if overwrite or (old != want and (wdir / "complete").exists()):
            shutil.rmtree(wdir)
        elif old != want:
            changed = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
            raise RefbuildError(
                f"{wdir}: an unfinished earlier run used other settings ({', '.join(changed)}); "
                "rerun with the same options to resume it, or add --overwrite to discard it"
            )
    try:
        wdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # no free inode, or a read-only library
        raise RefbuildError(f"{wdir}: could not create ({e.strerror or e}); free space or fix permissions and rerun") from e
    remove_orphan_temps(wdir)
    write_json(fp_path, fingerprint)


def finish(wdir: Path) -> None:
    """Mark the stage's run complete (its final outputs are in place)."""
    write_bytes(wdir / "complete", b"")


def shard_file(wdir: Path, index: int, kind: str) -> Path:
    return wdir / f"shard-{index:05d}.{kind}.parquet"


def is_done(wdir: Path, index: int) -> bool:
    return (wdir / f"shard-{index:05d}.done").exists()


def mark_done(wdir: Path, index: int) -> None:
    write_bytes(wdir / f"shard-{index:05d}.done", b"")


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]
