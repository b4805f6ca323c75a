"""One library, three ways of running it: in-process, 2 local worker processes,
and Ray Data actors on a local Ray instance (detect, embed and pair). The files must be byte-identical."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from refbuild.cli import app

pytestmark = pytest.mark.slow

FILES = ["faces.parquet", "rejects.parquet", "features.parquet", "splits.parquet", "pairs.parquet"]


def _faces(root: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(4):
        base = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
        (root / f"p{i}").mkdir(parents=True)
        for k in range(2):
            a = np.kron(base, np.ones((6, 6, 1))) + rng.normal(0, 12, (48, 48, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / f"p{i}" / f"{k}.png")
    (root / "p0" / "broken.jpg").write_bytes(b"not a jpeg")


def _build(src: Path, lib: Path, mdir: Path, *engine: str, backbone: str = "vggface") -> None:
    def ok(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output

    ok("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 64, "--shard-size", 4, *engine, "-q")
    ok("embed", lib, "--backbone", backbone, "--weights", "random", "--shard-size", 4, *engine, "-q")
    ok("split", lib, "--ratios", "2,1,1", "-q")
    ok("pair", lib, "-m", 1, "--manifest-dir", mdir, "--name", "e", "--query-chunk", 3, *engine, "-q")


def _same(a: Path, b: Path, ma: Path, mb: Path) -> None:
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for s in ("train", "val", "test"):  # manifests differ only in the absolute roots in their metadata
        import pyarrow.parquet as pq

        ta, tb = pq.read_table(ma / "e" / f"{s}.parquet"), pq.read_table(mb / "e" / f"{s}.parquet")
        assert ta.equals(tb), s


@pytest.mark.parametrize("backbone", ["vggface", "dlib"])  # the networks; hog and pixels have no weights to load
def test_local_workers_and_ray_give_identical_libraries(tmp_path, backbone):
    src = tmp_path / "src"
    _faces(src)
    _build(src, tmp_path / "one", tmp_path / "m1", "--workers", 1, backbone=backbone)
    _build(src, tmp_path / "two", tmp_path / "m2", "--workers", 2, backbone=backbone)
    _same(tmp_path / "one", tmp_path / "two", tmp_path / "m1", tmp_path / "m2")
    pytest.importorskip("ray", reason="ray is not installed (pip install 'msrface[ray]'): Ray engine not tested")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _build(src, tmp_path / "ray", tmp_path / "m3", "--engine", "ray", "--workers", 2, backbone=backbone)
    finally:
        ray.shutdown()
    _same(tmp_path / "one", tmp_path / "ray", tmp_path / "m1", tmp_path / "m3")


def test_ray_engine_resumes_local_shards(tmp_path):
    """Shards finished by one engine are skipped by the other: same names, same files."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'msrface[ray]'): Ray engine not tested")
    import ray

    src = tmp_path / "src"
    _faces(src)
    lib = tmp_path / "lib"
    res = CliRunner().invoke(app, ["detect", str(src), "--out", str(lib), "--aligned", "--shard-size", "4", "-q"])
    assert res.exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in (lib / ".work" / "detect").glob("shard-*")}
    (lib / ".work" / "detect" / "complete").unlink()
    (lib / ".work" / "detect" / "shard-00001.done").unlink()  # as if killed during shard 1 (of 3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = CliRunner().invoke(app, ["detect", str(src), "--out", str(lib), "--aligned", "--shard-size", "4",
                                       "--engine", "ray", "-q"])
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    after = {p.name: p.stat().st_mtime_ns for p in (lib / ".work" / "detect").glob("shard-*")}
    redone = sorted(n for n in before if n in after and after[n] != before[n])
    assert redone and all(n.startswith("shard-00001.") for n in redone), redone


def test_ray_pair_resumes_by_chunk_and_matches_local(tmp_path):
    """pair --engine ray: query chunks as Ray tasks; a chunk finished by the local engine is
    skipped, the missing one is searched by an actor, and pairs.parquet is the local one's."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'msrface[ray]'): Ray engine not tested")
    import ray

    src = tmp_path / "src"
    _faces(src)
    lib = tmp_path / "lib"
    _build(src, lib, tmp_path / "m", "--workers", 1)
    wdir = lib / ".work" / "pair"
    local = (lib / "pairs.parquet").read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in wdir.glob("shard-*")}
    assert len([n for n in before if n.endswith(".done")]) >= 2  # several chunks: the test can tell them apart
    (wdir / "complete").unlink()
    (wdir / "shard-00001.done").unlink()  # as if killed while searching chunk 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = CliRunner().invoke(app, ["pair", str(lib), "-m", "1", "--manifest-dir", str(tmp_path / "m"), "--name", "e",
                                       "--query-chunk", "3", "--engine", "ray", "--workers", "2"])
    finally:
        ray.shutdown()
    assert res.exit_code == 0, res.output
    assert "ray (2 actors)" in res.output
    after = {p.name: p.stat().st_mtime_ns for p in wdir.glob("shard-*")}
    redone = sorted(n for n in before if after.get(n) != before[n])
    assert redone and all(n.startswith("shard-00001.") for n in redone), redone
    assert (lib / "pairs.parquet").read_bytes() == local
