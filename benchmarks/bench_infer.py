"""infer: MSRNet forward on real faces as `model infer` runs it (channels_last; batch 16 on
CUDA, 1 on CPU, where batch 16 measured slower) vs one face at a time in plain NCHW;
faces/s over batch sizes, latency p50/p95 of a single face. One pass per face: `model infer`'s
default self-ensemble (`model/ensemble.py`) runs two, so its faces/s are about half these."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch

from benchmarks.common import Stage, crops_dir, side_by_side, torch_profile

SETUP = {"quick": ("msrnet_tiny_x4", 16), "default": ("msrnet_x8", 16), "full": ("msrnet_x8", 64)}
M = 4
CURVE = (1, 4, 16)


def load(n: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n LR faces (16x16) and for each the next 4 crops as references, from real crops."""
    from PIL import Image

    paths = sorted(crops_dir().rglob("*.png"))[: n + M]
    if len(paths) < n + M:
        from benchmarks.common import Skip

        raise Skip(f"{crops_dir()}: {len(paths)} crops, {n + M} needed")

    def t(p, s):
        with Image.open(p) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), np.float32) / 255).permute(2, 0, 1)

    lr = torch.stack([t(p, 16) for p in paths[:n]])  # n, 3, 16, 16
    hr = [t(p, out) for p in paths]
    refs = torch.stack([torch.stack(hr[i + 1 : i + 1 + M]) for i in range(n)])  # n, M, 3, out, out
    return lr, refs


def run(mode: str, repeats: int) -> Stage:
    from model.registry import create_model

    name, n = SETUP[mode]
    torch.manual_seed(0)
    model = create_model(name).eval()
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    batch = 16 if torch.cuda.is_available() else 1  # model/infer.py's default
    st = Stage("infer", "one face per forward call, NCHW", f"model/infer.py's default here: channels_last, {batch} face(s) per call",
               "faces/s batched, p50/p95 latency of one face")
    lr, refs = load(n, model.out_size)

    def ours(bs: int = batch):
        with torch.no_grad():
            return torch.cat([fast(lr[s : s + bs], refs[s : s + bs]) for s in range(0, n, bs)])

    lat: list[float] = []

    def base():
        outs = []
        with torch.no_grad():
            for i in range(n):
                t0 = time.perf_counter()
                outs.append(model(lr[i : i + 1], refs[i : i + 1]))
                lat.append(time.perf_counter() - t0)
        return torch.cat(outs)

    t_o, t_b, a_o, a_b = side_by_side(ours, base, repeats, warmup=1)
    curve = {}
    for bs in CURVE:  # faces/s by batch size (channels_last), after one warm-up call
        ours(bs)
        t0 = time.perf_counter()
        ours(bs)
        curve[bs] = round(n / (time.perf_counter() - t0), 2)
    lat = lat[n:]  # drop the warm-up round
    diff = float((a_o - a_b).abs().max())
    # batch 16 vs batch 1 picks other conv kernels (oneDNN): same answer = at most one uint8 level apart
    st.same_answer = bool(diff <= 1 / 255)
    st.ratio = round(t_b.median / t_o.median, 3)
    st.met = st.same_answer
    st.ours_timing, st.baseline_timing = t_o.summary(), t_b.summary()
    q = np.percentile(lat, [50, 95])
    st.points.append({"model": name, "faces": n, "batch": batch, "faces_per_s_ours": round(n / t_o.median, 2),
                      "faces_per_s_one_at_a_time_nchw": round(n / t_b.median, 2),
                      **{f"faces_per_s_batch_{bs}": v for bs, v in curve.items()},
                      "latency_one_face_p50_ms": round(1000 * q[0], 1), "latency_one_face_p95_ms": round(1000 * q[1], 1),
                      "max_abs_diff": diff})
    st.notes += [f"{name} with RANDOM weights (timing only), {n} real celeba_facecrops faces at 16x16, {M} real crops as refs each; "
                 "model forward only (no PNG decode/encode)",
                 f"ours {n / t_o.median:.2f} faces/s vs one at a time (NCHW) {n / t_b.median:.2f}; one face p50 {1000 * q[0]:.1f} ms, "
                 f"p95 {1000 * q[1]:.1f} ms; max |diff| {diff:.1e} (same answer: <= 1/255, one uint8 level)"]
    st.notes.append("faces/s by batch size, channels_last: " + ", ".join(f"{bs}: {v}" for bs, v in curve.items())
                    + " (one timed call each; on CPU larger batches push the 128x128 feature maps out of cache)")
    st.profile = torch_profile(ours)
    return st
