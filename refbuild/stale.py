"""Input fingerprints: what each stage's output was made from, and whether that changed.

Every output a later stage depends on (splits.parquet, features*.parquet,
pairs.parquet, the training manifests) carries two metadata keys: `inputs`, a
JSON map of the files it consumed to their sha256 (paths relative to the
library, or absolute), and `command`, the command that remakes it (`{lib}`
standing for the library's folder, so a library's bytes do not depend on where
it lives). An output
whose inputs changed since is *stale*: `refbuild audit` reports it and
`model train` and `model eval` refuse it, both naming the command to rerun.

A library's own files name each other relative to it, so a library may be
copied or moved; its manifests name its folder (`hr_root`, `ref_root`), so a
manifest found in a copy would read the original's images: it is *misplaced*
(`misplaced_reason`), and refused with both places named.
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


def copied_from(path: Path, lib_root: Path) -> str | None:
    """The library a manifest names (its `ref_root`) when `lib_root` is another folder holding a copy
    of it (the faces.parquet the manifest was made from, byte for byte): a copied or moved library."""
    try:
        meta = metadata(path)
        inputs = json.loads(meta.get("inputs", "{}"))
    except Exception:  # unreadable: the schema checks report it
        return None
    old, here = meta.get("ref_root"), lib_root.resolve()
    if not old or Path(old) == here:
        return None
    want, faces = inputs.get(str(Path(old) / "faces.parquet")), here / "faces.parquet"
    return old if want and faces.is_file() and sha256_file(faces) == want else None


def home_library(path: Path) -> Path | None:
    """The library a manifest lies in when it is where `refbuild pair` puts it: LIB/manifests/<name>/."""
    p = path.absolute()
    if len(p.parents) < 3 or p.parent.parent.name != "manifests":
        return None
    lib = p.parents[2]
    return lib if (lib / "faces.parquet").is_file() else None


def misplaced_reason(path: Path) -> str | None:
    """None unless the manifest lies in a copy (or a moved version) of the library it names; then one
    line naming both folders and what to do."""
    home = home_library(path)
    old = copied_from(path, home) if home is not None else None
    if old is None:
        return None
    meta = metadata(path)
    cmd = meta.get("command", "refbuild pair {lib}").replace("{lib}", str(home))
    if "--name" not in cmd:  # remade under the same name, so it replaces this one
        cmd += f" --name {path.parent.name}"
    same = meta.get("hr_root") == old  # queries from the library itself: --data-root stands for both roots
    return (f"{path}: made from the library {old}, but it lies in {home.resolve()} (a copy of that library, or "
            f"moved there), so its images are read from {old}, not from where it lies. Remake it here with `{cmd}`"
            + (f", or pass --data-root {home.resolve()}" if same else ""))
