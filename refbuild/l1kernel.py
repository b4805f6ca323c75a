"""Exact L1 distances and top-k on CPU: a cache- and register-blocked kernel (numba).

Why our own kernel: FAISS's flat L1 (`IndexFlat(METRIC_L1)`) compares each query
with every pool row in turn, so each row is pulled from memory once per query:
the loop is memory bound (about 7e9 dimension-ops/s on 2 cores, 6-10x slower than
its L2, which is a GEMM). Here a 4 x 4 tile of query and pool rows is compared in
one pass over the dimensions: each loaded value serves four absolute differences
held in 16 register accumulators, and tasks of 32 queries x 128 pool rows keep
the pool block in cache. LLVM vectorises the dimension loop (fastmath lets it
reorder the sums, like FAISS's SIMD loop does). Measured on the 2-core dev box:
4-5e10 dimension-ops/s, 5-7x FAISS, with the same top-k up to float ties
(`make bench`, pair row). The answer is exact; only the summation order differs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

TILE_Q, TILE_P = 32, 128  # rows of queries / pool per parallel task
OUT_BUDGET = 256 << 20  # bytes of distances held per query chunk in `topk`


# cache=False on purpose: code loaded from numba's on-disk cache summed in another order than the
# freshly compiled code (seen: different last bits), which broke byte-identical resume between a
# first run and a rerun. Compiling in every process costs ~1 s and gives the same bits every time.
@njit(parallel=True, fastmath=True, cache=False)
def _l1_into(q, p, out):  # q: n, D; p: N, D; out: n, N (float32, C-contiguous)
    n, dim = q.shape
    npool = p.shape[0]
    nbq = (n + TILE_Q - 1) // TILE_Q
    nbp = (npool + TILE_P - 1) // TILE_P
    for t in prange(nbq * nbp):
        i0 = (t // nbp) * TILE_Q
        j0 = (t % nbp) * TILE_P
        i1 = min(n, i0 + TILE_Q)
        j1 = min(npool, j0 + TILE_P)
        for i in range(i0, i1, 4):
            for j in range(j0, j1, 4):
                if i + 3 < i1 and j + 3 < j1:  # full 4 x 4 tile: 16 accumulators
                    s00 = s01 = s02 = s03 = np.float32(0.0)
                    s10 = s11 = s12 = s13 = np.float32(0.0)
                    s20 = s21 = s22 = s23 = np.float32(0.0)
                    s30 = s31 = s32 = s33 = np.float32(0.0)
                    for d in range(dim):
                        b0 = p[j, d]
                        b1 = p[j + 1, d]
                        b2 = p[j + 2, d]
                        b3 = p[j + 3, d]
                        a = q[i, d]
                        s00 += abs(a - b0)
                        s01 += abs(a - b1)
                        s02 += abs(a - b2)
                        s03 += abs(a - b3)
                        a = q[i + 1, d]
                        s10 += abs(a - b0)
                        s11 += abs(a - b1)
                        s12 += abs(a - b2)
                        s13 += abs(a - b3)
                        a = q[i + 2, d]
                        s20 += abs(a - b0)
                        s21 += abs(a - b1)
                        s22 += abs(a - b2)
                        s23 += abs(a - b3)
                        a = q[i + 3, d]
                        s30 += abs(a - b0)
                        s31 += abs(a - b1)
                        s32 += abs(a - b2)
                        s33 += abs(a - b3)
                    out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = s00, s01, s02, s03
                    out[i + 1, j], out[i + 1, j + 1], out[i + 1, j + 2], out[i + 1, j + 3] = s10, s11, s12, s13
                    out[i + 2, j], out[i + 2, j + 1], out[i + 2, j + 2], out[i + 2, j + 3] = s20, s21, s22, s23
                    out[i + 3, j], out[i + 3, j + 1], out[i + 3, j + 2], out[i + 3, j + 3] = s30, s31, s32, s33
                else:  # ragged edge of the task
                    for ii in range(i, min(i + 4, i1)):
                        for jj in range(j, min(j + 4, j1)):
                            s = np.float32(0.0)
                            for d in range(dim):
                                s += abs(q[ii, d] - p[jj, d])
                            out[ii, jj] = s


def l1_distances(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """All L1 distances. q: n, D; p: N, D -> n, N float32."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    p = np.ascontiguousarray(p, dtype=np.float32)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"l1_distances needs n x D and N x D arrays, got {q.shape} and {p.shape}")
    out = np.empty((len(q), len(p)), np.float32)
    if out.size:
        _l1_into(q, p, out)
    return out


def _keeping_torch_threads(fn, *args):
    """Call fn; numba's first parallel call starts an OpenMP pool that also resets torch's
    thread count in this process (seen: 1 -> 2), and fp32 training results depend on it."""
    import torch

    n = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def topk(q: np.ndarray, p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of p for each row of q by L1, nearest first, ties by row (like FAISS).
    Queries go in chunks so that at most OUT_BUDGET bytes of distances are held.
    Returns (n, k) float32 distances and (n, k) int64 rows; k is capped at N."""
    k = min(k, len(p))
    n = len(q)
    dist, idx = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    if k == 0 or n == 0:
        return dist, idx
    step = max(TILE_Q, OUT_BUDGET // (4 * len(p)) // TILE_Q * TILE_Q)
    for s in range(0, n, step):
        d = _keeping_torch_threads(l1_distances, q[s : s + step], p)  # chunk, N
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < len(p) else np.broadcast_to(np.arange(len(p)), d.shape)
        dk = np.take_along_axis(d, part, 1)
        order = np.lexsort((part, dk), axis=1)  # by distance, then row
        dist[s : s + step] = np.take_along_axis(dk, order, 1)
        idx[s : s + step] = np.take_along_axis(part, order, 1)
    return dist, idx
