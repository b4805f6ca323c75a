"""Training-manifest dataset: HR crops, their LR (bicubic or a realistic degradation) and references.

A row of a `training_manifest` Parquet file names a 256x256 HR crop
(`<hr_root>/<hr_path>`) and its references (`<ref_root>/<ref_paths[i]>`); the
roots are the file's metadata keys `hr_root`/`ref_root` or one `data_root`
override. Samples are addressed by an integer key = epoch * N + row so that all
randomness (flip, random references) is a pure function of (seed, key): the
same batches come out with any number of workers and after a resume.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from data_manifests import ManifestError, metadata, read_table

from . import degradations
from .errors import MsrError
from .msrnet import LR_SIZE

RefMode = Literal["matched", "random", "none", "oracle", "shuffled"]
REF_MODES = ("matched", "random", "none", "oracle", "shuffled")


def _safe_rel(p: str, what: str, manifest: Path) -> str:
    pp = PurePosixPath(p)
    if not p or pp.is_absolute() or Path(p).is_absolute() or ".." in pp.parts:
        raise MsrError(f"{manifest}: {what} {p!r} must be a relative path without '..'; rebuild the manifest")
    return p


def _check_inside(manifest: Path, files: list[tuple[Path, Path]]) -> None:
    """Refuse a file whose resolved path (symlinks followed) leaves its root: a link out of the library."""
    resolved: dict[Path, Path] = {}  # folder -> its resolved form: one realpath per folder, not per file

    def real(d: Path) -> Path:
        if d not in resolved:
            resolved[d] = d.resolve()
        return resolved[d]

    for path, root in files:
        where = path.resolve() if path.is_symlink() else real(path.parent) / path.name
        if not where.is_relative_to(real(root)):
            raise MsrError(f"{manifest}: {path} resolves to {where}, outside its root {root}; "
                           "replace the link with the file itself, or rebuild the library")


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB; MsrError naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise MsrError(f"{path}: not a readable image ({e})") from e


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> 3, H, W float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def hr_target(hr: Image.Image, scale: int) -> Image.Image:
    """An HR crop at the model's output side 16*scale (bicubic when it is not already)."""
    size = LR_SIZE * scale
    return hr if hr.size == (size, size) else hr.resize((size, size), Image.BICUBIC)


def degrade(hr: Image.Image, scale: int) -> tuple[Image.Image, Image.Image]:
    """HR crop -> (HR at 16*scale, bicubic 16x16 LR of it).

    Not `refbuild.embed.degrade` (down by `scale` and back up, at the crop's own side: the
    library's LR view for retrieval): this one is the model's input, always 16x16. The two
    agree (after upsampling this LR) only on crops of side 16*scale, so both are kept."""
    hr = hr_target(hr, scale)
    return hr, hr.resize((LR_SIZE, LR_SIZE), Image.BICUBIC)


def framed(im: Image.Image, zoom: float, cx: float = 0.5, cy: float = 0.5,
           shift: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """The square of side side/zoom centred at (cx, cy) of the free range (0.5: centred), then moved so the
    face moves by shift = (dx, dy) of that side (> 0: right, down): zoom > 1 comes closer (a crop), zoom < 1
    steps back; wherever the square leaves the photo its edges are mirrored outward. zoom 1, no shift: as is."""
    if zoom == 1.0 and shift == (0.0, 0.0):
        return im
    w, h = im.size
    side = max(1, round(min(w, h) / zoom))
    x0, y0 = (round((n - side) * c) if side <= n else round((side - n) * c) - (side - n) for n, c in ((w, cx), (h, cy)))
    x0, y0 = x0 - round(shift[0] * side), y0 - round(shift[1] * side)
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    if pad:  # mirror the edges outward
        im = Image.fromarray(np.pad(np.asarray(im), ((pad, pad), (pad, pad), (0, 0)), mode="symmetric"))
        x0, y0 = x0 + pad, y0 + pad
    return im.crop((x0, y0, x0 + side, y0 + side))


def _jittered(im: Image.Image, jitter: float, rng: random.Random) -> Image.Image:
    """A random square of side (1 - u * jitter) * min(W, H), u ~ U(0, 1), at a random place (jitter 0: as is)."""
    if jitter <= 0:
        return im
    w, h = im.size
    side = max(1, round(min(w, h) * (1 - rng.random() * jitter)))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    return im.crop((x0, y0, x0 + side, y0 + side))


def _shuffle_grid(refs: list[Image.Image], n: int, rng: random.Random) -> list[Image.Image]:
    """Cut each image into an n x n grid of blocks and permute the blocks (one permutation per call)."""
    if not refs:
        return refs
    size = refs[0].size[0]
    b = size // n
    perm = list(range(n * n))
    rng.shuffle(perm)
    out = []
    for im in refs:
        new = im.copy()
        for dst, src in enumerate(perm):
            sy, sx = divmod(src, n)
            dy, dx = divmod(dst, n)
            new.paste(im.crop((sx * b, sy * b, sx * b + b, sy * b + b)), (dx * b, dy * b))
        out.append(new)
    return out


@dataclass(frozen=True)
class Row:
    face_id: str
    identity: str | None
    hr: Path
    refs: tuple[Path, ...]


class ManifestDataset(Dataset):
    """Samples of a training manifest: dict(lr, hr, refs, ref_mask, index).

    Args:
        manifest: path of a `training_manifest` Parquet file.
        scale: 4, 8 or 16; HR targets are 16*scale square.
        num_refs: references per sample (0..5); missing ones are zero with mask False.
        refs: "matched" (the manifest's), "random" (HR crops of other identities in
            this manifest), "none", "oracle" (the HR target itself as every reference:
            an upper bound) or "shuffled" (the matched references with their 4x4 grid
            of blocks permuted: tests whether spatial correspondence is used).
        data_root: replaces both metadata roots when given.
        flip: random horizontal flip, the same for HR and references.
        seed: seed of the per-sample randomness.
        jitter: framing jitter (training): HR and each reference are cut from a random
            square of side (1 - u * jitter) of the crop, u ~ U(0, 1), at a random place.
        check_files: verify every file exists up front.
        degradation: how the LR is made from the HR (`model.degradations` preset: bicubic, real,
            real_mild, camera, harsh), drawn per sample from (seed, key): reproducible, independent of the
            other per-sample randomness.
        framing: (lo, hi) training zoom range: the HR is re-framed at a zoom ~ U(lo, hi) (> 1 closer,
            < 1 farther), at a random position; None: as cropped.
        shift: training: the face is also moved by U(-shift, shift) of the side along each axis
            (edges mirrored; `framed`); 0: not moved.
        zoom: evaluation: every HR centre-framed at this zoom (see `framed`).
        offset: evaluation: every face moved down by this fraction of the side (the standard aligned
            CelebA test crops hold the face ~0.075 lower than `refbuild detect --aligned` crops).
    Raises:
        ManifestError: wrong schema or unreadable manifest.
        MsrError: missing roots, unsafe relative paths, missing files.
    """

    def __init__(
        self,
        manifest: str | Path,
        scale: int,
        num_refs: int = 4,
        refs: RefMode = "matched",
        data_root: str | Path | None = None,
        flip: bool = False,
        seed: int = 0,
        check_files: bool = True,
        jitter: float = 0.0,
        degradation: str = "bicubic",
        framing: tuple[float, float] | None = None,
        zoom: float = 1.0,
        shift: float = 0.0,
        offset: float = 0.0,
    ):
        manifest = Path(manifest)
        if degradation not in degradations.PRESETS:
            raise MsrError(f"degradation must be one of {', '.join(degradations.PRESETS)}, got {degradation!r}")
        if framing is not None and not (0.5 <= framing[0] <= framing[1] <= 2.0):
            raise MsrError(f"framing must be lo,hi with 0.5 <= lo <= hi <= 2, got {framing}")
        if not 0.5 <= zoom <= 2.0:
            raise MsrError(f"zoom must be in [0.5, 2], got {zoom}")
        if not (0.0 <= shift <= 0.25 and -0.25 <= offset <= 0.25):
            raise MsrError(f"shift must be in [0, 0.25] and offset in [-0.25, 0.25], got {shift}, {offset}")
        if not 0 <= num_refs <= 5:
            raise MsrError(f"num_refs must be in 0..5, got {num_refs}")
        if refs not in REF_MODES:
            raise MsrError(f"refs must be one of {', '.join(REF_MODES)}, got {refs!r}")
        if not 0.0 <= jitter < 0.5:
            raise MsrError(f"jitter must be in [0, 0.5), got {jitter}")
        table = read_table(manifest, "training_manifest")
        meta = metadata(manifest)
        roots = {}
        for key in ("hr_root", "ref_root"):
            root = Path(data_root) if data_root is not None else meta.get(key)
            if root is None:
                raise MsrError(f"{manifest}: metadata key {key!r} is missing; pass --data-root")
            roots[key] = Path(root)
            if not roots[key].is_absolute():
                raise MsrError(f"{manifest}: {key} {str(root)!r} must be an absolute path; pass --data-root")
        cols = table.to_pydict()
        null_refs = [f for f, rps in zip(cols["face_id"], cols["ref_paths"]) if rps is None]
        if null_refs:
            raise MsrError(f"{manifest}: {len(null_refs)} row(s) with null ref_paths, first {null_refs[0]}; "
                           "rebuild the manifest with `refbuild pair`")
        self.rows = [
            Row(
                face_id=fid,
                identity=ident,
                hr=roots["hr_root"] / _safe_rel(hp, "hr_path", manifest),
                refs=tuple(roots["ref_root"] / _safe_rel(r, "ref_path", manifest) for r in (rps or [])),
            )
            for fid, ident, hp, rps in zip(cols["face_id"], cols["identity"], cols["hr_path"], cols["ref_paths"])
        ]
        if not self.rows:
            raise MsrError(f"{manifest}: the manifest has no rows")
        if check_files:
            needed = [(r.hr, roots["hr_root"]) for r in self.rows] + (
                [(p, roots["ref_root"]) for r in self.rows for p in r.refs[:num_refs]] if refs in ("matched", "shuffled") else [])
            missing = [p for p, _ in needed if not p.is_file()]
            if missing:
                raise MsrError(
                    f"{manifest}: {len(missing)} image file(s) missing, first {missing[0]}; check hr_root/ref_root or --data-root"
                )
            _check_inside(manifest, needed)
        self.scale, self.num_refs, self.ref_mode, self.flip, self.seed = scale, num_refs, refs, flip, seed
        self.jitter, self.degradation, self.framing, self.zoom = jitter, degradation, framing, zoom
        self.shift, self.offset = shift, offset
        self.ref_view = meta.get("query_view")  # which view of the query chose its references (hr | lr)
        splits = set(cols.get("split") or [])
        self.split = splits.pop() if len(splits) == 1 else None
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.rows)

    def _rng(self, key: int | str) -> random.Random:
        h = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return random.Random(int.from_bytes(h[:8], "little"))

    def degradation_at(self, key: int) -> degradations.Degradation:
        """The degradation of sample `key`: a pure function of (seed, key)."""
        return degradations.sample(self.degradation, self._rng(f"degradation:{key}"), self.scale)

    def _ref_paths(self, row: Row, rng: random.Random) -> list[Path]:
        if self.ref_mode in ("none", "oracle") or self.num_refs == 0:
            return []
        if self.ref_mode in ("matched", "shuffled"):
            return list(row.refs[: self.num_refs])
        others = [r.hr for r in self.rows if r.identity is None or r.identity != row.identity]
        return rng.sample(others, min(self.num_refs, len(others)))

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        """key = epoch * len(self) + row (plain row index for evaluation)."""
        row = self.rows[key % len(self.rows)]
        rng = self._rng(key)
        flip = self.flip and rng.random() < 0.5
        im = framed(load_rgb(row.hr), self.zoom, shift=(0.0, self.offset))
        if self.framing is not None or self.shift:  # its own stream: the other per-sample draws stay as they were
            frng = self._rng(f"framing:{key}")
            zoom, cx, cy = frng.uniform(*self.framing) if self.framing else 1.0, frng.random(), frng.random()
            shift = (frng.uniform(-self.shift, self.shift), frng.uniform(-self.shift, self.shift)) if self.shift else (0.0, 0.0)
            im = framed(im, zoom, cx, cy, shift)
        hr = hr_target(_jittered(im, self.jitter, rng), self.scale)
        lr = degradations.apply(hr, self.degradation_at(key))  # bicubic: the same bytes as `degrade`
        size = hr.size[0]
        refs = []
        for p in self._ref_paths(row, rng):
            im = _jittered(load_rgb(p), self.jitter, rng)
            refs.append(im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC))
        if self.ref_mode == "oracle":
            refs = [hr] * self.num_refs
        elif self.ref_mode == "shuffled":
            refs = _shuffle_grid(refs, 4, rng)
        if flip:
            hr = hr.transpose(Image.FLIP_LEFT_RIGHT)
            lr = lr.transpose(Image.FLIP_LEFT_RIGHT)
            refs = [r.transpose(Image.FLIP_LEFT_RIGHT) for r in refs]
        ref_t = torch.zeros(self.num_refs, 3, size, size)
        mask = torch.zeros(self.num_refs, dtype=torch.bool)
        for i, r in enumerate(refs):
            ref_t[i], mask[i] = to_tensor(r), True
        return {"lr": to_tensor(lr), "hr": to_tensor(hr), "refs": ref_t, "ref_mask": mask,
                "index": torch.tensor(key % len(self.rows))}


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of sample keys for steps [start_step, total_steps).

    Epoch e is a permutation seeded by (seed, e); a global batch of
    `batch_size * world_size` keys never crosses an epoch (drop_last), so step k
    always sees the same keys, with or without a resume. Under data-parallel
    training rank r takes the contiguous slice [r*batch_size, (r+1)*batch_size) of
    it: N ranks with batch b see exactly what one process with batch N*b sees.
    """

    def __init__(self, n: int, batch_size: int, seed: int, total_steps: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise MsrError(f"rank {rank} is outside world size {world_size}")
        if n < batch_size * world_size:
            per = f" ({world_size} processes x {batch_size})" if world_size > 1 else ""
            raise MsrError(f"the manifest has {n} rows, fewer than the batch size {batch_size * world_size}{per}; "
                           "lower --batch-size")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.total = start_step, total_steps
        self.global_bs = batch_size * world_size
        self.offset = rank * batch_size
        self.per_epoch = n // self.global_bs

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        perm, perm_epoch = None, -1
        for step in range(self.start, self.total):
            epoch, k = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            lo = k * self.global_bs + self.offset
            yield [epoch * self.n + int(i) for i in perm[lo : lo + self.bs]]


__all__ = ["ManifestDataset", "ResumableBatchSampler", "ManifestError", "degrade", "load_rgb", "to_tensor"]
