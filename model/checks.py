"""What `model train` and `model eval` refuse in a manifest, checked in one place for both.

- a stale manifest (its library was re-split or re-embedded since `refbuild pair`), or one found in
  a copy of the library it names (`refbuild.stale`): unless --data-root says where the images are;
- references chosen on the LR view at another degradation than the model's scale (`pair
  --query-view lr` on `embed --lr-scale 8` fits an x8 model only);
- HR targets the library enlarged: a crop cut from a square of fewer source pixels than the model's
  output side (faces.src_side) teaches and scores blur; refused unless `allow_enlarged`, and then said.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from data_manifests import ManifestError, metadata, read_table
from refbuild.library import Library
from refbuild.stale import misplaced_reason, stale_reason

from .errors import MsrError

log = logging.getLogger("model")


@dataclass(frozen=True)
class Enlarged:
    """HR targets of a manifest whose source square is smaller than `size` (the model's output side)."""

    n: int  # enlarged rows
    known: int  # rows whose source size the library records
    rows: int  # all rows
    size: int
    smallest: int | None
    example: str | None  # a face_id


def enlarged_targets(manifest: Path, size: int, data_root: Path | None = None) -> Enlarged:
    """Count the manifest's HR targets cut from squares under `size` source pixels, from the faces.parquet
    of the library its `hr_root` (or `data_root`) names; rows it does not record are unknown, not counted."""
    meta = metadata(manifest)
    root = data_root if data_root is not None else meta.get("hr_root")
    table = read_table(manifest, "training_manifest", columns=["face_id", "hr_path"])
    rows = table.num_rows
    faces = Library(Path(root)).faces if root else None
    if faces is None or not faces.is_file():  # not a refbuild library: nothing recorded
        return Enlarged(0, 0, rows, size, None, None)
    try:
        t = read_table(faces, "faces")
    except ManifestError:
        return Enlarged(0, 0, rows, size, None, None)  # unreadable: the dataset's own checks say so
    side = {c: s for c, s in zip(t.column("crop_path").to_pylist(), t.column("src_side").to_pylist()) if s is not None}
    hit = [(side[p], f) for f, p in zip(table.column("face_id").to_pylist(), table.column("hr_path").to_pylist())
           if p in side and side[p] < size]
    known = sum(p in side for p in table.column("hr_path").to_pylist())
    return Enlarged(len(hit), known, rows, size, min(hit)[0] if hit else None, min(hit)[1] if hit else None)


def lr_scale_of(manifest: Path, data_root: Path | None = None) -> int | None:
    """The degradation the references were chosen at: None unless chosen on the LR view (`--query-view lr`).
    Read from the manifest (`lr_scale`), else (an older manifest) from its query library's features_lr.parquet."""
    meta = metadata(manifest)
    if meta.get("query_view") != "lr":
        return None
    scale = meta.get("lr_scale")
    if not scale:
        root = data_root if data_root is not None else meta.get("hr_root")
        lr = Library(Path(root)).features("lr") if root else None
        try:
            scale = metadata(lr).get("lr_scale") if lr is not None and lr.is_file() else None
        except Exception:  # unreadable: nothing to compare
            scale = None
    try:
        return int(scale) if scale else None
    except ValueError:
        return None


def check_manifest(manifest: Path, scale: int, what: str, data_root: Path | None = None,
                   allow_enlarged: bool = False) -> Enlarged:
    """Raise MsrError for a manifest `model train`/`model eval` must not use with a model of `scale`
    (`what`: the model or checkpoint, for the message); returns its enlarged HR targets (allowed ones
    are said in a warning)."""
    manifest = Path(manifest)
    read_table(manifest, "training_manifest", columns=["face_id"])  # missing, unreadable, another schema: said first
    if data_root is None:  # --data-root: the user says where the images are, and they are not checked
        why = misplaced_reason(manifest) or stale_reason(manifest)
        if why is not None:
            raise MsrError(why)
    lr_scale = lr_scale_of(manifest, data_root)
    if lr_scale is not None and lr_scale != scale:
        raise MsrError(f"{manifest}: its references were chosen on the LR view degraded x{lr_scale} (`refbuild embed "
                       f"--lr-scale {lr_scale}`, `pair --query-view lr`), but {what} is x{scale}; use an x{lr_scale} "
                       f"model, or re-embed with `--views hr,lr --lr-scale {scale}` and rerun `refbuild pair`")
    big = enlarged_targets(manifest, 16 * scale, data_root)
    if big.n:
        said = (f"{manifest}: {big.n} of {big.rows} HR targets were enlarged by `refbuild detect` (cut from squares "
                f"of fewer source pixels than the x{scale} output's {big.size}, down to {big.smallest} px; e.g. face "
                f"{big.example}): they hold blur, not detail")
        if not allow_enlarged:
            raise MsrError(f"{said}; build the library from larger faces (`detect --min-face`), or add "
                           "--allow-enlarged to use them anyway")
        log.warning("%s; using them (--allow-enlarged)", said)
    return big
