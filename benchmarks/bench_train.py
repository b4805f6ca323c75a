"""train: samples/s of one optimiser step (forward, L1 loss, backward, clip, Adam) for
MSRNet x8 / x16, tiny and paper widths, batch 4. Baseline fp32 eager (NCHW); ours is what
model/train.py runs by default: channels_last, with bf16 autocast on CUDA and fp32 on CPU.
On CPU `--precision bf16` (channels_last + bf16 autocast) is timed beside them."""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import Stage, peak_mb, reset_peak, torch_profile

VARIANTS = {"quick": ("msrnet_tiny_x8",),
            "default": ("msrnet_tiny_x8", "msrnet_tiny_x16", "msrnet_x8", "msrnet_x16"),
            "full": ("msrnet_tiny_x8", "msrnet_tiny_x16", "msrnet_x8", "msrnet_x16")}
BATCH, M = 4, 4


SHIPPED = ("msrnet2_x8", 8)  # the shipped x8 recipe: model, batch (weights/README.md)
TODAY = ("msrnet_x8", 4)  # the default before it: `model train` with msrnet_x8, batch 4, fp32


def batch(model, device, b: int = BATCH) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    S = model.out_size
    lr = torch.rand(b, 3, 16, 16, generator=g)
    refs = torch.rand(b, M, 3, S, S, generator=g)
    hr = torch.rand(b, 3, S, S, generator=g)
    return lr.to(device), refs.to(device), torch.ones(b, M, dtype=torch.bool, device=device), hr.to(device)


def make_step(model, data, device, channels_last: bool, bf16: bool, fused: bool = False):
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=fused)
    lr, refs, mask, hr = data
    if channels_last:
        model.to(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> float:
        with amp:
            sr = model(lr, refs, mask)
            loss = F.l1_loss(sr.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step


def run(mode: str, repeats: int) -> Stage:
    from model.registry import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast = device.type == "cuda"
    st = Stage("train", "fp32 eager step (NCHW)", "model/train.py's default: channels_last + bf16 autocast (CUDA)" if fast else
               "model/train.py's default on CPU: channels_last, fp32 (and --precision bf16 beside it)",
               "samples/s reported at x8 and x16; on GPU bf16 + channels_last faster with the first-step loss within 2%")
    same, head = True, None
    for name in VARIANTS[mode]:
        steps = 1 if mode == "quick" else (1 if name.startswith("msrnet_x") else 2) if mode == "default" else repeats - 2
        torch.manual_seed(0)
        base_model = create_model(name).to(device).train()
        data = batch(base_model, device)
        fns = {"ours": make_step(copy.deepcopy(base_model), data, device, True, fast),
               **({} if fast else {"bf16": make_step(copy.deepcopy(base_model), data, device, True, True)}),
               "baseline": make_step(base_model, data, device, False, False)}
        first = {k: fn() for k, fn in fns.items()}  # warm-up step; its loss is the same-answer check (same init, same batch)
        l_b, l_o = first["baseline"], first["ours"]
        ok = abs(l_b - l_o) <= (0.02 * abs(l_b) if fast else 1e-5 * max(1.0, abs(l_b)))
        same &= ok
        secs = {k: [] for k in fns}
        peaks = {k: 0.0 for k in fns}
        for r in range(steps):
            for k, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
                reset_peak()
                if fast:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                fn()
                secs[k].append(time.perf_counter() - t0)
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() / 2**20 if fast else peak_mb())
        med = {k: statistics.median(v) for k, v in secs.items()}
        p = {"variant": name, "out_size": base_model.out_size, "batch": BATCH, "refs": M, "timed_steps": steps,
             "ours_samples_per_s": round(BATCH / med["ours"], 3), "baseline_samples_per_s": round(BATCH / med["baseline"], 3),
             "ratio": round(med["baseline"] / med["ours"], 3), "first_loss_ours": l_o, "first_loss_baseline": l_b, "same_loss": ok,
             **({} if fast else {"bf16_samples_per_s": round(BATCH / med["bf16"], 3), "bf16_ratio": round(med["baseline"] / med["bf16"], 3),
                                 "bf16_first_loss_rel_diff": float(f"{abs(first['bf16'] - l_b) / abs(l_b):.1e}")}),
             **{f"{k}_spread_pct": round(100 * (max(v) - min(v)) / med[k], 1) for k, v in secs.items()},
             **{f"{k}_peak_mb" + ("_cuda" if fast else "_rss"): round(v, 1) for k, v in peaks.items()}}
        st.points.append(p)
        head = (p, med, secs, peaks)
        del base_model, fns
    if mode != "quick":
        st.points.append(shipped_vs_today(device, 2 if mode == "default" else repeats))
    p, med, secs, peaks = head
    st.ratio = p["ratio"]
    st.same_answer = same
    st.met = same and (st.ratio >= 1.0 if fast else True)
    for k in ("ours", "baseline"):
        t = {"median_s": round(med[k], 4), "spread_pct": p[f"{k}_spread_pct"], "repeats": len(secs[k]),
             "peak_rss_mb" if not fast else "peak_cuda_mb": round(peaks[k], 1), "at": p["variant"]}
        setattr(st, f"{k}_timing", t)
    st.notes += ["synthetic batches (uniform noise, 4 refs at the output size): model compute only, no data loading",
                 f"one warm-up step, then {p['timed_steps']} timed steps per path, interleaved; headline = {p['variant']}",
                 *(["quick: tiny x8 only (x16 and paper widths in the default run)"] if mode == "quick" else [])]
    if not fast:
        st.notes.append("CPU: ours = channels_last fp32 (the default); bf16_* columns = `model train --precision bf16` "
                        "(channels_last + bf16 autocast, opt-in on CPU), first-step loss vs fp32 in bf16_first_loss_rel_diff")
    if mode != "quick":
        sp = st.points[-1]
        st.notes.append(f"shipped recipe vs today's default, side by side: {sp['variant']} {sp['ours_samples_per_s']} "
                        f"samples/s vs {sp['baseline_samples_per_s']} = {sp['ratio']}x")
    torch.manual_seed(0)
    m = create_model(VARIANTS[mode][0]).to(device).train()
    st.profile = torch_profile(make_step(m, batch(m, device), device, True, fast))
    return st


def shipped_vs_today(device, steps: int) -> dict:
    """samples/s of the shipped x8 training step (msrnet2_x8, batch 8, channels_last fp32: what
    `model train` runs for weights/msrnet2_x8) against today's default (msrnet_x8, batch 4, fp32 NCHW), interleaved."""
    from model.registry import create_model

    torch.manual_seed(0)
    ship, old = create_model(SHIPPED[0]).to(device).train(), create_model(TODAY[0]).to(device).train()
    fns = {"ours": (make_step(ship, batch(ship, device, SHIPPED[1]), device, True, False), SHIPPED[1]),
           "baseline": (make_step(old, batch(old, device, TODAY[1]), device, False, False), TODAY[1])}
    for fn, _ in fns.values():
        fn()  # warm-up
    secs = {k: [] for k in fns}
    for r in range(steps):
        for k, (fn, _) in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            t0 = time.perf_counter()
            fn()
            secs[k].append(time.perf_counter() - t0)
    rate = {k: fns[k][1] / statistics.median(v) for k, v in secs.items()}
    return {"variant": f"{SHIPPED[0]} (batch {SHIPPED[1]}) vs {TODAY[0]} (batch {TODAY[1]})", "out_size": ship.out_size,
            "batch": SHIPPED[1], "refs": M, "timed_steps": steps, "ours_samples_per_s": round(rate["ours"], 3),
            "baseline_samples_per_s": round(rate["baseline"], 3), "ratio": round(rate["ours"] / rate["baseline"], 2),
            "same_loss": None}
