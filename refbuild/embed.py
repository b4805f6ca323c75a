"""Stage 2, `refbuild embed LIB`: multi-layer VGGFace features into Parquet.

Paper (Sec. II-A): "the pre-trained VGGFace network is used to extract
multi-layer features F^l ... l set to 5, 17 and 29". Full maps are ~8 MB per
face, so each layer map is average-pooled to a `grid x grid` layout (faces are
aligned crops, so the layout carries meaning), flattened, optionally
L2-normalised per layer, and the layers are concatenated. The per-layer slices
are stored in the file metadata so `pair` can weight them (Eq. 2).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from data_manifests import features_schema, read_table
from refbuild import shards
from refbuild.backbones import PAPER_LAYERS, Backbone, build_backbone
from refbuild.errors import RefbuildError
from refbuild.io import config_dict, library_lock, outputs_together, resolved_config, write_json, write_table
from refbuild.library import Library
from refbuild.torchutil import resolve_precision
from refbuild.progress import bar, summary
from refbuild.stale import fingerprints, stamp
from refbuild.runners import Runner, make_runner, resolve_workers

RUNTIME_FIELDS = ("device", "batch_size", "quiet", "overwrite", "weights", "workers", "engine")


@dataclass(frozen=True)
class EmbedConfig:
    lib: Path
    backbone: str = "vggface"  # a name registered in refbuild.backbones.BACKBONES
    weights: str | None = None  # path to vgg_face_dag.pth, or "random" (tests only)
    weights_sha256: str | None = None
    layers: tuple[int, ...] = PAPER_LAYERS
    grid: int | None = None  # None: the backbone's default (vggface 2, hog 8, pixels 16)
    layer_norm: Literal["l2", "none"] = "l2"
    views: tuple[str, ...] = ("hr",)  # "hr": the crop; "lr": the crop degraded x lr_scale and back
    lr_scale: int = 8
    shard_size: int = 1024
    batch_size: int = 32
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    workers: int = 0  # processes (local engine) or actors (ray engine); 0: one per core on CPU
    engine: str = "local"
    quiet: bool = False
    overwrite: bool = False


def degrade(img: Image.Image, scale: int) -> Image.Image:
    """The query's own LR view: bicubic down by `scale`, then bicubic back up (same size as `img`).

    Not `model.data.degrade`, on purpose: that one makes the model's fixed 16x16 input (HR first
    resized to 16*scale, then down to 16x16) and returns it small; this one keeps the crop's own
    side (a 256 crop at x8 goes 256 -> 32 -> 256) so the backbone sees the LR view at the library's
    crop size. They agree byte for byte only on crops of side 16*scale (checked on demo and random
    crops of 64/128/256 px at x4/x8); elsewhere they differ by up to ~80 grey levels."""
    s = img.size[0]
    return img.resize((s // scale, s // scale), Image.BICUBIC).resize((s, s), Image.BICUBIC)


def load_crops(paths: list[Path], view: str, lr_scale: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    def one(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise RefbuildError(f"{p}: face crop unreadable ({e}); rerun `refbuild detect` for this library") from None
        if view == "lr":
            img = degrade(img, lr_scale)
        return np.asarray(img, dtype=np.uint8)

    arrs = list(pool.map(one, paths))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # B, 3, S, S uint8


def describe(maps: list[torch.Tensor], grid: int, layer_norm: str) -> torch.Tensor:
    """Pool each layer map to grid x grid, flatten, normalise, concatenate: B, D."""
    parts = []
    for m in maps:  # B, C, H, W
        v = F.adaptive_avg_pool2d(m, grid).flatten(1)  # B, C*grid*grid
        if layer_norm == "l2":
            v = F.normalize(v, dim=1)
        parts.append(v)
    return torch.cat(parts, dim=1)


def layer_slices(backbone: Backbone, grid: int) -> list[tuple[int, int]]:
    """Each layer's [start, end) in the concatenated vector: from the backbone's channels, no forward pass."""
    dims = [c * grid * grid for c in backbone.channels]
    starts = np.cumsum([0] + dims)
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def process_shard(face_ids: list[str], paths: list[Path], cfg: EmbedConfig, backbone: Backbone, grid: int,
                  view: str, device: torch.device, pool: ThreadPoolExecutor, dim: int) -> pa.Table:
    out = []
    for s in range(0, len(paths), cfg.batch_size):
        x = load_crops(paths[s : s + cfg.batch_size], view, cfg.lr_scale, pool).to(device)
        maps = backbone.maps(x, resolve_precision(cfg.precision, device))
        out.append(describe(maps, grid, cfg.layer_norm).cpu().numpy().astype(np.float32))
    flat = np.concatenate(out).reshape(-1) if out else np.zeros(0, np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    return pa.Table.from_arrays([pa.array(face_ids, pa.string()), col], schema=features_schema(dim))


class EmbedWorker:
    """Built once per worker (loads the backbone); called on one shard
    (index, face ids, crop paths): writes its features and done-marker."""

    def __init__(self, cfg: EmbedConfig, view: str, grid: int, dim: int, wdir: Path):
        from refbuild.detector import resolve_device

        self.cfg, self.view, self.grid, self.dim, self.wdir = cfg, view, grid, dim, wdir
        self.device = torch.device(resolve_device(cfg.device))
        self.backbone = build_backbone(cfg.backbone, cfg.weights, cfg.weights_sha256, cfg.layers).to(self.device)
        self.pool = ThreadPoolExecutor(4)  # PNG decoding overlaps the forward passes

    def __call__(self, task: tuple[int, list[str], list[Path]]) -> int:
        index, ids, paths = task
        t = process_shard(ids, paths, self.cfg, self.backbone, self.grid, self.view, self.device, self.pool, self.dim)
        write_table(shards.shard_file(self.wdir, index, "features"), t, "features")
        shards.mark_done(self.wdir, index)
        return len(ids)


def run(cfg: EmbedConfig, runner: Runner | None = None) -> dict:
    from refbuild.detector import resolve_device

    lib = Library(cfg.lib)
    faces = read_table(lib.require(lib.faces, "detect"), "faces", columns=["face_id", "crop_path"])
    if faces.num_rows == 0:
        raise RefbuildError(f"{lib.faces}: no faces to embed; check {lib.rejects} for why")
    bad_views = set(cfg.views) - {"hr", "lr"}
    if bad_views:
        raise RefbuildError(f"unknown view(s) {sorted(bad_views)}; use hr and/or lr")
    # described, not loaded: the network is built in each worker, the driver needs its sizes and weights_id
    backbone = build_backbone(cfg.backbone, cfg.weights, cfg.weights_sha256, cfg.layers, load=False)
    device = torch.device(resolve_device(cfg.device))
    grid = cfg.grid or backbone.default_grid
    slices = layer_slices(backbone, grid)
    dim = slices[-1][1]
    ids = faces.column("face_id").to_pylist()
    paths = [lib.safe_path(p) for p in faces.column("crop_path").to_pylist()]
    meta = {
        "backbone": backbone.name, "weights_id": backbone.weights_id, "note": backbone.note,
        "layers": json.dumps(backbone.layer_names), "slices": json.dumps(slices), "grid": str(grid),
        "layer_norm": cfg.layer_norm, "lr_scale": str(cfg.lr_scale), "dim": str(dim),
        "precision": resolve_precision(cfg.precision, device),
    }
    inputs = fingerprints(lib.root, [lib.faces])
    meta |= stamp(inputs, f"refbuild embed {{lib}} --backbone {cfg.backbone} --views {','.join(cfg.views)}")
    stats: dict = {"faces": len(ids), "dim": dim, "backbone": backbone.name, "weights": backbone.note,
                   "precision": meta["precision"]}
    t0 = time.perf_counter()
    processed = 0
    runner_workers = resolve_workers(cfg.workers, cfg.device, backbone.needs_model)
    runner = runner or make_runner(cfg.engine, runner_workers, cfg.device)
    with library_lock(lib.root, "embed"):
        for view in cfg.views:
            wdir = shards.work_dir(lib.root, f"embed-{view}")
            fp = config_dict(cfg) | {"view": view, "weights_id": backbone.weights_id, "grid": grid}
            for k in RUNTIME_FIELDS + ("views", "lib"):
                fp.pop(k, None)
            shards.prepare(wdir, fp, cfg.overwrite, inputs=inputs)
            parts = shards.chunks(len(ids), cfg.shard_size)
            tasks = [(i, [ids[j] for j in r], [paths[j] for j in r])
                     for i, r in enumerate(parts) if not shards.is_done(wdir, i)]
            with bar(cfg.quiet) as prog:
                task = prog.add_task(f"embed {view}", total=len(ids),
                                     completed=len(ids) - sum(len(t[1]) for t in tasks))
                for n in runner.map(EmbedWorker, (cfg, view, grid, dim, wdir), tasks):
                    processed += n
                    prog.advance(task, n)
        with outputs_together():  # every view's features and the config: all or none
            for view in cfg.views:
                wdir = shards.work_dir(lib.root, f"embed-{view}")
                n_parts = len(shards.chunks(len(ids), cfg.shard_size))
                table = pa.concat_tables([read_table(shards.shard_file(wdir, i, "features"), "features")
                                          for i in range(n_parts)])
                write_table(lib.features(view), table, "features", meta | {"view": view})
                del table
            used = resolved_config(cfg, device=str(device), workers=runner_workers, engine=cfg.engine)
            write_json(lib.config("embed"), used | {"grid": grid, "dim": dim, "weights_id": backbone.weights_id,
                                                    "note": backbone.note})
        for view in cfg.views:
            shards.finish(shards.work_dir(lib.root, f"embed-{view}"))
    elapsed = time.perf_counter() - t0
    stats |= {"views": ",".join(cfg.views), "embedded_now": processed, "seconds": round(elapsed, 1),
              "faces_per_s": round(processed / elapsed, 2) if processed else None}
    summary(f"refbuild embed -> {lib.root}", list(stats.items()), cfg.quiet)
    return stats
