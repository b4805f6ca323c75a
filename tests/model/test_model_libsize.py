"""pipelines.libsize: a training subset of identities, references from the whole library, ablated end to end."""
from __future__ import annotations


import pyarrow.parquet as pq
import pytest

from pipelines import libsize


def test_subset_manifest_keeps_schema_and_references(synthetic_manifest, tmp_path):
    dst = tmp_path / "sub.parquet"
    sizes = libsize.subset_manifest(synthetic_manifest, dst, 3, seed=0)
    full, sub = pq.read_table(synthetic_manifest), pq.read_table(dst)
    assert sizes == {"faces": 3, "identities": 3, "library_faces": 8}
    assert len(set(sub["identity"].to_pylist())) == 3 and sub.schema.equals(full.schema, check_metadata=False)
    by_id = {r["face_id"]: r for r in full.to_pylist()}
    for r in sub.to_pylist():  # references untouched: they still point into the whole library
        assert r["ref_paths"] == by_id[r["face_id"]]["ref_paths"]
    meta = sub.schema.metadata
    assert meta[b"msrface.schema"] == b"training_manifest" and meta[b"subset_identities"] == b"3"
    again = tmp_path / "again.parquet"
    libsize.subset_manifest(synthetic_manifest, again, 3, seed=0)
    assert pq.read_table(again).equals(sub)  # a rerun draws the same identities
    other = {tuple(pq.read_table(tmp_path / f"s{s}.parquet")["identity"].to_pylist())
             for s in range(4) if libsize.subset_manifest(synthetic_manifest, tmp_path / f"s{s}.parquet", 3, s)}
    assert len(other) > 1  # the seed draws the identities
    with pytest.raises(SystemExit, match="holds 8 identities"):
        libsize.subset_manifest(synthetic_manifest, tmp_path / "x.parquet", 9, seed=0)


def test_libsize_end_to_end(comparison_manifests, tmp_path):
    man = comparison_manifests
    out = tmp_path / "ls"
    argv = ["--manifests", str(man), "--identities", "3", "--steps", "2", "--model", "msrnet2_tiny_x8",
            "--eval-seeds", "0", "--out", str(out), "--batch-size", "2", "--num-refs", "2", "--ema-decay", "0"]
    res = libsize.main(argv)
    (r,) = res["runs"]
    assert r["faces"] == 3 and r["library_faces"] == 8
    assert set(r["arms"]) == {"matched", "random", "none", "shuffled", "oracle"}
    assert "matched - none" in r["pairs"] and "| msrnet2_tiny_x8_3ids_s0 | 3 (3) | 8 |" in (out / "libsize.md").read_text()
    assert pq.read_table(out / "train_3ids_s0.parquet").num_rows == 3
    again = libsize.main(argv)  # a rerun resumes the finished run and reads its ablation back
    assert again["runs"][0]["pairs"] == r["pairs"]


def test_library_size_refs_draw_nested_libraries(synthetic_manifest, tmp_path):
    """refbound --pool-sizes: each size's references come from that size's library; the full one finds the face."""
    import numpy as np
    import pyarrow as pa

    from pipelines.refbound import library_size_refs

    t = pq.read_table(synthetic_manifest)  # the pool: the same faces under other identities, so each query is in it
    pool = tmp_path / "pool.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("identity"), "identity",
                                pa.array([f"other{i}" for i in range(t.num_rows)])), pool)
    refs = library_size_refs(synthetic_manifest, pool, 2, [3, 8], seed=0)
    assert set(refs) == {"lr_matched@3", "nearest_hr@3", "lr_matched@8", "nearest_hr@8"}
    hr = [r["hr_path"] for r in t.to_pylist()]
    small = {hr[i] for i in np.random.default_rng(0).permutation(8)[:3]}
    for arm in ("lr_matched", "nearest_hr"):
        assert all(len(r) == 2 and {p.name for p in r} <= small for r in refs[f"{arm}@3"])
        assert [r[0].name for r in refs[f"{arm}@8"]] == hr  # the whole library holds the face itself: nearest
    own = library_size_refs(synthetic_manifest, synthetic_manifest, 2, [8], seed=0)  # same identities: never itself
    assert all(h not in {p.name for p in r} for arm in own.values() for h, r in zip(hr, arm))
    with pytest.raises(SystemExit, match="holds 8 faces"):
        library_size_refs(synthetic_manifest, pool, 2, [9])
