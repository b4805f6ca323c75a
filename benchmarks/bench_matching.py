"""matching (EM, Eq. 4): model.matching's exact and coarse-to-fine searches vs the
simplest full correlation (unfold + one matmul + argmax), over feature-map size and
number of references; checks that the path the model ships is never slower than the alternatives."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import Stage, peak_mb, reset_peak, torch_profile

C = 64  # paper width (msrnet_x8 / x16)
GRID = {"quick": ((16, (1, 3)), (32, (1, 3))), "default": ((16, (1, 3, 5)), (32, (1, 3, 5)), (48, (1, 2, 3)), (64, (1, 2, 3, 5))),
        "full": ((16, (1, 2, 3, 4, 5)), (32, (1, 2, 3, 4, 5)), (64, (1, 2, 3, 4, 5)))}


def max_exact() -> int:
    """MSRNet's default max_exact_match: the size above which match_patches goes coarse-to-fine."""
    import inspect

    from model.msrnet import MSRNet

    return inspect.signature(MSRNet.__init__).parameters["max_exact_match"].default


def naive(lr: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Every 3x3 patch against every reference patch, all at once. lr: B,C,h,w; refs: B,M,C,H,W."""
    B, M, Cc, H, W = refs.shape
    q = F.normalize(F.unfold(lr, 3, padding=1), dim=1)  # B, C*9, h*w
    k = F.normalize(F.unfold(refs.reshape(B * M, Cc, H, W), 3, padding=1), dim=1)  # B*M, C*9, H*W
    k = k.reshape(B, M, Cc * 9, H * W).permute(0, 2, 1, 3).reshape(B, Cc * 9, M * H * W)  # B, C*9, M*H*W
    return (q.transpose(1, 2) @ k).argmax(dim=-1)  # B, h*w


def paths(lr: torch.Tensor, refs: torch.Tensor):
    from model.matching import coarse_to_fine_match, exact_match, normalized_patches

    B, M, Cc, H, W = refs.shape
    h, w = lr.shape[-2:]

    def prep():
        q = normalized_patches(lr)
        keys = normalized_patches(refs.reshape(B * M, Cc, H, W)).reshape(B, M, H * W, -1)
        return q, keys

    def exact():
        return exact_match(*prep())

    def c2f():
        q, keys = prep()
        return coarse_to_fine_match(q, keys, (h, w), (H, W))

    return {"naive": lambda: naive(lr, refs), "exact": exact, "coarse_to_fine": c2f}


def run(mode: str, repeats: int) -> Stage:
    st = Stage("matching", "naive full correlation: unfold + one matmul + argmax (written in the bench)",
               "model.matching exact_match (chunked bmm) / coarse_to_fine_match, whichever match_patches ships at that size",
               "the shipped path is never the slower of exact / coarse-to-fine; cost and memory vs size and m")
    torch.manual_seed(0)
    limit = max_exact()
    same, shipped_ok, head = True, True, None
    with torch.no_grad():
        for size, ms in GRID[mode]:
            for m in ms:
                lr = torch.randn(1, C, size, size)
                refs = lr[:, None].repeat(1, m, 1, 1, 1) + 0.5 * torch.randn(1, m, C, size, size)
                fns = paths(lr, refs)
                reps = 15 if size <= 16 else max(5, repeats) if size <= 32 else max(2, repeats - 2)  # ms-scale calls need many
                secs = {k: [] for k in fns}
                peaks = {k: 0.0 for k in fns}
                outs = {}
                for k, fn in fns.items():
                    outs[k] = fn()  # warm-up
                for r in range(reps):
                    for k, fn in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
                        reset_peak()
                        t0 = time.perf_counter()
                        outs[k] = fn()
                        secs[k].append(time.perf_counter() - t0)
                        peaks[k] = max(peaks[k], peak_mb())
                med = {k: statistics.median(v) for k, v in secs.items()}
                shipped = "exact" if size * size <= limit else "coarse_to_fine"
                other = min((k for k in secs if k != shipped), key=lambda k: min(secs[k]))  # the fastest alternative
                agree = float((outs["exact"] == outs["naive"]).float().mean())
                c2f_agree = float((outs["coarse_to_fine"] == outs["exact"]).float().mean())
                best = {k: min(v) for k, v in secs.items()}  # min: the least disturbed by other jobs
                slower = best[shipped] > 1.10 * best[other] + 0.002  # 10% + 2 ms margin for timing noise
                shipped_ok &= not slower
                same &= agree >= 0.999  # argmax ties under float rounding aside
                p = {"size": size, "m": m, "shipped": shipped, "repeats": reps,
                     **{f"{k}_median_s": round(v, 4) for k, v in med.items()},
                     **{f"{k}_spread_pct": round(100 * (max(secs[k]) - min(secs[k])) / med[k], 1) for k in secs},
                     **{f"{k}_peak_rss_mb": round(v, 1) for k, v in peaks.items()},
                     "exact_vs_naive_agree": round(agree, 5), "c2f_vs_exact_agree": round(c2f_agree, 4),
                     "shipped_is_slower": slower}
                if slower:
                    p["warning"] = f"SHIPPED PATH SLOWER: {shipped} {best[shipped]:.4f}s vs {other} {best[other]:.4f}s (fastest of {reps})"
                    print(f"  WARNING matching size {size} m {m}: {p['warning']}", flush=True)
                st.points.append(p)
                head = (p, secs)
    p, secs = head  # headline: the largest size and m run
    sh = p["shipped"]
    st.ratio = round(p["naive_median_s"] / p[f"{sh}_median_s"], 3)
    st.same_answer = same
    st.met = same and shipped_ok
    st.ours_timing = {"median_s": p[f"{sh}_median_s"], "spread_pct": p[f"{sh}_spread_pct"], "repeats": p["repeats"],
                      "peak_rss_mb": p[f"{sh}_peak_rss_mb"], "at": f"size {p['size']}, m {p['m']} ({sh})"}
    st.baseline_timing = {"median_s": p["naive_median_s"], "spread_pct": p["naive_spread_pct"], "repeats": p["repeats"],
                          "peak_rss_mb": p["naive_peak_rss_mb"], "at": f"size {p['size']}, m {p['m']}"}
    st.notes += [f"C={C} (paper width), B=1, random features; refs = the LR map + noise so matches are meaningful",
                 f"shipped = exact while the reference map has <= {limit} positions Hr*Wr (MSRNet max_exact_match), else coarse-to-fine (block 8, radius 4)",
                 "same answer = exact_match indices equal to the naive argmax (>= 99.9% of positions; ties under rounding)",
                 "coarse-to-fine is approximate by design: its agreement with exact is reported, not required",
                 "'slower' compares the fastest repeat of the shipped path with the fastest of the other two (naive included), "
                 "with a 10% + 2 ms margin for noise: exact_match is the naive product chunked to bound memory, so the two tie"]
    lr = torch.randn(1, C, 32, 32)
    refs = torch.randn(1, 3, C, 32, 32)
    st.profile = torch_profile(paths(lr, refs)["exact"])
    return st
