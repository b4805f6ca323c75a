"""Exact L1 k-nearest neighbours, over a pool that may be sharded.

On CPU the search is `refbuild.l1kernel` (a blocked numba kernel, ~7x FAISS's
memory-bound flat L1 on 2 cores); on GPU it is FAISS `IndexFlat(METRIC_L1)`,
exact there too, where IVF has no L1 and IDSelector is ignored, which is why
`pair` filters exclusions after the search. With `chunk_rows`, the pool is searched one chunk at a time and the
per-chunk top-k lists are merged, so the library need not fit in one index or
in GPU memory: the global top-k is the top-k of the per-chunk top-k lists.
"""
from __future__ import annotations

import numpy as np

from refbuild.errors import RefbuildError

GPU_K_MAX = 2048  # faiss-gpu's largest k


def gpu_wanted(device: str) -> bool:
    import faiss

    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "cuda" and not has_gpu:
        raise RefbuildError("--device cuda needs faiss on CUDA: pip install 'msrface[gpu]' (and a GPU)")
    return device == "cuda" or (device == "auto" and has_gpu)


class L1Index:
    """Args:
        pool: N, D float32 rows to search.
        device: "auto", "cpu" or "cuda".
        chunk_rows: rows per index; None or 0 keeps one index over the whole pool.
    """

    def __init__(self, pool: np.ndarray, device: str = "auto", chunk_rows: int | None = None):
        self.pool = np.ascontiguousarray(pool, dtype=np.float32)
        self.gpu = gpu_wanted(device)
        self.chunk = chunk_rows or max(1, len(self.pool))
        self._res = None
        self._resident = self._build(self.pool) if self.chunk >= len(self.pool) else None

    @property
    def ntotal(self) -> int:
        return len(self.pool)

    @property
    def k_max(self) -> int:
        return min(self.ntotal, GPU_K_MAX) if self.gpu else self.ntotal

    def _build(self, rows: np.ndarray):
        if not self.gpu:
            return rows  # l1kernel searches the rows themselves
        import faiss

        index = faiss.IndexFlat(rows.shape[1], faiss.METRIC_L1)
        index.add(rows)
        if self._res is None:
            self._res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._res, 0, index)

    @staticmethod
    def _search_one(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(index, np.ndarray):
            from refbuild.l1kernel import topk

            return topk(q, index, k)
        return index.search(q, k)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances and pool rows of the k nearest, nearest first (ties by row); -1 pads."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        k = min(k, self.k_max)
        if self._resident is not None:
            return self._search_one(self._resident, q, k)
        dists, idxs = [], []
        for start in range(0, self.ntotal, self.chunk):
            rows = self.pool[start : start + self.chunk]
            d, i = self._search_one(self._build(rows), q, min(k, len(rows)))
            dists.append(d)
            idxs.append(np.where(i >= 0, i + start, -1))
        d, i = np.concatenate(dists, axis=1), np.concatenate(idxs, axis=1)
        d = np.where(i >= 0, d, np.inf)
        order = np.lexsort((i, d), axis=1)[:, :k]  # by distance, then row: the same ties as one index
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
