"""Shared bench helpers: timing over repeats, peak memory, where the real faces are.

Every bench returns one `Stage` record. Ours and the baseline run in the same
process, repeats interleaved (ours, baseline, ours, ...) so that load from other
jobs hits both alike; the ratio of medians is the figure to read, not seconds.
Peak memory is the process's resident high-water mark (VmHWM) reset before each
path (`/proc/self/clear_refs`), plus the largest worker process's peak where a
path starts workers (`RUSAGE_CHILDREN`).
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """A bench that cannot run here; the message says why."""


def faces_root() -> Path:
    return Path(os.environ.get("MSRFACE_FACES", REPO.parent / "shared" / "faces"))


def require_faces(subdir: str) -> Path:
    p = faces_root() / subdir
    if not p.is_dir():
        raise Skip(f"{p} not found: set MSRFACE_FACES to the shared/faces folder")
    return p


def crops_dir() -> Path:
    p = Path(os.environ.get("MSRFACE_CROPS", "/work/libs/celeba_facecrops/crops"))
    if not p.is_dir():
        raise Skip(f"{p} not found: set MSRFACE_CROPS to the crops/ of a library built from celeba_facecrops")
    return p


def reset_peak() -> None:
    """Reset VmHWM so the next `peak_mb` covers only what runs after this."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: peaks then cover the whole process
        pass


def peak_mb() -> float:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) / 1024 if m else float("nan")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak_mb() -> float:
    """The largest peak RSS of any finished child process of this run (max, not sum)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    child_peak_mb: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> dict:
        s = sorted(self.seconds)
        return {"median_s": round(self.median, 4), "min_s": round(s[0], 4), "max_s": round(s[-1], 4),
                "spread_pct": round(100 * (s[-1] - s[0]) / self.median, 1) if self.median > 0 else 0.0,
                "repeats": len(s), "peak_rss_mb": round(self.peak_mb, 1),
                **({"worker_peak_rss_mb": round(self.child_peak_mb, 1)} if self.child_peak_mb is not None else {})}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(paths: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                children: tuple[str, ...] = ()) -> dict[str, tuple[Timing, Any]]:
    """Warm up every path, then time `repeats` rounds, each path once per round, the order
    reversed every other round so that load from other jobs hits all alike.
    Returns each path's timing and last answer. `children`: the paths that start worker processes
    (their largest worker peak is recorded)."""
    timings = {k: Timing() for k in paths}
    answers = {k: None for k in paths}
    for _ in range(warmup):
        answers = {k: fn() for k, fn in paths.items()}
    order = list(paths)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            reset_peak()
            s, answers[k] = timed(paths[k])
            t = timings[k]
            t.seconds.append(s)
            t.peak_mb = max(t.peak_mb, peak_mb())
            if k in children:
                t.child_peak_mb = child_peak_mb()
    return {k: (timings[k], answers[k]) for k in paths}


def side_by_side(ours: Callable[[], Any], base: Callable[[], Any], repeats: int, warmup: int = 1,
                 children: bool = False) -> tuple[Timing, Timing, Any, Any]:
    """`interleaved` for ours and a baseline: (ours timing, baseline timing, ours answer, baseline answer)."""
    r = interleaved({"ours": ours, "baseline": base}, repeats, warmup, ("ours",) if children else ())
    return r["ours"][0], r["baseline"][0], r["ours"][1], r["baseline"][1]


@dataclass
class Stage:
    """One stage's record in the results JSON."""

    stage: str
    baseline: str
    ours: str
    bar: str
    ratio: float | None = None  # baseline median / ours median (> 1: ours faster)
    same_answer: bool | None = None
    met: bool | None = None
    baseline_timing: dict | None = None
    ours_timing: dict | None = None
    isolation: str = "one process, repeats interleaved"
    notes: list[str] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)  # curves (pair, matching, train, infer)
    profile: list[str] = field(default_factory=list)  # top entries of a profile of our path
    skipped: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def torch_profile(fn: Callable[[], Any], top: int = 8) -> list[str]:
    """Top operators of one call, by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs) or 1
    return [f"{e.key}: {100 * e.self_cpu_time_total / total:.1f}% self CPU ({e.count} calls)" for e in avgs[:top]]


def cprofile(fn: Callable[[], Any], top: int = 8) -> list[str]:
    """Top functions of one call, by cumulative-excluded (tottime) seconds (cProfile)."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.runcall(fn)
    st = pstats.Stats(pr)
    total = st.total_tt or 1
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # (cc, nc, tt, ct, callers)
    return [f"{Path(f).name}:{ln} {name}: {100 * v[2] / total:.1f}% self ({v[1]} calls)" for (f, ln, name), v in rows]
