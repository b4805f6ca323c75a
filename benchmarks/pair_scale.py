"""Pair at scale: exact L1 (the blocked kernel) against IVF-Flat L1, time and recall, on synthetic features.

    python -m benchmarks.pair_scale [--sizes 10000,30000,100000] [--dims 4608] [--queries 1000] [--out DIR]
    python -m benchmarks.pair_scale --ray-workers 2 [--sizes ...]   # also `pair --engine ray`'s search path

Features: a mixture of 500 Gaussian clusters (centres U(0, 1), spread 0.15) in `--dims`
dimensions, float32, like per-layer-normalised descriptors in scale but not in
structure: recall on real features is what each `pair --index ivf` run measures itself.
For each pool size N, `--queries` queries drawn from the same mixture are searched
(k = 16) exactly and with IVF (nlist = min(auto, 256), nprobe 8/16/32, k-means on at
most 64 x nlist rows); times are per query and extrapolated to N queries (an N x N
pairing), which is linear in the number of queries for both searches.

With `--ray-workers W`, the same queries also go through the Ray engine's path (a local Ray
instance, W actors, the pool through the object store once, query chunks of
`--ray-chunk` as tasks, one thread per actor): its wall time includes the actors' start and
the pool's transfer: `ray_one_query_run_s` (a run of one query) and `ray_run_s` (all
`--queries`) give the fixed cost and, by their difference, the marginal time per query.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def mixture(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    pick = rng.integers(0, len(centres), n)
    return (centres[pick] + rng.normal(0, 0.15, (n, d))).astype(np.float32)


class _Search:
    """The Ray rows' worker: exact L1 over the pool, one query chunk per task (as `refbuild.pair.PairSearch`)."""

    def __init__(self, pool: np.ndarray, q: np.ndarray, k: int):
        from refbuild.knn import L1Index

        self.index, self.q, self.k = L1Index(pool, "cpu"), q, k

    def __call__(self, rows: tuple[int, int]) -> int:
        self.index.search(self.q[rows[0] : rows[1]], self.k)
        return rows[1] - rows[0]


def ray_time(pool: np.ndarray, q: np.ndarray, k: int, workers: int, chunk: int) -> tuple[float, float]:
    """(seconds of a one-query run: actors' start, pool transfer, index; seconds of the run over all of q)
    of W Ray actors searching q in chunks. Each run starts its own actors."""
    from refbuild.runners.ray_actors import RayRunner

    runner = RayRunner(workers)
    t = time.perf_counter()
    sum(runner.map(_Search, (pool, q, k), [(0, 1)]))
    setup = time.perf_counter() - t
    tasks = [(s, min(s + chunk, len(q))) for s in range(0, len(q), chunk)]
    t = time.perf_counter()
    assert sum(runner.map(_Search, (pool, q, k), tasks)) == len(q)
    return setup, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--dims", type=int, default=4608)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--ray-workers", type=int, default=0, help="also time the Ray engine's path with this many actors")
    ap.add_argument("--ray-chunk", type=int, default=250)
    a = ap.parse_args(argv)
    from refbuild.knn import IVFL1Index, L1Index, auto_nlist

    rng = np.random.default_rng(0)
    centres = rng.random((500, a.dims), dtype=np.float32)
    q = mixture(a.queries, a.dims, rng, centres)
    L1Index(q[:64], "cpu").search(q[:8], 4)  # compile the numba kernel outside the timings
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        pool = mixture(n, a.dims, rng, centres)
        t = time.perf_counter()
        _, exact = L1Index(pool, "cpu").search(q, a.k)
        t_exact = (time.perf_counter() - t) / a.queries
        if a.ray_workers:
            setup, t_run = ray_time(pool, q, a.k, a.ray_workers, a.ray_chunk)
            marginal = max(0.0, t_run - setup) / a.queries  # the run's time beyond a one-query run's
            rows.append({"N": n, "dims": a.dims, "ray_workers": a.ray_workers, "queries": a.queries,
                         "ray_one_query_run_s": round(setup, 1), "ray_run_s": round(t_run, 1),
                         "ray_marginal_ms_per_query": round(1e3 * marginal, 2),
                         "exact_ms_per_query": round(1e3 * t_exact, 2), "ray_NxN_s": round(setup + marginal * n, 1)})
            print(json.dumps(rows[-1]), flush=True)
        nlist = min(auto_nlist(n), 256)
        t = time.perf_counter()
        index = IVFL1Index(pool, nlist=nlist, train_per_list=64)
        t_build = time.perf_counter() - t
        for nprobe in (8, 16, 32):
            index.index.nprobe = nprobe
            t = time.perf_counter()
            _, got = index.search(q, a.k)
            t_ivf = (time.perf_counter() - t) / a.queries
            recall = float(np.mean([len(set(g) & set(e)) / a.k for g, e in zip(got, exact)]))
            rows.append({"N": n, "dims": a.dims, "nlist": nlist, "nprobe": nprobe, "build_s": round(t_build, 1),
                         "exact_ms_per_query": round(1e3 * t_exact, 2), "ivf_ms_per_query": round(1e3 * t_ivf, 2),
                         "exact_NxN_s": round(t_exact * n, 1), "ivf_NxN_s": round(t_build + t_ivf * n, 1),
                         "recall_at_k": round(recall, 4)})
            print(json.dumps(rows[-1]), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "pair_scale.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
