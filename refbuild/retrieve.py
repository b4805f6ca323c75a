"""References for new LR faces from a built library (used by `model infer --library`).

The LR face is upsampled bicubically to the crop size and embedded with the
library's own backbone and options: the same "LR view" that `pair
--query-view lr` matches on. There is no identity to exclude for an unseen
face, so the top-m of the pool are returned, one per photo: as `refbuild pair`
does, a candidate that is the same photo as one already picked (the same
sha256, or a near-duplicate crop, `refbuild.dupes`) is skipped for the next.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_manifests import metadata
from refbuild.backbones import build_backbone
from refbuild.detector import Detector, resolve_device
from refbuild.detect import crop_face, square_box
from refbuild.dupes import NEAR_DUP_CORR, thumbnails
from refbuild.embed import describe
from refbuild.errors import RefbuildError
from refbuild.library import Library
from refbuild.knn import L1Index
from refbuild.pair import load_side


@dataclass(frozen=True)
class Reference:
    face_id: str
    path: Path  # absolute path of the 256x256 crop
    identity: str | None
    distance: float


class OnePerPhoto:
    """Keeps candidates in order, skipping one that is the same photo as one kept already: the same
    source sha256, or a near-duplicate crop (16x16 thumbnails correlating above NEAR_DUP_CORR), the
    test `refbuild pair` applies. Thumbnails are made only for candidates, once each."""

    def __init__(self, paths: list[Path], shas: list[str | None]):
        self.paths, self.shas = paths, shas
        self._thumbs: dict[int, np.ndarray] = {}

    def _thumb(self, i: int) -> np.ndarray:
        if i not in self._thumbs:
            self._thumbs[i] = thumbnails([self.paths[i]])[0]
        return self._thumbs[i]

    def pick(self, rows: list[int], m: int) -> list[int]:
        kept: list[int] = []
        for i in rows if m > 0 else ():
            if any(self.shas[i] is not None and self.shas[i] == self.shas[k] for k in kept) or any(
                    float(self._thumb(i) @ self._thumb(k)) > NEAR_DUP_CORR for k in kept):
                continue
            kept.append(i)
            if len(kept) == m:
                break
        return kept


def open_library(lib_root: Path) -> Library:
    """The library at `lib_root`; one line saying what is wrong when the folder is not one."""
    lib = Library(lib_root)
    if not lib_root.is_dir():
        raise RefbuildError(f"{lib_root}: library folder not found; give the folder `refbuild detect --out` wrote")
    if not lib.faces.is_file():
        raise RefbuildError(f"{lib_root}: not a refbuild library (no faces.parquet); give the folder "
                            "`refbuild detect --out` wrote, embedded with `refbuild embed`")
    return lib


def retrieve(lib_root: Path, faces: list[Image.Image], m: int = 4, weights: str | None = None,
             pool: str = "train", device: str = "auto") -> list[list[Reference]]:
    """Top-m references in the library for each LR face (any size, RGB), at most one per photo."""
    lib = open_library(lib_root)
    cfg_path = lib.require(lib.config("embed"), "embed")
    cfg = json.loads(cfg_path.read_text())
    backbone = build_backbone(cfg["backbone"], weights or cfg.get("weights"), cfg.get("weights_sha256"),
                              tuple(cfg["layers"]))
    meta = metadata(lib.require(lib.features("hr"), "embed"))
    if backbone.weights_id != meta.get("weights_id"):
        raise RefbuildError(f"{lib.features('hr')}: embedded with weights {meta.get('weights_id')}, "
                            f"but the weights given are {backbone.weights_id}; pass the same --weights")
    dev = torch.device(resolve_device(device))
    backbone.to(dev)
    side = load_side(lib, "hr", need_splits=False)
    rows = np.array([i for i, s in enumerate(side.split) if pool == "all" or s == "train"] or range(len(side.split)))
    size = 256
    x = torch.from_numpy(np.stack([np.asarray(f.convert("RGB").resize((size, size), Image.BICUBIC)) for f in faces]))
    maps = backbone.maps(x.permute(0, 3, 1, 2).to(dev), meta.get("precision", "fp32"))  # per layer B, C_l, H_l, W_l
    q = describe(maps, int(meta["grid"]), meta["layer_norm"]).cpu().numpy()
    index = L1Index(side.feats[rows], device)
    photos = OnePerPhoto([lib.safe_path(side.crop[j]) for j in rows], [side.sha[j] for j in rows])
    k = min(4 * m + 8, index.k_max)  # room for the copies skipped
    dist, idx = index.search(q, k)
    out = []
    for r in range(len(faces)):
        d, i = dist[r], idx[r]
        kept = photos.pick([int(j) for j in i if j >= 0], m)
        if len(kept) < m and k < index.k_max:  # rare: many copies among the nearest; search wider
            d, i = (a[0] for a in index.search(q[r : r + 1], index.k_max))
            kept = photos.pick([int(j) for j in i if j >= 0], m)
        at = {int(j): float(x) for x, j in zip(d, i) if j >= 0}
        out.append([Reference(side.face_ids[rows[j]], photos.paths[j], side.identity[rows[j]], at[j]) for j in kept])
    return out


def best_face_crops(images: list[Image.Image], size: int = 256, margin: float = 0.0,
                    device: str = "auto") -> list[Image.Image | None]:
    """The most confident face of each photo as a square RGB crop, as `refbuild detect` cuts it (None where no
    face). The MTCNN cascade itself is `refbuild.nets.mtcnn.detect_faces`, behind `refbuild.detector.Detector`."""
    det = Detector(device=device)
    out: list[Image.Image | None] = []
    for img, res in zip(images, det.detect(images)):
        if isinstance(res, Exception) or len(res) == 0:
            out.append(None)
            continue
        out.append(crop_face(img, square_box(res.boxes[0], margin), size).convert("RGB"))  # no PNG round-trip
    return out
