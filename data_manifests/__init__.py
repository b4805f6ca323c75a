"""Manifest schemas, as code.

Every Parquet file msrface writes is described here by a pyarrow schema and a
schema name/version stored in the file's key-value metadata. Writers call
`check_table`, readers call `read_table`; both fail with a message that names
the file and says what to do.

Generated training manifests are written into the library they belong to,
`LIB/manifests/<name>/` (`refbuild pair --manifest-dir` picks another folder;
manifests another library made there are never overwritten).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_KEY = b"msrface.schema"
VERSION_KEY = b"msrface.schema_version"


class MsrfaceError(Exception):
    """The base of every error this project raises for a problem the user can fix: its message
    says what is wrong and what to do, and each command line prints it as one line (exit 1).
    It lives here, in the package every other imports, so both halves share it."""


class ManifestError(MsrfaceError):
    """A manifest is missing, unreadable, or does not match its schema."""


_LANDMARKS = pa.list_(pa.float32(), 10)  # x1..x5, y1..y5 in source-image pixels
_BOX = pa.list_(pa.float32(), 4)  # x0, y0, x1, y1 in source-image pixels

FACES = pa.schema(
    [
        ("face_id", pa.string()),  # stable: sha256(relative source path)[:16]-<face index>
        ("src_path", pa.string()),  # relative to the source folder given to `detect`
        ("src_sha256", pa.string()),  # of the source file's bytes
        ("identity", pa.string()),  # null when unknown
        ("face_index", pa.int16()),  # rank by detection probability within the image
        ("n_faces", pa.int16()),  # faces MTCNN found in the image (before filtering)
        ("box", _BOX),
        ("prob", pa.float32()),  # MTCNN probability; NaN for --aligned
        ("landmarks", _LANDMARKS),  # null for --aligned
        ("crop_path", pa.string()),  # relative to the library root
        ("crop_sha256", pa.string()),  # of the crop file's bytes; null in a library made before crops were hashed
        ("img_w", pa.int32()),
        ("img_h", pa.int32()),
        # side, in source pixels, of the square the crop was cut from (< the crop's side: enlarged);
        # null in a library made before it was recorded: unknown
        ("src_side", pa.int32()),
    ]
)

REJECTS = pa.schema(
    [
        ("src_path", pa.string()),
        ("src_sha256", pa.string()),  # null when the file could not be read
        ("reason", pa.string()),  # a short code, see refbuild.images.REJECT_REASONS
        ("detail", pa.string()),  # the human-readable message
    ]
)

SPLITS = pa.schema(
    [
        ("face_id", pa.string()),
        ("split", pa.string()),  # train | val | test
        ("group", pa.string()),  # identity group (identities joined by shared photos)
    ]
)

PAIRS = pa.schema(
    [
        ("query_face_id", pa.string()),
        ("query_library", pa.string()),  # "self" or the query library's root
        ("query_split", pa.string()),
        ("query_identity", pa.string()),
        ("n_refs", pa.int16()),  # < m when too few valid candidates existed
        ("ref_face_ids", pa.list_(pa.string())),
        ("ref_identities", pa.list_(pa.string())),
        ("ref_distances", pa.list_(pa.float32())),  # Eq. 2: summed per-layer L1
    ]
)

TRAINING_MANIFEST = pa.schema(
    [
        ("face_id", pa.string()),
        ("hr_path", pa.string()),  # 256x256 RGB crop, relative to metadata hr_root
        ("identity", pa.string()),
        ("split", pa.string()),
        ("ref_face_ids", pa.list_(pa.string())),
        ("ref_paths", pa.list_(pa.string())),  # relative to metadata ref_root
        ("ref_identities", pa.list_(pa.string())),
        ("ref_distances", pa.list_(pa.float32())),
        ("schema_version", pa.int16()),
    ]
)

# name -> (schema, version). Bump the version whenever a schema changes.
SCHEMAS: dict[str, tuple[pa.Schema, int]] = {
    "faces": (FACES, 1),
    "rejects": (REJECTS, 1),
    "splits": (SPLITS, 1),
    "pairs": (PAIRS, 1),
    "training_manifest": (TRAINING_MANIFEST, 1),
    # features: columns face_id + `features` fixed_size_list<float32>[D]; D and the
    # per-layer slices live in the metadata, so the schema is built per file.
    "features": (pa.schema([("face_id", pa.string())]), 1),
}


def features_schema(dim: int) -> pa.Schema:
    return pa.schema([("face_id", pa.string()), ("features", pa.list_(pa.float32(), dim))])


def with_metadata(table: pa.Table, name: str, extra: dict[str, str] | None = None) -> pa.Table:
    """Stamp a table with its schema name and version (plus extra string metadata)."""
    _, version = SCHEMAS[name]
    meta = dict(table.schema.metadata or {})
    meta[SCHEMA_KEY] = name.encode()
    meta[VERSION_KEY] = str(version).encode()
    for k, v in (extra or {}).items():
        meta[k.encode()] = str(v).encode()
    return table.replace_schema_metadata(meta)


def check_table(table: pa.Table, name: str, where: str = "<table>") -> None:
    """Raise ManifestError unless `table` has exactly the columns and types of `name`."""
    schema, _ = SCHEMAS[name]
    names = table.schema.names
    if name == "features":
        ok = names == ["face_id", "features"] and pa.types.is_fixed_size_list(table.schema.field("features").type)
        if not ok:
            raise ManifestError(f"{where}: not a features file (columns {names}); rerun `refbuild embed`")
        return
    if not table.schema.remove_metadata().equals(schema):
        want = ", ".join(f"{f.name}:{f.type}" for f in schema)
        got = ", ".join(f"{f.name}:{f.type}" for f in table.schema)
        raise ManifestError(f"{where}: columns do not match schema '{name}': expected [{want}], found [{got}]")


def check_columns(table: pa.Table, name: str, columns: list[str], where: str = "<table>") -> None:
    """Raise ManifestError unless `table` (a partial read) has `columns`, each of the type schema `name` gives it."""
    schema = features_schema(0) if name == "features" else SCHEMAS[name][0]
    for c in columns:
        got = table.schema.field(c).type
        if name == "features" and c == "features":  # any D
            want, ok = "fixed_size_list<float32>", pa.types.is_fixed_size_list(got) and got.value_type == pa.float32()
        else:
            want, ok = str(schema.field(c).type), got == schema.field(c).type
        if not ok:
            raise ManifestError(f"{where}: column {c} is {got}, schema '{name}' has {want}; "
                                "rerun the stage that writes it")


def metadata(path: str | Path) -> dict[str, str]:
    """The string key-value metadata of a Parquet file."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def _unreadable(path: Path, e: Exception) -> ManifestError:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path.suffix.lower() != ".parquet":
        return ManifestError(f"{path}: not a Parquet file ({why}); give the .parquet file msrface wrote "
                             "(`refbuild pair` writes the manifests)")
    return ManifestError(f"{path}: not a readable Parquet file ({why}); if msrface wrote it, rerun the stage that "
                         "writes it (it is replaced)")


def read_table(path: str | Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file and check its schema name, version and columns (all of them, or
    the `columns` asked for: each must be in the schema and have its type).

    Raises ManifestError naming the file and the fix: missing file, unreadable
    file, other schema, other version.
    """
    path = Path(path)
    if columns is not None:  # a caller's mistake, not the file's: said before the file is opened
        known = (features_schema(0) if name == "features" else SCHEMAS[name][0]).names
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ValueError(f"read_table({name!r}, columns=...): {unknown} not in schema '{name}' "
                             f"({', '.join(known)})")
    if not path.is_file():
        raise ManifestError(f"{path}: no such file; run the stage that writes it first")
    try:
        meta = metadata(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise _unreadable(path, e) from e
    _, version = SCHEMAS[name]
    found = meta.get(SCHEMA_KEY.decode())
    if found != name:
        raise ManifestError(f"{path}: schema is '{found}', expected '{name}'")
    if meta.get(VERSION_KEY.decode()) != str(version):
        raise ManifestError(
            f"{path}: schema '{name}' version {meta.get(VERSION_KEY.decode())}, this msrface reads version "
            f"{version}; rebuild it with this version's `refbuild`"
        )
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:
        raise _unreadable(path, e) from e
    if columns is None:
        if name == "faces" and "crop_sha256" not in table.schema.names:  # made before crops were hashed
            table = table.add_column(table.schema.get_field_index("crop_path") + 1, "crop_sha256",
                                     pa.nulls(table.num_rows, pa.string()))
        if name == "faces" and "src_side" not in table.schema.names:  # made before source sizes were recorded
            table = table.append_column("src_side", pa.nulls(table.num_rows, pa.int32()))
        check_table(table, name, str(path))
    else:
        check_columns(table, name, columns, str(path))
    return table
