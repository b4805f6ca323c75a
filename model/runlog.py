"""Run outputs: metrics CSV, optional TensorBoard events, sample grids; every file through refbuild.io's atomic writers."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from refbuild.io import LockKind, _atomic_path, folder_lock, write_bytes

from .errors import MsrError

log = logging.getLogger("model")


def _run_notice(lock_path: Path, left: str) -> None:
    log.warning("%s: taking over the lock of %s, which is no longer running", lock_path.parent, left)


RUN_LOCK = LockKind("run folder in use by", "wait for it to finish (or kill it), or choose another --name", MsrError,
                    _run_notice)


def run_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold `<run>/.lock` while a run writes its folder: a second run on it fails at once (`folder_lock`)."""
    return folder_lock(run_dir, "model train", RUN_LOCK, recursive=False)


def _step_of(row: dict[str, Any]) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


def trim_metrics(path: Path, fields: list[str], upto: int) -> None:
    """Rewrite `path` (atomically) as a header and the rows of steps 1..`upto`: what a run resumed at
    step `upto` (0: a new run) continues; rows a killed run logged after its checkpoint are dropped."""
    rows = []
    if path.is_file():
        try:
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if (s := _step_of(r)) is not None and s <= upto]
        except (csv.Error, UnicodeDecodeError) as e:
            raise MsrError(f"{path}: not a readable CSV ({e}); move it away and rerun") from e
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def save_png_atomic(img: Image.Image, path: Path) -> None:
    """A PNG through refbuild's atomic writer (temp file beside it, fsync, rename)."""
    with _atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


class MetricsLogger:
    """Appends rows to `<run>/metrics.csv` after the rows of steps 1..`step` (the run's checkpoint;
    0: a new run); mirrors scalars to TensorBoard when installed.

    A missing `tensorboard` package is reported once as a warning, never silently.
    """

    def __init__(self, run_dir: Path, fields: list[str], step: int):
        self.path = run_dir / "metrics.csv"
        self.fields = fields
        trim_metrics(self.path, fields, step)
        self._fh = open(self.path, "a", newline="")
        self._csv = csv.DictWriter(self._fh, fieldnames=fields, extrasaction="ignore")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard events (pip install tensorboard); metrics.csv is written")

    def log(self, row: dict[str, Any]) -> None:
        self._csv.writerow(row)
        self._fh.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def labelled_grid(rows: list[list[Image.Image | None]], labels: list[str], tile: int,
                  names: list[str] | None = None) -> Image.Image:
    """Tiles (resized to tile x tile; None: left grey) in rows, under a header of column labels;
    `names`, when given, one per row: a caption line above each row (e.g. the input file it shows)."""
    from PIL import ImageDraw

    header = 14
    caption = header if names is not None else 0
    cols = max([len(labels)] + [len(r) for r in rows])
    grid = Image.new("RGB", (cols * tile, header + len(rows) * (caption + tile)), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    draw.rectangle((0, 0, grid.width, header - 1), fill=(255, 255, 255))
    for c, text in enumerate(labels):
        draw.text((c * tile + 3, 1), text, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        top = header + r * (caption + tile)
        if names is not None:
            draw.rectangle((0, top, grid.width, top + caption - 1), fill=(235, 235, 235))
            draw.text((3, top + 1), names[r], fill=(0, 0, 0))
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(im if im.size == (tile, tile) else im.resize((tile, tile), Image.BICUBIC),
                           (c * tile, top + caption))
    return grid


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.float().cpu().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())


def sample_grid(lr: torch.Tensor, refs: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor, n: int = 4) -> Image.Image:
    """Rows of LR (nearest) | bicubic | refs... | SR | HR, all at HR size, under column labels.

    Args:
        lr: B, 3, 16, 16; refs: B, M, 3, R, R; sr, hr: B, 3, S, S; all [0, 1].
    """
    S = hr.shape[-1]
    rows = []
    for i in range(min(n, lr.shape[0])):
        tiles = [
            F.interpolate(lr[i : i + 1], size=S, mode="nearest"),
            F.interpolate(lr[i : i + 1], size=S, mode="bicubic", align_corners=False),
        ]
        tiles += [F.interpolate(r[None], size=S, mode="bicubic", align_corners=False) for r in refs[i]]
        tiles += [sr[i : i + 1], hr[i : i + 1]]
        rows.append([_pil(t[0]) for t in tiles])
    m = refs.shape[1]
    return labelled_grid(rows, ["LR", "bicubic", *(f"ref {k + 1}" for k in range(m)), "SR", "HR"], S)
