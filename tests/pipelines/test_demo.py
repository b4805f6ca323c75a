"""`make demo`'s own steps: the test faces shrunk as `model eval` does, and where pair put the manifests."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_manifests import TRAINING_MANIFEST, with_metadata
from model.data import degrade
from pipelines.demo import find_manifest, make_lr


def _manifest(path, root, ids):
    n = len(ids)
    cols = {"face_id": ids, "hr_path": [f"{i}.png" for i in ids], "identity": ["x"] * n, "split": ["test"] * n,
            "ref_face_ids": [[]] * n, "ref_paths": [[]] * n, "ref_identities": [[]] * n, "ref_distances": [[]] * n,
            "schema_version": [1] * n}
    t = with_metadata(pa.Table.from_pydict(cols, schema=TRAINING_MANIFEST), "training_manifest",
                      {"hr_root": str(root), "ref_root": str(root)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path)
    return path


def test_make_lr_degrades_each_face_as_eval_does(tmp_path):
    rng = np.random.default_rng(0)
    for i in ("a", "b"):
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    m = _manifest(tmp_path / "m" / "test.parquet", tmp_path, ["a", "b"])
    out = make_lr(m, tmp_path / "lr", 8)
    assert [p.name for p in out] == ["a.png", "b.png"]
    want = degrade(Image.open(tmp_path / "a.png").convert("RGB"), 8)[1]
    got = Image.open(out[0])
    assert got.size == (16, 16) and np.array_equal(np.asarray(got), np.asarray(want))


def test_find_manifest_in_the_manifest_dir_or_the_library(tmp_path):
    lib, mdir = tmp_path / "lib", tmp_path / "mdir"
    with pytest.raises(SystemExit, match="no test.parquet for manifest 'x'"):
        find_manifest(mdir, lib, "x", "test")
    in_lib = _manifest(lib / "manifests" / "x" / "test.parquet", tmp_path, ["a"])
    assert find_manifest(mdir, lib, "x", "test") == in_lib
    in_dir = _manifest(mdir / "x" / "test.parquet", tmp_path, ["a"])
    assert find_manifest(mdir, lib, "x", "test") == in_dir
