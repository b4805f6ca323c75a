"""Tampered copies of a finished library: one edit each, and what must catch it.

`clone(built, dst)` copies a library and its manifests and points the copies'
metadata (hr_root, ref_root) and pair.config.json at the copy, so an edit to
the copy is seen by whoever reads it. Each tampering is a function
(lib, manifest_dir) -> None; TAMPERS maps its name to (function, what `refbuild
audit` must say, whether it edits a training manifest).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq


def rewrite(path: Path, edit_rows: Callable[[list[dict]], None] | None = None, meta: dict[str, str] | None = None,
            drop_meta: tuple[str, ...] = ()) -> None:
    """Rewrite a Parquet file with its rows and/or key-value metadata edited (schema kept)."""
    t = pq.read_table(path)
    md = dict(t.schema.metadata or {})
    rows = t.to_pylist()
    if edit_rows:
        edit_rows(rows)
    md.update({k.encode(): v.encode() for k, v in (meta or {}).items()})
    for k in drop_meta:
        md.pop(k.encode(), None)
    out = pa.Table.from_pylist(rows, schema=t.schema.remove_metadata()).replace_schema_metadata(md)
    pq.write_table(out, path)


def clone(lib: Path, manifests: Path, dst: Path) -> tuple[Path, Path]:
    """Copy a library and its manifest folder under `dst`; the copies refer to each other."""
    new_lib, new_man = dst / "lib", dst / "manifests" / manifests.name
    shutil.copytree(lib, new_lib)
    shutil.copytree(manifests, new_man)
    for p in new_man.glob("*.parquet"):
        rewrite(p, meta={"hr_root": str(new_lib.resolve()), "ref_root": str(new_lib.resolve())})
    cfg = json.loads((new_lib / "pair.config.json").read_text())
    cfg["manifests"] = {k: str(new_man / Path(v).name) for k, v in cfg["manifests"].items()}
    (new_lib / "pair.config.json").write_text(json.dumps(cfg))
    return new_lib, new_man


def _first(rows: list[dict], **where) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in where.items()))


# -- training-manifest tamperings (also fed to `model train`) -----------------------------

def ref_path_missing(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", lambda rows: rows[0]["ref_paths"].__setitem__(0, "crops/zz/not-there.png"))


def hr_file_deleted(lib: Path, man: Path) -> None:
    row = pq.read_table(man / "train.parquet").to_pylist()[0]
    (lib / row["hr_path"]).unlink()


def identity_in_two_splits(lib: Path, man: Path) -> None:
    """A val row relabelled with an identity that train holds."""
    train_ident = pq.read_table(man / "train.parquet").column("identity")[0].as_py()
    rewrite(man / "val.parquet", lambda rows: rows[0].__setitem__("identity", train_ident))


def wrong_schema_version(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", meta={"msrface.schema_version": "2"})


def wrong_schema_name(lib: Path, man: Path) -> None:
    shutil.copyfile(lib / "splits.parquet", man / "train.parquet")


def dotdot_path(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", lambda rows: rows[0].__setitem__("hr_path", "../../../../etc/passwd"))


def absolute_path(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", lambda rows: rows[0]["ref_paths"].__setitem__(0, "/etc/passwd"))


def ref_same_identity(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", lambda rows: rows[0]["ref_identities"].__setitem__(0, rows[0]["identity"]))


def ref_is_self(lib: Path, man: Path) -> None:
    def edit(rows):
        rows[0]["ref_face_ids"][0], rows[0]["ref_paths"][0] = rows[0]["face_id"], rows[0]["hr_path"]
    rewrite(man / "train.parquet", edit)


def m_not_a_number(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", meta={"m": "four"})


def truncated_manifest(lib: Path, man: Path) -> None:
    p = man / "train.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def null_ref_paths(lib: Path, man: Path) -> None:
    rewrite(man / "train.parquet", lambda rows: rows[0].__setitem__("ref_paths", None))


def columns_dropped(lib: Path, man: Path) -> None:
    t = pq.read_table(man / "train.parquet")
    pq.write_table(t.drop_columns(["ref_distances"]).replace_schema_metadata(t.schema.metadata), man / "train.parquet")


# -- library tamperings (audit only) ----------------------------------------------------

def library_identity_in_two_splits(lib: Path, man: Path) -> None:
    """One face of a two-face identity moved to another split."""
    faces = pq.read_table(lib / "faces.parquet").to_pylist()
    ident = faces[0]["identity"]
    moved = [r["face_id"] for r in faces if r["identity"] == ident][-1]

    def edit(rows):
        r = _first(rows, face_id=moved)
        r["split"] = "test" if r["split"] != "test" else "train"
    rewrite(lib / "splits.parquet", edit)


def faces_schema_version(lib: Path, man: Path) -> None:
    rewrite(lib / "faces.parquet", meta={"msrface.schema_version": "0"})


def crop_path_escapes(lib: Path, man: Path) -> None:
    rewrite(lib / "faces.parquet", lambda rows: rows[0].__setitem__("crop_path", "../../../etc/passwd"))


def features_nan(lib: Path, man: Path) -> None:
    t = pq.read_table(lib / "features.parquet")
    rows = t.to_pylist()
    rows[0]["features"][0] = float("nan")
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), lib / "features.parquet")


def pair_config_garbage(lib: Path, man: Path) -> None:
    (lib / "pair.config.json").write_text("{not json")


def pairs_ref_same_identity(lib: Path, man: Path) -> None:
    """A reference swapped for another photo of the query's own identity."""
    faces = pq.read_table(lib / "faces.parquet").to_pylist()

    def edit(rows):
        q = next(r for r in rows if r["query_identity"] is not None and r["n_refs"] > 0)
        twin = next(f["face_id"] for f in faces if f["identity"] == q["query_identity"] and f["face_id"] != q["query_face_id"])
        q["ref_face_ids"][0] = twin
    rewrite(lib / "pairs.parquet", edit)


# name -> (tampering, text the audit must print, edits a training manifest)
TAMPERS: dict[str, tuple[Callable[[Path, Path], None], str, bool]] = {
    "manifest ref path to a missing file": (ref_path_missing, "not-there.png missing", True),
    "manifest hr file deleted": (hr_file_deleted, "missing", True),
    "manifest identity in two splits": (identity_in_two_splits, "val row of train identity", True),
    "manifest wrong schema version": (wrong_schema_version, "version 2", True),
    "manifest of another schema": (wrong_schema_name, "schema is 'splits'", True),
    "manifest path with ..": (dotdot_path, "escapes its root", True),
    "manifest absolute path": (absolute_path, "'/etc/passwd' escapes its root", True),
    "manifest reference of the same identity": (ref_same_identity, "has the same identity", True),
    "manifest row references itself": (ref_is_self, "references itself", True),
    "manifest m not a number": (m_not_a_number, "is not a positive number", True),
    "manifest truncated": (truncated_manifest, "not a readable Parquet file", True),
    "manifest null reference list": (null_ref_paths, "ref_paths is null", True),
    "manifest column dropped": (columns_dropped, "columns do not match", True),
    "library identity in two splits": (library_identity_in_two_splits, "is in splits", False),
    "faces.parquet wrong schema version": (faces_schema_version, "version 0", False),
    "faces.parquet crop path escapes": (crop_path_escapes, "missing or outside the library", False),
    "features NaN": (features_nan, "NaN or infinite", False),
    "pair.config.json not JSON": (pair_config_garbage, "not the JSON", False),
    "pairs.parquet reference of the same identity": (pairs_ref_same_identity, "has the same identity", False),
}
