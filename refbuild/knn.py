"""L1 k-nearest neighbours: exact over a pool that may be sharded, or approximate (IVF) for very large pools.

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


def auto_nlist(n: int) -> int:
    """IVF lists for n pool rows: ~4 sqrt(n) (FAISS's rule of thumb), at least 39 training rows per list."""
    return max(1, min(int(4 * np.sqrt(n)), n // 39))


class IVFL1Index:
    """Approximate L1 k-NN on CPU: FAISS `IndexIVFFlat(METRIC_L1)` (IVF has no L1 on GPU).

    Args:
        pool: N, D float32 rows. nlist: inverted lists (0: `auto_nlist`). nprobe: lists visited per query.
        seed: seeds the k-means training, so a rerun builds the same index.
        train_per_list: k-means trains on at most this many rows per list.
    """

    gpu = False

    def __init__(self, pool: np.ndarray, nlist: int = 0, nprobe: int = 16, seed: int = 0, train_per_list: int = 256):
        import faiss

        self.pool = np.ascontiguousarray(pool, dtype=np.float32)
        n, d = self.pool.shape
        self.nlist = nlist or auto_nlist(n)
        if not 1 <= self.nlist <= n:
            raise RefbuildError(f"--nlist {self.nlist}: need 1 to {n} (the pool's rows)")
        self.nprobe = max(1, min(nprobe, self.nlist))
        quantizer = faiss.IndexFlat(d, faiss.METRIC_L1)
        self.index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_L1)
        self.index.cp.seed = seed
        sample = np.random.default_rng(seed).permutation(n)[: train_per_list * self.nlist]
        self.index.train(self.pool[np.sort(sample)])
        self.index.add(self.pool)
        self.index.nprobe = self.nprobe

    @property
    def ntotal(self) -> int:
        return len(self.pool)

    @property
    def k_max(self) -> int:
        return self.ntotal

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As L1Index.search, over the nprobe nearest lists only (-1 pads where they hold fewer than k rows)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        d, i = self.index.search(q, min(k, self.ntotal))
        d = np.where(i >= 0, d, np.inf)
        order = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), d), axis=1)  # ties by row, as exact search
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def recall_at_m(approx: list[list[str]], exact: list[list[str]]) -> float:
    """Share of the exact references (per query, a list of face ids) that the approximate search also gave."""
    hit = sum(len(set(a) & set(e)) for a, e in zip(approx, exact))
    total = sum(len(e) for e in exact)
    return hit / total if total else 1.0
