"""embed: refbuild's EmbedWorker through LocalRunner (workers = cores, one torch thread
each, batch 32, channels_last, threaded PNG decode: what `refbuild embed` does), in fp32
(the CPU default) and with --precision bf16, vs a naive per-image VGG-16 forward (batch 1,
NCHW fp32, torch default threads). Random weights: timing only."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Stage, crops_dir, interleaved, torch_profile

SIZES = {"quick": 2, "default": 128, "full": 512}


def pick_crops(n: int) -> list[Path]:
    return sorted(crops_dir().rglob("*.png"))[:n]


def ours(paths: list[Path], workers: int, shard: int, dim: int, precision: str = "auto") -> np.ndarray:
    from data_manifests import read_table
    from refbuild.runners.local import LocalRunner
    from refbuild import shards
    from refbuild.embed import EmbedConfig, EmbedWorker

    with tempfile.TemporaryDirectory() as d:
        cfg = EmbedConfig(lib=Path(d), weights="random", device="cpu", batch_size=32, precision=precision)
        tasks = [(i, [p.stem for p in paths[s : s + shard]], paths[s : s + shard]) for i, s in enumerate(range(0, len(paths), shard))]
        sum(LocalRunner(workers).map(EmbedWorker, (cfg, "hr", 2, dim, Path(d)), tasks))
        cols = [read_table(shards.shard_file(Path(d), i, "features"), "features").column("features") for i, *_ in tasks]
    return np.concatenate([np.asarray(c.combine_chunks().values.to_numpy(zero_copy_only=False)).reshape(-1, dim) for c in cols])


def _startup(workers: int, dim: int) -> None:
    """Spawn the pool and build one backbone per worker, on empty shards: the fixed cost of a run."""
    from refbuild.runners.local import LocalRunner
    from refbuild.embed import EmbedConfig, EmbedWorker

    with tempfile.TemporaryDirectory() as d:
        cfg = EmbedConfig(lib=Path(d), weights="random", device="cpu", batch_size=32)
        sum(LocalRunner(workers).map(EmbedWorker, (cfg, "hr", 2, dim, Path(d)), [(i, [], []) for i in range(workers)]))


def naive_maps(module, taps: tuple[int, ...], x):
    """The plain forward: uint8 1,3,S,S -> resize to 224, subtract the mean, VGG-16 layers in NCHW fp32."""
    import torch
    import torch.nn.functional as F

    from refbuild.nets.vggface import VGGFACE_MEAN_RGB, VGGFACE_SIZE

    with torch.inference_mode():
        x = F.interpolate(x.float(), size=(VGGFACE_SIZE, VGGFACE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = x - torch.tensor(VGGFACE_MEAN_RGB).view(1, 3, 1, 1)
        out = []
        for i, layer in enumerate(module[: max(taps) + 1]):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out


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
        out.append(describe(naive_maps(backbone.module, backbone.taps, x), 2, "l2").numpy())
        split["decode"] += t1 - t0
        split["model"] += time.perf_counter() - t1
    return np.concatenate(out)


def _nn_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of rows whose k nearest other rows (L1) are the same set under features a and b."""
    from refbuild.l1kernel import topk

    k = min(k, len(a) - 1)
    ia, ib = topk(a, a, k + 1)[1][:, 1:], topk(b, b, k + 1)[1][:, 1:]
    return float(np.mean([set(x) == set(y) for x, y in zip(ia, ib)]))


def run(mode: str, repeats: int) -> Stage:
    import torch

    from refbuild.backbones import build_backbone

    from refbuild.runners.local import start_method

    workers = os.cpu_count() or 1
    st = Stage("embed", f"per-image VGG-16 forward, batch 1, NCHW fp32, torch default threads ({torch.get_num_threads()})",
               f"refbuild EmbedWorker via LocalRunner, {workers} workers x 1 torch thread, batch 32, channels_last, fp32 "
               "(the CPU default; worker start + model build included)",
               ">= 2x on CPU, features allclose",
               isolation="one process; ours starts worker processes (their peak RSS reported apart)")
    paths = pick_crops(SIZES[mode])
    backbone = build_backbone("vggface", "random")
    dim = 4608
    shard = max(1, -(-len(paths) // workers))  # one shard per worker
    split = {"decode": 0.0, "model": 0.0}
    reps = 1 if mode == "quick" else min(repeats, 3)
    res = interleaved({"ours": lambda: ours(paths, workers, shard, dim), "bf16": lambda: ours(paths, workers, shard, dim, "bf16"),
                       "baseline": lambda: baseline(paths, backbone, split)}, reps, warmup=0, children=("ours", "bf16"))
    (t_o, a_o), (t_16, a_16), (t_b, a_b) = res["ours"], res["bf16"], res["baseline"]
    t0 = time.perf_counter()
    _startup(workers, dim)
    startup = time.perf_counter() - t0
    same = a_o.shape == a_b.shape and np.allclose(a_o, a_b, rtol=1e-4, atol=1e-5)
    st.ratio = round(t_b.median / t_o.median, 3)
    st.same_answer = bool(same)
    st.met = bool(same) and st.ratio >= 2.0
    st.ours_timing, st.baseline_timing = t_o.summary(), t_b.summary()
    n_calls = len(t_b.seconds)
    bf16_vs_fp32 = t_o.median / t_16.median
    rel = np.abs(a_16 - a_b).max() / np.abs(a_b).max()
    nn_same = _nn_agreement(a_16, a_b, 5)
    st.points.append({"path": "ours fp32 (default on CPU)", "ratio_vs_baseline": st.ratio, "median_s": round(t_o.median, 2), "max_rel_diff": float(f"{np.abs(a_o - a_b).max() / np.abs(a_b).max():.1e}"), "top5_neighbours_same": 1.0})
    st.points.append({"path": "ours --precision bf16", "ratio_vs_baseline": round(t_b.median / t_16.median, 3), "median_s": round(t_16.median, 2),
                      "max_rel_diff": float(f"{rel:.1e}"), "top5_neighbours_same": round(nn_same, 3)})
    st.notes += [
        f"--precision bf16 (opt-in on CPU, the default on CUDA): {bf16_vs_fp32:.2f}x our fp32 path, timed side by side with it, "
        f"and {t_b.median / t_16.median:.2f}x the baseline; features within {100 * rel:.1f}% (max |diff| / max |feature|), "
        f"the same L1 top-5 neighbours among these {len(paths)} faces for {100 * nn_same:.1f}% of faces",
        "RANDOM VGG-16 weights (build_backbone('vggface', 'random')): timing only, features are not VGGFace's",
        f"{len(paths)} real 256 px crops from the celeba_facecrops library, dim {dim}; max |diff| {float(np.abs(a_o - a_b).max()):.2e}",
        f"baseline time split: decode {100 * split['decode'] / (split['decode'] + split['model']):.1f}%, "
        f"model (resize + VGG + pool) {100 * split['model'] / (split['decode'] + split['model']):.1f}% "
        f"({1000 * split['model'] / (n_calls * len(paths)):.0f} ms/face)",
        f"fixed cost of our path (start {workers} workers ({start_method()}), build VGG-16; timed on empty shards): {startup:.1f} s; "
        f"steady-state ratio without it: {t_b.median / max(t_o.median - startup, 1e-9):.2f}x (indicative)",
    ]
    torch.set_num_threads(1)
    x = torch.zeros(8, 3, 256, 256, dtype=torch.uint8)
    backbone.to(torch.device("cpu"))  # channels_last weights, as in the workers
    st.profile = torch_profile(lambda: backbone.maps(x))
    return st
