"""Exact L1 k-NN: sharded search over pool chunks equals one index and brute force."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from rb_helpers import invoke
from refbuild.knn import L1Index


@pytest.mark.parametrize("chunk", [None, 1, 7, 100, 5000])
def test_chunked_search_matches_brute_force(chunk):
    rng = np.random.default_rng(1)
    pool = rng.random((300, 24), dtype=np.float32)
    pool[200] = pool[3]  # an exact tie: broken by row, as one index does
    q = rng.random((40, 24), dtype=np.float32)
    q[0] = pool[3]
    d, i = L1Index(pool, "cpu", chunk).search(q, 10)
    brute = np.abs(q[:, None, :] - pool[None, :, :]).sum(-1)  # Q, N
    want = np.lexsort((np.broadcast_to(np.arange(300), brute.shape), brute), axis=1)[:, :10]
    assert np.array_equal(i, want)
    assert np.allclose(d, np.take_along_axis(brute, want, 1), rtol=1e-5)
    assert list(i[0][:2]) == [3, 200]


def test_k_larger_than_pool_is_capped():
    pool = np.eye(5, dtype=np.float32)
    d, i = L1Index(pool, "cpu", 2).search(pool[:1], 50)
    assert i.shape == (1, 5) and sorted(i[0]) == [0, 1, 2, 3, 4]


def test_pair_with_pool_chunks_gives_the_same_pairs(tmp_path, built):
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    invoke("pair", lib, "-m", 3, "--manifest-dir", tmp_path / "a", "--name", "x", "--overwrite", "-q")  # other settings than build()'s -m 2
    one = pq.read_table(lib / "pairs.parquet")
    invoke("pair", lib, "-m", 3, "--manifest-dir", tmp_path / "b", "--name", "x", "--pool-chunk", 5, "-q")
    assert pq.read_table(lib / "pairs.parquet").equals(one)
    assert pq.read_table(tmp_path / "a" / "x" / "train.parquet").equals(pq.read_table(tmp_path / "b" / "x" / "train.parquet"))


@pytest.mark.parametrize("n,N,D", [(1, 1, 1), (3, 5, 7), (33, 130, 19), (70, 257, 64)])
def test_l1_kernel_equals_brute_force_on_ragged_tiles(n, N, D):
    """Shapes that are not multiples of the 4 x 4 register tile or the 32 x 128 task exercise the edges."""
    from refbuild.l1kernel import l1_distances

    rng = np.random.default_rng(n + N + D)
    q, p = rng.standard_normal((n, D), np.float32), rng.standard_normal((N, D), np.float32)
    brute = np.abs(q[:, None, :].astype(np.float64) - p[None, :, :]).sum(-1)
    assert np.allclose(l1_distances(q, p), brute, rtol=1e-5, atol=1e-5)


def test_l1_topk_in_query_chunks_equals_faiss(monkeypatch):
    """Query chunks (a tiny distance budget) and the exact answer FAISS's flat L1 gives."""
    import faiss

    import refbuild.l1kernel as kern

    monkeypatch.setattr(kern, "OUT_BUDGET", 4 * 500 * 40)  # 40 queries of a 500-row pool per chunk
    rng = np.random.default_rng(5)
    p = rng.random((500, 48), dtype=np.float32)
    q = rng.random((150, 48), dtype=np.float32)
    d, i = kern.topk(q, p, 12)
    index = faiss.IndexFlat(48, faiss.METRIC_L1)
    index.add(p)
    fd, fi = index.search(q, 12)
    assert np.array_equal(i, fi) and np.allclose(d, fd, rtol=1e-5)
    assert kern.topk(q, p, 0)[1].shape == (150, 0) and kern.topk(q, p, 900)[1].shape == (150, 500)


def test_l1_kernel_refuses_mismatched_dims():
    from refbuild.l1kernel import l1_distances

    with pytest.raises(ValueError, match="n x D"):
        l1_distances(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))


def test_ivf_visiting_every_list_is_exact_and_fewer_lists_lose_recall():
    from refbuild.knn import IVFL1Index, auto_nlist, recall_at_m

    rng = np.random.default_rng(3)
    pool = rng.random((2000, 16), dtype=np.float32)
    q = rng.random((50, 16), dtype=np.float32)
    de, ie = L1Index(pool, "cpu").search(q, 5)
    d, i = IVFL1Index(pool, nlist=16, nprobe=16).search(q, 5)
    assert np.array_equal(i, ie) and np.allclose(d, de, rtol=1e-5)
    _, i1 = IVFL1Index(pool, nlist=16, nprobe=1).search(q, 5)
    r = recall_at_m([list(a) for a in i1], [list(e) for e in ie])
    assert 0 < r < 1  # approximate: the measure can tell
    assert recall_at_m([["a", "b"]], [["b", "c"]]) == 0.5 and auto_nlist(2000) == 51


def test_pair_ivf_reports_recall_and_equals_exact_when_it_visits_every_list(tmp_path, built):
    import json

    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    invoke("pair", lib, "-m", 2, "--manifest-dir", tmp_path / "a", "--name", "x", "--overwrite", "-q")
    exact = pq.read_table(lib / "pairs.parquet").select(["query_face_id", "ref_face_ids"])
    res = invoke("pair", lib, "-m", 2, "--manifest-dir", tmp_path / "b", "--name", "x", "--index", "ivf",
                 "--nlist", 3, "--nprobe", 3, "--overwrite")
    assert "recall@m vs exact" in " ".join(res.output.split()) and "1.0000" in res.output
    assert pq.read_table(lib / "pairs.parquet").select(["query_face_id", "ref_face_ids"]).equals(exact)
    rec = json.loads((lib / "pair.config.json").read_text())["used"]["recall_at_m"]
    assert rec["recall"] == 1.0 and rec["nlist"] == 3 and rec["queries"] > 0
    meta = pq.read_schema(lib / "pairs.parquet").metadata
    assert meta[b"index"] == b"ivf" and json.loads(meta[b"recall_at_m"])["recall"] == 1.0
    audit = invoke("audit", lib, "--manifest", tmp_path / "b" / "x" / "train.parquet")
    assert "recall@m" in audit.output and "1.0000" in audit.output, audit.output  # the table may wrap the line
    refused = invoke("pair", lib, "-m", 2, "--index", "ivf", "--device", "cuda", "--overwrite", ok=False)
    assert refused.exit_code != 0
