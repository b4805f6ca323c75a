"""The whole pipeline on synthetic faces through the CLI (--aligned, pixel backbone):
outputs, invariants read straight from the Parquet files, and the refusals."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rb_helpers import DUP_COPY, DUP_ORIGINAL, build, invoke, make_faces, one_line_error, read
from refbuild.io import library_lock

M = 2


def _faces(lib: Path) -> dict[str, dict]:
    return {r["face_id"]: r for r in read(lib / "faces.parquet")}


def _splits(lib: Path) -> dict[str, dict]:
    return {r["face_id"]: r for r in read(lib / "splits.parquet")}


def _rewrite(path: Path, table: pa.Table, meta_update: dict[str, str] | None = None) -> None:
    """Write `table` over `path` keeping the file's metadata (plus `meta_update`)."""
    meta = dict(pq.read_schema(path).metadata or {})
    meta.update({k.encode(): v.encode() for k, v in (meta_update or {}).items()})
    pq.write_table(table.replace_schema_metadata(meta), path)


# -- outputs of a clean run ----------------------------------------------------------

def test_detect_aligned_outputs(built):
    faces = _faces(built.lib)
    assert len(faces) == 41 and read(built.lib / "rejects.parquet") == []
    assert {f["identity"] for f in faces.values()} == {f"id{i:02d}" for i in range(10)}
    for f in faces.values():
        crop = built.lib / f["crop_path"]
        with Image.open(crop) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        assert f["n_faces"] == 1 and f["landmarks"] is None
    cfg = json.loads((built.lib / "detect.config.json").read_text())
    assert cfg["aligned"] is True and cfg["crop_size"] == 32


def test_features_hr_and_lr(built):
    meta = pq.read_schema(built.lib / "features.parquet").metadata
    assert meta[b"backbone"] == b"pixels" and meta[b"dim"] == b"768"
    hr = pq.read_table(built.lib / "features.parquet")
    lr = pq.read_table(built.lib / "features_lr.parquet")
    assert hr.column("face_id").to_pylist() == list(_faces(built.lib)) == lr.column("face_id").to_pylist()
    assert hr.schema.field("features").type.list_size == 768
    assert hr.column("features").to_pylist() != lr.column("features").to_pylist()  # lr is a different view


def test_every_file_has_schema_version(built):
    files = [built.lib / f for f in ("faces.parquet", "rejects.parquet", "features.parquet", "features_lr.parquet",
                                     "splits.parquet", "pairs.parquet")]
    files += [built.manifests / f"{s}.parquet" for s in ("train", "val", "test")]
    for f in files:
        meta = pq.read_schema(f).metadata
        assert meta[b"msrface.schema_version"] == b"1", f
        assert b"msrface.schema" in meta, f


def test_split_identity_disjoint_and_duplicate_joined(built):
    faces, splits = _faces(built.lib), _splits(built.lib)
    by_path = {f["src_path"]: fid for fid, f in faces.items()}
    where: dict[str, set] = {}
    for fid, f in faces.items():
        where.setdefault(f["identity"], set()).add(splits[fid]["split"])
    assert all(len(s) == 1 for s in where.values()), where
    # the byte-identical photo joins id00 and id01 into one group, hence one split
    a, b = splits[by_path[DUP_ORIGINAL]], splits[by_path[DUP_COPY]]
    assert a["group"] == b["group"] and a["split"] == b["split"]
    id00 = {splits[fid]["group"] for fid, f in faces.items() if f["identity"] in ("id00", "id01")}
    assert len(id00) == 1
    assert {s["split"] for s in splits.values()} >= {"train", "val"}


def test_split_deterministic(tmp_path, built):
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    invoke("split", lib, "-q")
    assert read(lib / "splits.parquet") == read(built.lib / "splits.parquet")
    line = one_line_error(invoke("split", lib, "-q", "--seed", "7", ok=False))  # other settings: refused (issue 14.6)
    assert "seed: 0 -> 7" in line and "--overwrite" in line
    assert read(lib / "splits.parquet") == read(built.lib / "splits.parquet")
    invoke("split", lib, "-q", "--seed", "7", "--overwrite")
    assert {r["face_id"] for r in read(lib / "splits.parquet")} == set(_faces(lib))


def test_pairs_invariants(built):
    faces, splits = _faces(built.lib), _splits(built.lib)
    pairs = read(built.lib / "pairs.parquet")
    assert len(pairs) == 41
    for p in pairs:
        q = faces[p["query_face_id"]]
        assert p["query_library"] == "self"
        assert p["n_refs"] == M == len(p["ref_face_ids"])
        assert p["ref_distances"] == sorted(p["ref_distances"]) and p["ref_distances"][0] > 0
        for rid in p["ref_face_ids"]:
            r = faces[rid]
            assert r["identity"] != q["identity"]
            assert splits[rid]["group"] != splits[q["face_id"]]["group"]
            assert r["src_sha256"] != q["src_sha256"]  # never the same photo
            assert splits[rid]["split"] == "train"  # leak-free default pool
    meta = pq.read_schema(built.lib / "pairs.parquet").metadata
    assert meta[b"pool"] == b"train" and meta[b"m"] == b"2"


def test_duplicate_photos_never_pair(tmp_path, built):
    # with --pool all the two copies (distance 0: each other's nearest neighbour) are
    # both in the pool, so only the exclusions keep them apart
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    invoke("pair", lib, "-m", M, "--pool", "all", "--manifest-dir", tmp_path / "m", "--overwrite", "-q")
    faces = _faces(lib)
    by_path = {f["src_path"]: fid for fid, f in faces.items()}
    dup = {by_path[DUP_ORIGINAL], by_path[DUP_COPY]}
    pairs = {p["query_face_id"]: p for p in read(lib / "pairs.parquet")}
    for q in dup:
        assert pairs[q]["n_refs"] == M and not dup & set(pairs[q]["ref_face_ids"])


def test_manifests(built):
    faces, splits = _faces(built.lib), _splits(built.lib)
    total = 0
    for s in ("train", "val", "test"):
        path = built.manifests / f"{s}.parquet"
        meta = pq.read_schema(path).metadata
        assert meta[b"m"] == b"2" and meta[b"split"] == s.encode()
        assert Path(meta[b"hr_root"].decode()) == built.lib.resolve() == Path(meta[b"ref_root"].decode())
        rows = read(path)
        total += len(rows)
        for r in rows:
            assert r["schema_version"] == 1 and r["split"] == s == splits[r["face_id"]]["split"]
            assert len(r["ref_paths"]) == len(r["ref_face_ids"]) == len(r["ref_identities"]) == M
            assert r["hr_path"] == faces[r["face_id"]]["crop_path"]
            assert (built.lib / r["hr_path"]).is_file()
            for rid, rp in zip(r["ref_face_ids"], r["ref_paths"]):
                assert rp == faces[rid]["crop_path"] and (built.lib / rp).is_file()
                assert splits[rid]["split"] == "train" and faces[rid]["identity"] != r["identity"]
    assert total == 41


def test_audit_passes(built):
    res = invoke("audit", built.lib)
    assert "audit passed" in res.output
    assert not [ln for ln in res.output.splitlines() if ln.startswith("violation")]


def test_query_csv_and_json(built):
    sql = "select split, count(*) as n from splits group by split order by split"
    res = invoke("query", built.lib, sql, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    counts = {}
    for s in _splits(built.lib).values():
        counts[s["split"]] = counts.get(s["split"], 0) + 1
    assert {r["split"]: int(r["n"]) for r in rows} == counts
    res = invoke("query", built.lib, "select face_id, identity from faces order by face_id", "-f", "json")
    got = json.loads(res.stdout)
    assert got == sorted(({"face_id": k, "identity": v["identity"]} for k, v in _faces(built.lib).items()),
                         key=lambda r: r["face_id"])
    res = invoke("query", built.lib, "select count(*) from pairs")
    assert "41" in res.stdout


def test_query_cli_refuses_outside_reads(built):
    line = one_line_error(invoke("query", built.lib, "select * from read_csv('/etc/passwd')", ok=False))
    assert "passwd" in line or "Permission" in line
    one_line_error(invoke("query", built.lib, "COPY faces TO 'x.csv'", ok=False))


# -- other pairing modes --------------------------------------------------------------

def test_pool_all_and_lr_queries(tmp_path, built):
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    invoke("split", lib, "--ratios", "0,1,0", "--overwrite", "-q")  # everything val: the train pool is empty
    line = one_line_error(invoke("pair", lib, "-m", M, "--manifest-dir", tmp_path / "m", "--overwrite", "-q", ok=False))
    assert "pool (train) is empty" in line
    invoke("pair", lib, "-m", M, "--pool", "all", "--query-view", "lr", "--manifest-dir", tmp_path / "m", "--overwrite", "-q")
    faces, splits = _faces(lib), _splits(lib)
    pairs = read(lib / "pairs.parquet")
    assert len(pairs) == 41 and all(p["n_refs"] == M for p in pairs)
    for p in pairs:
        for rid in p["ref_face_ids"]:
            assert splits[rid]["split"] == "val"
            assert splits[rid]["group"] != splits[p["query_face_id"]]["group"]
            assert faces[rid]["src_sha256"] != faces[p["query_face_id"]]["src_sha256"]
    meta = pq.read_schema(lib / "pairs.parquet").metadata
    assert meta[b"query_view"] == b"lr" and meta[b"pool"] == b"all"
    assert len(read(tmp_path / "m" / "lib" / "val.parquet")) == 41


def test_cross_library_pairing(tmp_path):
    b = build(tmp_path / "a", views="hr")
    src2, lib2 = tmp_path / "q_src", tmp_path / "q_lib"
    make_faces(src2, n_ids=3, per_id=2, seed=5, prefix="q", duplicate=False)
    # a query identity whose label also exists in the pool library: must be excluded by label
    make_faces(src2 / "tmp", n_ids=1, per_id=2, seed=6, prefix="id", duplicate=False)
    (src2 / "tmp" / "id00").rename(src2 / "id03")
    (src2 / "tmp").rmdir()
    # a byte-identical copy of a pool train photo under a new label: only its sha256 tells
    train_src = next(f["src_path"] for fid, f in _faces(b.lib).items() if _splits(b.lib)[fid]["split"] == "train")
    (src2 / "q09").mkdir()
    shutil.copyfile(b.src / train_src, src2 / "q09" / "copy.png")
    invoke("detect", src2, "--out", lib2, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib2, "--backbone", "pixels", "--device", "cpu", "-q")
    mdir = tmp_path / "m"
    own = {f: (b.lib / f).read_bytes() for f in ("pairs.parquet", "pair.config.json")}
    invoke("pair", b.lib, "--queries", lib2, "-m", M, "--manifest-dir", mdir, "--name", "cross", "-q")
    # a separate, named output: the pool library's own pairing is untouched (issue 14.2)
    assert own == {f: (b.lib / f).read_bytes() for f in own}
    assert json.loads((mdir / "cross" / "pair.config.json").read_text())["queries"] == str(lib2.resolve())
    pool_faces, pool_splits, qfaces = _faces(b.lib), _splits(b.lib), _faces(lib2)
    pairs = read(mdir / "cross" / "pairs.parquet")
    assert {p["query_face_id"] for p in pairs} == set(qfaces)
    copy_sha = next(f["src_sha256"] for f in qfaces.values() if f["src_path"] == "q09/copy.png")
    for p in pairs:
        assert copy_sha not in {pool_faces[r]["src_sha256"] for r in p["ref_face_ids"]}
        assert Path(p["query_library"]) == lib2.resolve()
        assert p["n_refs"] == M
        for rid in p["ref_face_ids"]:
            assert pool_splits[rid]["split"] == "train"
            assert pool_faces[rid]["identity"] != qfaces[p["query_face_id"]]["identity"]
    test_rows = read(mdir / "cross" / "test.parquet")  # unsplit query library: all queries are test
    assert len(test_rows) == len(qfaces)
    meta = pq.read_schema(mdir / "cross" / "test.parquet").metadata
    assert Path(meta[b"hr_root"].decode()) == lib2.resolve() and Path(meta[b"ref_root"].decode()) == b.lib.resolve()
    for r in test_rows:
        assert (lib2 / r["hr_path"]).is_file() and all((b.lib / p).is_file() for p in r["ref_paths"])
    invoke("audit", b.lib)
    invoke("audit", b.lib, "--manifest", mdir / "cross" / "test.parquet")


def test_fewer_candidates_than_m(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=3, per_id=2, duplicate=False)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", lib, "--ratios", "1,0,0", "-q")  # all train: 4 candidates per query at most
    line = one_line_error(invoke("pair", lib, "-m", 5, "--manifest-dir", tmp_path / "m", "-q", ok=False))
    assert "5 valid references" in line and str(lib) in line
    # that run completed (uselessly); a rerun with other settings must say so
    assert "--overwrite" in one_line_error(invoke("pair", lib, "-m", 4, "--manifest-dir", tmp_path / "m", "-q", ok=False))
    invoke("pair", lib, "-m", 4, "--manifest-dir", tmp_path / "m", "--overwrite", "-q")  # exactly enough
    assert all(p["n_refs"] == 4 for p in read(lib / "pairs.parquet"))


# -- tampering: audit names the problem ---------------------------------------------

@pytest.fixture
def lib_copy(tmp_path, built):
    """A private copy of the built library whose pair.config.json points at copied manifests."""
    lib, mdir = tmp_path / "lib", tmp_path / "manifests"
    shutil.copytree(built.lib, lib)
    shutil.copytree(built.manifests, mdir)
    for p in mdir.glob("*.parquet"):  # the copies belong to the copied library
        _rewrite(p, pq.read_table(p), {"hr_root": str(lib.resolve()), "ref_root": str(lib.resolve())})
    cfg = json.loads((lib / "pair.config.json").read_text())
    cfg["manifests"] = {s: str(mdir / f"{s}.parquet") for s in ("train", "val", "test")}
    (lib / "pair.config.json").write_text(json.dumps(cfg))
    invoke("audit", lib)  # the copy starts clean
    return lib, mdir


def _audit_fails(lib: Path, *needles: str) -> str:
    res = invoke("audit", lib, ok=False)
    assert res.exit_code == 1, res.output
    assert "audit failed" in res.output
    viol = [ln for ln in res.output.splitlines() if ln.startswith("violation")]
    for n in needles:
        assert any(n in ln for ln in viol), (n, res.output)
    return res.output


def test_audit_manifest_path_missing(lib_copy):
    lib, mdir = lib_copy
    path = mdir / "train.parquet"
    t = pq.read_table(path)
    refs = t.column("ref_paths").to_pylist()
    refs[0] = ["crops/zz/missing.png"] + refs[0][1:]
    _rewrite(path, t.set_column(t.schema.get_field_index("ref_paths"), "ref_paths", pa.array(refs, t.schema.field("ref_paths").type)))
    _audit_fails(lib, "missing.png")


def test_audit_manifest_path_escapes(lib_copy):
    lib, mdir = lib_copy
    path = mdir / "train.parquet"
    t = pq.read_table(path)
    hr = t.column("hr_path").to_pylist()
    hr[0] = "../../etc/passwd"
    _rewrite(path, t.set_column(t.schema.get_field_index("hr_path"), "hr_path", pa.array(hr, pa.string())))
    _audit_fails(lib, "escapes its root")


def test_audit_identity_in_two_splits_manifest(lib_copy):
    lib, mdir = lib_copy
    train_ident = read(mdir / "train.parquet")[0]["identity"]
    path = mdir / "val.parquet"
    t = pq.read_table(path)
    assert t.num_rows > 0
    ids = t.column("identity").to_pylist()
    ids[0] = train_ident
    _rewrite(path, t.set_column(t.schema.get_field_index("identity"), "identity", pa.array(ids, pa.string())))
    _audit_fails(lib, f"val row of train identity {train_ident}")


def test_audit_identity_in_two_splits_library(lib_copy):
    lib, _ = lib_copy
    t = pq.read_table(lib / "splits.parquet")
    faces = _faces(lib)
    sp = t.column("split").to_pylist()
    fids = t.column("face_id").to_pylist()
    i = sp.index("train")
    ident = faces[fids[i]]["identity"]
    sp[i] = "test"
    _rewrite(lib / "splits.parquet", t.set_column(1, "split", pa.array(sp, pa.string())))
    _audit_fails(lib, f"identity {ident} is in splits ['test', 'train']")


def test_audit_wrong_schema_version(lib_copy):
    lib, mdir = lib_copy
    path = mdir / "val.parquet"
    _rewrite(path, pq.read_table(path), {"msrface.schema_version": "2"})
    _audit_fails(lib, "version 2")


def test_audit_changed_source_and_missing_crop(tmp_path):
    b = build(tmp_path, views="hr")
    (b.src / "id05" / "img1.png").write_bytes((b.src / "id05" / "img2.png").read_bytes())
    crop = read(b.lib / "faces.parquet")[0]["crop_path"]
    (b.lib / crop).unlink()
    _audit_fails(b.lib, "id05/img1.png: sha256 changed", crop)


# -- refusals -------------------------------------------------------------------------

def test_locked_library(tmp_path, built):
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    with library_lock(lib, "x"):
        for args in (["split", lib], ["embed", lib, "--backbone", "pixels"],
                     ["pair", lib, "--manifest-dir", tmp_path / "m"],
                     ["detect", built.src, "--out", lib, "--aligned"]):
            line = one_line_error(invoke(*args, ok=False))
            assert "locked" in line and "refbuild x" in line
    invoke("split", lib, "-q")  # free again


def test_config_mismatch_needs_overwrite(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=2, per_id=2, duplicate=False)
    invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 32, "-q")
    line = one_line_error(invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 40, "-q", ok=False))
    assert "crop_size" in line and "--overwrite" in line and "finished" in line  # completed run: refused too
    invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 40, "--overwrite", "-q")
    assert json.loads((lib / "detect.config.json").read_text())["crop_size"] == 40
    (lib / ".work" / "detect" / "complete").unlink()  # as if the crop-size-40 run had been killed
    line = one_line_error(invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 24, "-q", ok=False))
    assert "crop_size" in line and "--overwrite" in line and "unfinished" in line
    invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 40, "-q")  # same settings: resumes fine
    invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 24, "--overwrite", "-q")
    for f in read(lib / "faces.parquet"):
        with Image.open(lib / f["crop_path"]) as im:
            assert im.size == (24, 24)
    assert json.loads((lib / "detect.config.json").read_text())["crop_size"] == 24


def test_embed_config_mismatch(tmp_path, built):
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    (lib / ".work" / "embed-hr" / "complete").unlink()  # as if the embed run had been killed
    line = one_line_error(invoke("embed", lib, "--backbone", "pixels", "--views", "hr", "--grid", 8, "-q", ok=False))
    assert "grid" in line and "--overwrite" in line
    invoke("embed", lib, "--backbone", "pixels", "--views", "hr", "--grid", 8, "--overwrite", "-q")
    assert pq.read_schema(lib / "features.parquet").metadata[b"dim"] == str(3 * 8 * 8).encode()


def test_stage_removes_orphan_temps(tmp_path, built):
    lib = tmp_path / "lib"
    shutil.copytree(built.lib, lib)
    planted = [lib / ".tmp-faces.parquet.abc", lib / "crops" / "ab" / ".tmp-x.png.123", lib / ".work" / "detect" / ".tmp-y"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    invoke("split", lib, "-q")
    assert not [p for p in planted if p.exists()]
    assert (lib / "crops").is_dir() and len(list((lib / "crops").rglob("*.png"))) == 41


def test_detect_aligned_at_crop_size_keeps_pixels_exact(tmp_path):
    """Standard test sets (aligned 128 px faces) must be scored as published: no resampling."""
    import numpy as np

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {f"f{i}.png": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for i in range(3)}
    for name, a in arrays.items():
        Image.fromarray(a).save(src / name)
    invoke("detect", src, "--out", tmp_path / "lib", "--aligned", "--crop-size", 128, "-q")
    faces = read(tmp_path / "lib" / "faces.parquet")
    assert len(faces) == 3
    for f in faces:
        with Image.open(tmp_path / "lib" / f["crop_path"]) as im:
            assert (np.asarray(im.convert("RGB")) == arrays[f["src_path"]]).all(), f["src_path"]


def test_hog_backbone_embeds_offline(tmp_path):
    lib = build(tmp_path, m=2).lib
    invoke("embed", lib, "--backbone", "hog", "--views", "hr,lr", "--overwrite", "-q")
    meta = pq.read_schema(lib / "features.parquet").metadata
    assert meta[b"backbone"] == b"hog" and meta[b"dim"] == str(9 * 64 + 3 * 64).encode()
    feats = pq.read_table(lib / "features.parquet").column("features").to_pylist()
    assert len({tuple(round(v, 5) for v in f) for f in feats}) > 1  # not a constant
