"""train: samples/s of one optimiser step (forward, L1 loss, backward, clip, Adam) for
MSRNet x8 / x16, tiny and paper widths, batch 4. Baseline fp32 eager; ours is what
model/train.py runs: on CUDA bf16 autocast (+ channels_last here); on CPU train.py runs
fp32 eager too, so the CPU ratio is ~1 by construction (said in the notes)."""
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


def batch(model, device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    S = model.out_size
    lr = torch.rand(BATCH, 3, 16, 16, generator=g)
    refs = torch.rand(BATCH, M, 3, S, S, generator=g)
    hr = torch.rand(BATCH, 3, S, S, generator=g)
    return lr.to(device), refs.to(device), torch.ones(BATCH, M, dtype=torch.bool, device=device), hr.to(device)


def make_step(model, data, device, fast: bool):
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    lr, refs, mask, hr = data
    if fast:
        model.to(memory_format=torch.channels_last)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast)

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
    st = Stage("train", "fp32 eager step", "bf16 autocast + channels_last (CUDA)" if fast else
               "model/train.py's step on CPU = fp32 eager (bf16 + channels_last SKIPPED on CPU)",
               "samples/s reported at x8 and x16; on GPU bf16 + channels_last faster with the first-step loss within 2%")
    same, head = True, None
    for name in VARIANTS[mode]:
        steps = 1 if mode == "quick" else (1 if name.startswith("msrnet_x") else 2) if mode == "default" else repeats - 2
        torch.manual_seed(0)
        base_model = create_model(name).to(device).train()
        ours_model = copy.deepcopy(base_model)
        data = batch(base_model, device)
        s_b, s_o = make_step(base_model, data, device, False), make_step(ours_model, data, device, fast)
        l_b, l_o = s_b(), s_o()  # warm-up step; its loss is the same-answer check (same init, same batch)
        ok = abs(l_b - l_o) <= (0.02 * abs(l_b) if fast else 1e-6 * max(1.0, abs(l_b)))
        same &= ok
        secs = {"ours": [], "baseline": []}
        peaks = {"ours": 0.0, "baseline": 0.0}
        for r in range(steps):
            for k, fn in ((("ours", s_o), ("baseline", s_b)) if r % 2 == 0 else (("baseline", s_b), ("ours", s_o))):
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
             **{f"{k}_spread_pct": round(100 * (max(v) - min(v)) / med[k], 1) for k, v in secs.items()},
             **{f"{k}_peak_mb" + ("_cuda" if fast else "_rss"): round(v, 1) for k, v in peaks.items()}}
        st.points.append(p)
        head = (p, med, secs, peaks)
        del base_model, ours_model
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
        st.notes.append("CPU: bf16 + channels_last SKIPPED (train.py autocasts on CUDA only); ratio ~1 by construction, bar not applicable")
    torch.manual_seed(0)
    m = create_model(VARIANTS[mode][0]).to(device).train()
    st.profile = torch_profile(make_step(m, batch(m, device), device, fast))
    return st
