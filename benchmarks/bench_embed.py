"""embed: refbuild's EmbedWorker through LocalRunner (workers = cores, one torch thread
each, batch 32, threaded PNG decode: what `refbuild embed` does) vs a naive per-image
VGG-16 forward (batch 1, torch default threads). Random weights: timing only."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Stage, crops_dir, side_by_side, torch_profile

SIZES = {"quick": 2, "default": 48, "full": 256}


def pick_crops(n: int) -> list[Path]:
    return sorted(crops_dir().rglob("*.png"))[:n]


def ours(paths: list[Path], workers: int, shard: int, dim: int) -> np.ndarray:
    from data_manifests import read_table
    from pipelines.runners import LocalRunner
    from refbuild import shards
    from refbuild.embed import EmbedConfig, EmbedWorker

    with tempfile.TemporaryDirectory() as d:
        cfg = EmbedConfig(lib=Path(d), weights="random", device="cpu", batch_size=32)
        tasks = [(i, [p.stem for p in paths[s : s + shard]], paths[s : s + shard]) for i, s in enumerate(range(0, len(paths), shard))]
        sum(LocalRunner(workers).map(EmbedWorker, (cfg, "hr", 2, dim, Path(d)), tasks))
        cols = [read_table(shards.shard_file(Path(d), i, "features"), "features").column("features") for i, *_ in tasks]
    return np.concatenate([np.asarray(c.combine_chunks().values.to_numpy(zero_copy_only=False)).reshape(-1, dim) for c in cols])


def _startup(workers: int, dim: int) -> None:
    """Spawn the pool and build one backbone per worker, on empty shards: the fixed cost of a run."""
    from pipelines.runners import LocalRunner
    from refbuild.embed import EmbedConfig, EmbedWorker

    with tempfile.TemporaryDirectory() as d:
        cfg = EmbedConfig(lib=Path(d), weights="random", device="cpu", batch_size=32)
        sum(LocalRunner(workers).map(EmbedWorker, (cfg, "hr", 2, dim, Path(d)), [(i, [], []) for i in range(workers)]))


def baseline(paths: list[Path], backbone, split: dict) -> np.ndarray:
    import torch
    from PIL import Image

    from refbuild.embed import describe

    out = []
    for p in paths:
        t0 = time.perf_counter()
        with Image.open(p) as im:
            x = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)[None]  # 1, 3, S, S
        t1 = time.perf_counter()
        out.append(describe(backbone.maps(x), 2, "l2").numpy())
        split["decode"] += t1 - t0
        split["model"] += time.perf_counter() - t1
    return np.concatenate(out)


def run(mode: str, repeats: int) -> Stage:
    import torch

    from refbuild.backbones import build_backbone

    workers = os.cpu_count() or 1
    st = Stage("embed", f"per-image VGG-16 forward, batch 1, torch default threads ({torch.get_num_threads()})",
               f"refbuild EmbedWorker via LocalRunner, {workers} workers x 1 torch thread, batch 32 (spawn + model build included)",
               ">= 2x on CPU, features allclose",
               isolation="one process; ours spawns worker processes (their peak RSS reported apart)")
    paths = pick_crops(SIZES[mode])
    backbone = build_backbone("vggface", "random")
    dim = 4608
    shard = max(1, -(-len(paths) // workers))  # one shard per worker
    split = {"decode": 0.0, "model": 0.0}
    t_o, t_b, a_o, a_b = side_by_side(lambda: ours(paths, workers, shard, dim), lambda: baseline(paths, backbone, split),
                                      1 if mode == "quick" else min(repeats, 3), warmup=0, children=True)
    t0 = time.perf_counter()
    _startup(workers, dim)
    startup = time.perf_counter() - t0
    same = a_o.shape == a_b.shape and np.allclose(a_o, a_b, rtol=1e-4, atol=1e-5)
    st.ratio = round(t_b.median / t_o.median, 3)
    st.same_answer = bool(same)
    st.met = bool(same) and st.ratio >= 2.0
    st.ours_timing, st.baseline_timing = t_o.summary(), t_b.summary()
    n_calls = len(t_b.seconds)
    st.notes += [
        "RANDOM VGG-16 weights (build_backbone('vggface', 'random')): timing only, features are not VGGFace's",
        f"{len(paths)} real 256 px crops from the celeba_facecrops library, dim {dim}; max |diff| {float(np.abs(a_o - a_b).max()):.2e}",
        f"baseline time split: decode {100 * split['decode'] / (split['decode'] + split['model']):.1f}%, "
        f"model (resize + VGG + pool) {100 * split['model'] / (split['decode'] + split['model']):.1f}% "
        f"({1000 * split['model'] / (n_calls * len(paths)):.0f} ms/face)",
        f"fixed cost of our path (spawn {workers} workers, import torch, build VGG-16; timed on empty shards): {startup:.1f} s; "
        f"steady-state ratio without it: {t_b.median / max(t_o.median - startup, 1e-9):.2f}x (indicative)",
    ]
    torch.set_num_threads(1)
    x = torch.zeros(8, 3, 256, 256, dtype=torch.uint8)
    st.profile = torch_profile(lambda: backbone.maps(x))
    return st
