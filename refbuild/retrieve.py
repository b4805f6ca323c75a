"""References for new LR faces from a built library (used by `model infer --library`).

The LR face is upsampled bicubically to the crop size and embedded with the
library's own backbone and options: the same "LR view" that `pair
--query-view lr` matches on. There is no identity to exclude for an unseen
face, so the top-m of the pool are returned.
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


def retrieve(lib_root: Path, faces: list[Image.Image], m: int = 4, weights: str | None = None,
             pool: str = "train", device: str = "auto") -> list[list[Reference]]:
    """Top-m references in the library for each LR face (any size, RGB)."""
    lib = Library(lib_root)
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
    dist, idx = L1Index(side.feats[rows], device).search(q, m)
    return [[Reference(side.face_ids[rows[j]], lib.safe_path(side.crop[rows[j]]), side.identity[rows[j]], float(d))
             for d, j in zip(dist[r], idx[r]) if j >= 0] for r in range(len(faces))]


def best_face_crops(images: list[Image.Image], size: int = 256, margin: float = 0.0,
                    device: str = "auto") -> list[Image.Image | None]:
    """The most confident face of each photo as a square RGB crop, as `refbuild detect` cuts it (None where no
    face). The MTCNN cascade itself is `refbuild.mtcnn.detect_faces`, behind `refbuild.detector.Detector`."""
    det = Detector(device=device)
    out: list[Image.Image | None] = []
    for img, res in zip(images, det.detect(images)):
        if isinstance(res, Exception) or len(res) == 0:
            out.append(None)
            continue
        out.append(crop_face(img, square_box(res.boxes[0], margin), size).convert("RGB"))  # no PNG round-trip
    return out
