"""Input fingerprints: what each stage's output was made from, and whether that changed.

Every output a later stage depends on (splits.parquet, features*.parquet,
pairs.parquet, the training manifests) carries two metadata keys: `inputs`, a
JSON map of the files it consumed to their sha256 (paths relative to the
library, or absolute), and `command`, the command that remakes it (`{lib}`
standing for the library's folder, so a library's bytes do not depend on where
it lives). An output
whose inputs changed since is *stale*: `refbuild audit` reports it and
`model train` refuses it, both naming the command to rerun.
"""
from __future__ import annotations

import json
from pathlib import Path

from data_manifests import metadata
from refbuild.io import sha256_file


def fingerprints(base: Path, files: list[Path], absolute: bool = False) -> dict[str, str]:
    """sha256 of each existing file, keyed by its path relative to `base` (absolute if asked)."""
    out = {}
    for f in files:
        if f.is_file():
            key = str(f.resolve()) if absolute else f.resolve().relative_to(base.resolve()).as_posix()
            out[key] = sha256_file(f)
    return out


def stamp(inputs: dict[str, str], command: str) -> dict[str, str]:
    """The metadata keys that record what an output was made from."""
    return {"inputs": json.dumps(inputs, sort_keys=True), "command": command}


def stale_reason(path: Path, base: Path | None = None) -> str | None:
    """None when every recorded input of `path` is unchanged (or none is recorded: an older
    refbuild); else one line naming the changed input and the command to rerun."""
    try:
        meta = metadata(path)
        inputs = json.loads(meta.get("inputs", "{}"))
    except Exception:  # unreadable: the schema checks report it
        return None
    base = base or path.parent
    lib = meta.get("ref_root") or str(base.resolve())  # a manifest names its library; a library file lives in it
    for key, sha in sorted(inputs.items()):
        f = base / key
        now = sha256_file(f) if f.is_file() else None
        if now != sha:
            what = "is missing" if now is None else "changed"
            return (f"{path}: stale, its input {f} {what} since it was made; rerun "
                    f"`{meta.get('command', 'the stage that wrote it').replace('{lib}', lib)}`")
    return None
