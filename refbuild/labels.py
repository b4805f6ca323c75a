"""Identities of source photos: from a labels CSV (`--labels`) or the photo's folder.

Identities are NFC-normalised and stripped, so 'José' typed composed in one
place and decomposed in another (or with a stray space) is one person.
"""
from __future__ import annotations

import csv
import io
import unicodedata
from pathlib import Path
from typing import Literal, Protocol

from refbuild.errors import RefbuildError

IdentityFrom = Literal["csv", "folder", "none"]


class LabelSource(Protocol):
    """Where identities come from: what `read_labels` and `identity_of` read of a stage's config
    (`refbuild.detect.DetectConfig` is one). Here, below detect, so neither module needs the other."""

    labels: Path | None  # CSV with a `path` column (relative to SRC) and an identity column
    identity_column: str
    identity_from: IdentityFrom


def clean_identity(name: str | None) -> str | None:
    """The canonical form of an identity: NFC, no surrounding whitespace; None when empty."""
    if name is None:
        return None
    return unicodedata.normalize("NFC", name).strip() or None


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is not part of the first column's name
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RefbuildError(f"{path}: not UTF-8 at line {line}; re-save it as UTF-8") from None


def read_labels(cfg: LabelSource) -> dict[str, str]:
    """labels CSV -> {path relative to SRC: identity}; a RefbuildError naming the line for a bad row."""
    if cfg.labels is None:
        return {}
    path, col = cfg.labels, cfg.identity_column
    if not path.is_file():
        raise RefbuildError(f"{path}: labels file not found; pass a CSV with columns path,{col}")
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    labels: dict[str, str] = {}
    seen: dict[str, int] = {}  # path -> line it was first given on
    try:
        cols = reader.fieldnames or []
        if "path" not in cols or col not in cols:
            raise RefbuildError(f"{path}: needs columns 'path' and '{col}', found {cols}; "
                                "use --identity-column to name the identity column")
        for row in reader:
            rel, ident = row["path"], row[col]
            if rel is None or ident is None:
                raise RefbuildError(f"{path}: line {reader.line_num} has fewer fields than the header {cols}; "
                                    f"give every row a path and a {col} (an empty {col} is fine)")
            rel, ident = rel.strip(), clean_identity(ident) or ""
            if not rel:
                continue
            if rel in labels and labels[rel] != ident:
                raise RefbuildError(f"{path}: {rel!r} is {labels[rel]!r} at line {seen[rel]} and {ident!r} at line "
                                    f"{reader.line_num}; keep one identity per path")
            labels[rel] = ident
            seen.setdefault(rel, reader.line_num)
    except csv.Error as e:
        line = reader.line_num + 1  # the line that failed is not counted yet
        raise RefbuildError(f"{path}: not a readable CSV at line {line} ({e}); fix or re-export it") from None
    return labels


def identity_of(rel: str, labels: dict[str, str], cfg: LabelSource) -> str | None:
    if cfg.identity_from == "csv":
        return labels.get(rel) or None
    if cfg.identity_from == "folder":  # the photo's own folder; one directly in SRC has none
        return clean_identity(Path(rel).parent.name)
    return None
