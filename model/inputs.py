"""What `model infer` is aimed at: files, folders (recursive) and globs -> images and their output names.

Every input keeps its path relative to the common folder of everything given
(a folder counts as its own root, a glob as the folder before its first
wildcard, a file as its parent), so `a/face.png` and `b/face.png` become
`OUT/a/face_x8.png` and `OUT/b/face_x8.png`: two inputs never share an output.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from .errors import MsrError
from .msrnet import LR_SIZE

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Input:
    path: Path  # as found (absolute)
    rel: PurePath  # relative to the common root of all inputs: mirrored under --out


def _images_under(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)


def _glob_root(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def collect_inputs(specs: list[str]) -> list[Input]:
    """Resolve files, folders (recursive: image files only) and globs, in order, without duplicates."""
    found: list[tuple[Path, Path]] = []  # (file, root)
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files = _images_under(p)
            if not files:
                raise MsrError(f"{p}: a folder without images ({', '.join(IMAGE_EXTS)}); give image files, folders or globs")
            found += [(f, p) for f in files]
        elif p.is_file():
            found.append((p, p.parent))
        elif glob.has_magic(spec):
            files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not files:
                raise MsrError(f"{spec}: the pattern matches no file; check it (quote it so the shell does not expand it)")
            found += [(f, _glob_root(spec)) for f in files]
        else:
            raise MsrError(f"{spec}: no such file or folder; give image files, folders (searched recursively) or globs")
    root = Path(os.path.commonpath([os.path.abspath(r) for _, r in found]))
    seen, inputs = set(), []
    for f, _ in found:
        a = Path(os.path.abspath(f))
        if a not in seen:
            seen.add(a)
            inputs.append(Input(a, PurePath(a.relative_to(root))))
    return inputs


def output_stem(out_dir: Path, inp: Input) -> Path:
    """OUT/<relative folder>/<stem>: the prefix of every file written for this input."""
    return out_dir / inp.rel.parent / inp.rel.stem


def check_outputs(out_dir: Path, inputs: list[Input], scale: int, detect: bool, overwrite: bool) -> None:
    """Refuse outputs two inputs would share, and (without --overwrite) files an earlier run wrote."""
    owner: dict[Path, Path] = {}
    for inp in inputs:
        stem = output_stem(out_dir, inp)
        if stem in owner:
            raise MsrError(f"{owner[stem]} and {inp.path} would both write {stem}_*.png; rename one of them")
        owner[stem] = inp.path
    if overwrite:
        return
    record = out_dir / "infer.json"
    if record.exists():
        raise MsrError(f"{record}: {out_dir} holds an earlier run; give another --out, or --overwrite to replace its files")
    for stem in owner:
        pattern = f"{stem.name}_*.png" if detect else f"{stem.name}_x{scale}.png"
        old = sorted(stem.parent.glob(glob.escape(pattern)) if stem.parent.is_dir() else [])
        if old:
            raise MsrError(f"{old[0]}: exists already; give another --out, or --overwrite to replace it")


def square_lr(im: Image.Image, path: Path, non_square: str) -> tuple[Image.Image, str | None]:
    """A face image -> 16x16 RGB, and what was done to it ("64x64, resized to 16x16 (bicubic)"; None if nothing).

    non_square: "pad" centre-pads with the edge pixels to a square first, "refuse" raises.
    """
    w, h = im.size
    change = None
    if w != h:
        if non_square != "pad":
            raise MsrError(f"{path}: {w}x{h} is not square; crop the face to a square, or use --non-square pad")
        side = max(w, h)
        a = np.asarray(im)
        top, left = (side - h) // 2, (side - w) // 2
        im = Image.fromarray(np.pad(a, ((top, side - h - top), (left, side - w - left), (0, 0)), mode="edge"))
        change = f"{w}x{h}, not square: centre-padded with its edge pixels to {side}x{side}"
    if im.size != (LR_SIZE, LR_SIZE):
        change = (change + ", then" if change else f"{w}x{h},") + f" resized to {LR_SIZE}x{LR_SIZE} (bicubic)"
        im = im.resize((LR_SIZE, LR_SIZE), Image.BICUBIC)
    return im, change


def change_notes(changes: list[tuple[Path, str]]) -> list[str]:
    """One line per kind of change: '3 inputs (first a.png): 64x64, resized to 16x16 (bicubic); ...'."""
    by_kind: dict[str, list[Path]] = {}
    for path, change in changes:
        by_kind.setdefault(change, []).append(path)
    notes = []
    for change, paths in by_kind.items():
        who = str(paths[0]) if len(paths) == 1 else f"{len(paths)} inputs (first {paths[0]})"
        notes.append(f"{who}: {change}; the model takes {LR_SIZE}x{LR_SIZE} faces")
    return notes
