"""`refbuild pair --same-person` (issue 25.2): the positive control's references are other
photos of the query's own identity, never the query, a copy or re-encoding of its photo, or
another person; every output says it is the experiment, and `audit` checks the inverted rule."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rb_helpers import invoke, make_faces, one_line_error, read
from refbuild import audit
from refbuild.same_person import PAIRING

M = 2
NAME = "lib_same_person"  # the default name: the library folder's, tagged
COPY, REENC = ("id03/img0.png", "id03/copy.png"), ("id04/img1.png", "id04/reenc.jpg")


@pytest.fixture(scope="module")
def sp_lib(tmp_path_factory) -> Path:
    """A library whose identities hold a byte-identical copy (id03) and a JPEG q70 re-encoding (id04) of
    one of their photos, paired both ways: the normal pairing, then --same-person on the HR view."""
    tmp = tmp_path_factory.mktemp("same_person")
    src, lib = tmp / "src", tmp / "lib"
    make_faces(src, n_ids=9, per_id=5)
    shutil.copyfile(src / COPY[0], src / COPY[1])
    with Image.open(src / REENC[0]) as im:
        im.save(src / REENC[1], quality=70)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--views", "hr,lr", "--device", "cpu", "-q")
    invoke("split", lib, "--ratios", "1,1,1", "-q")
    invoke("pair", lib, "-m", M, "--device", "cpu", "-q")
    own = {f: (lib / f).read_bytes() for f in ("pairs.parquet", "pair.config.json")}
    res = invoke("pair", lib, "-m", M, "--same-person", "--device", "cpu")
    assert "--same-person (experiment)" in res.output and PAIRING in res.output  # the summary says it
    assert own == {f: (lib / f).read_bytes() for f in own}  # the library's own pairing stays
    return lib


def _faces(lib: Path) -> dict[str, dict]:
    return {r["face_id"]: r for r in read(lib / "faces.parquet")}


def _by_path(lib: Path) -> dict[str, str]:
    return {f["src_path"]: fid for fid, f in _faces(lib).items()}


def test_references_are_other_photos_of_the_same_person(sp_lib):
    faces, splits = _faces(sp_lib), {r["face_id"]: r["split"] for r in read(sp_lib / "splits.parquet")}
    by_path = _by_path(sp_lib)
    pairs = read(sp_lib / "manifests" / NAME / "pairs.parquet")
    assert {p["query_face_id"] for p in pairs} == set(faces)
    assert all(p["n_refs"] == M for p in pairs)  # every identity has 5 photos, 4 of them others
    assert {splits[p["query_face_id"]] for p in pairs} == {"train", "val", "test"}
    for p in pairs:
        q = faces[p["query_face_id"]]
        assert p["ref_distances"] == sorted(p["ref_distances"])
        for rid in p["ref_face_ids"]:
            assert rid != q["face_id"]
            assert faces[rid]["identity"] == q["identity"]  # never another person
            assert faces[rid]["src_sha256"] != q["src_sha256"]  # never its own photo
            assert splits[rid] == splits[q["face_id"]]  # a test query's references are test photos
        assert len({faces[r]["src_sha256"] for r in p["ref_face_ids"]}) == M
    refs = {p["query_face_id"]: set(p["ref_face_ids"]) for p in pairs}
    for a, b in (COPY, REENC):  # each other's nearest photo (distance 0 for the copy): excluded
        a, b = by_path[a], by_path[b]
        assert b not in refs[a] and a not in refs[b]
    # no two references of one photo: the two copies of id03 are never both given
    copies = {by_path[c] for c in COPY}
    assert all(len(r & copies) <= 1 for r in refs.values())


def test_references_are_the_nearest_of_the_person(sp_lib):
    """The m nearest by the pairing's own L1 over the features, among the person's other photos."""
    faces, by_path = _faces(sp_lib), _by_path(sp_lib)
    feats = pq.read_table(sp_lib / "features.parquet")
    fids = feats.column("face_id").to_pylist()
    mat = np.array(feats.column("features").to_pylist(), np.float64)
    row = {f: i for i, f in enumerate(fids)}
    photo = {f: x["src_sha256"] for f, x in faces.items()}  # one photo: one key (the copy shares its sha256)
    photo[by_path[REENC[1]]] = photo[by_path[REENC[0]]]
    for p in read(sp_lib / "manifests" / NAME / "pairs.parquet"):
        q = p["query_face_id"]
        allowed = [f for f in fids if faces[f]["identity"] == faces[q]["identity"] and photo[f] != photo[q]]
        picked, seen = [], set()
        for f in sorted(allowed, key=lambda f: (np.abs(mat[row[q]] - mat[row[f]]).sum(), row[f])):
            if photo[f] not in seen:  # one reference per photo
                picked.append(f)
                seen.add(photo[f])
        assert p["ref_face_ids"] == picked[:M], q


def test_outputs_are_named_so(sp_lib):
    out = sp_lib / "manifests" / NAME
    for f in ("train", "val", "test", "pairs"):
        meta = pq.read_schema(out / f"{f}.parquet").metadata
        assert meta[b"pairing"].decode() == PAIRING == "same_person (experiment)"
        assert meta[b"pool"] == b"own_split"
        assert "--same-person" in meta[b"command"].decode() and "--pool" not in meta[b"command"].decode()
    cfg = json.loads((out / "pair.config.json").read_text())
    assert cfg["same_person"] is True and cfg["pool"] == "own_split"
    assert set(cfg["manifests"]) == {"train", "val", "test"}
    for f in ("train", "test"):  # the normal manifests say nothing of it
        assert b"pairing" not in pq.read_schema(sp_lib / "manifests" / "lib" / f"{f}.parquet").metadata


def _copy(sp_lib: Path, tmp_path: Path) -> Path:
    """A private copy of the library whose same-person manifests name the copy (a clean audit)."""
    lib = tmp_path / "lib"
    shutil.copytree(sp_lib, lib)
    for path in (lib / "manifests" / NAME).glob("*.parquet"):
        meta = pq.read_schema(path).metadata | {b"hr_root": str(lib.resolve()).encode(),
                                                b"ref_root": str(lib.resolve()).encode()}
        pq.write_table(pq.read_table(path).replace_schema_metadata(meta), path)
    return lib


def _audit_fails(lib: Path, path: Path) -> str:
    """The violation lines of a failing `refbuild audit LIB --manifest PATH`."""
    res = invoke("audit", lib, "--no-hashes", "--manifest", path, ok=False)
    assert res.exit_code == 1, res.output
    return " ".join(ln for ln in res.output.splitlines() if ln.startswith("violation"))


def test_audit_accepts_same_identity_only_in_same_person_manifests(sp_lib, tmp_path):
    assert "audit passed" in invoke("audit", sp_lib, "--no-hashes").output
    names = [c.name for c in audit.run(audit.AuditConfig(sp_lib, hashes=False))]
    for split in ("train", "val", "test"):
        assert f"{NAME}/{split}.parquet: references are other photos of the same identity (same-person experiment)" \
            in names
        assert f"{NAME}/{split}.parquet: same-person references are not the query's own photo" in names
    lib = _copy(sp_lib, tmp_path)
    path = lib / "manifests" / NAME / "test.parquet"
    invoke("audit", lib, "--no-hashes", "--manifest", path)  # the copy starts clean
    # the same rows, labelled as a normal pairing: every same-identity reference is a violation
    meta = {k: v for k, v in pq.read_schema(path).metadata.items() if k != b"pairing"}
    pq.write_table(pq.read_table(path).replace_schema_metadata(meta), path)
    assert "has the same identity" in _audit_fails(lib, path)


def _tamper(sp_lib: Path, tmp_path: Path, new_ref, split: str = "test") -> str:
    """Replace the first reference of every row of a copy's same-person manifest of `split` by
    new_ref(row, faces, by_path) and return the audit's violations (it must fail)."""
    lib = _copy(sp_lib, tmp_path)
    faces, by_path = _faces(lib), _by_path(lib)
    path = lib / "manifests" / NAME / f"{split}.parquet"
    t = pq.read_table(path)
    rows = t.to_pylist()
    for r in rows:
        fid = new_ref(r, faces, by_path)
        r["ref_face_ids"][0], r["ref_paths"][0], r["ref_identities"][0] = fid, faces[fid]["crop_path"], faces[fid]["identity"]
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema).replace_schema_metadata(t.schema.metadata), path)
    return _audit_fails(lib, path)


def test_audit_flags_another_person(sp_lib, tmp_path):
    out = _tamper(sp_lib, tmp_path, lambda r, faces, _: next(f for f, x in faces.items() if x["identity"] != r["identity"]))
    assert "not the query's" in out


def test_audit_flags_the_query_itself(sp_lib, tmp_path):
    assert "references itself" in _tamper(sp_lib, tmp_path, lambda r, faces, _: r["face_id"])


@pytest.mark.parametrize("twins", [COPY, REENC], ids=["copy", "reencoding"])
def test_audit_flags_a_near_duplicate(sp_lib, tmp_path, twins):
    def dup(r, faces, by_path):
        a, b = by_path[twins[0]], by_path[twins[1]]
        return {a: b, b: a}.get(r["face_id"], r["ref_face_ids"][0])

    split = {r["face_id"]: r["split"] for r in read(sp_lib / "splits.parquet")}[_by_path(sp_lib)[twins[0]]]
    assert "is its own photo" in _tamper(sp_lib, tmp_path, dup, split)


def test_same_person_refusals(sp_lib, tmp_path):
    res = invoke("pair", sp_lib, "-m", M, "--same-person", "--pool", "all", ok=False)
    assert res.exit_code == 2 and "--pool" in res.output
    line = one_line_error(invoke("pair", sp_lib, "-m", M, "--same-person", "--name", "exp", ok=False))
    assert "same_person" in line
    line = one_line_error(invoke("pair", sp_lib, "-m", M, "--same-person", "--index", "ivf", ok=False))
    assert "--index ivf" in line
    line = one_line_error(invoke("pair", sp_lib, "-m", M, "--same-person", "--queries", tmp_path, ok=False))
    assert "--queries" in line
    # the same-person manifests are never replaced by a normal pairing under their name
    lib = _copy(sp_lib, tmp_path)
    line = one_line_error(invoke("pair", lib, "-m", M, "--name", NAME, "--overwrite", "-q", ok=False))
    assert PAIRING in line and "another --name" in line
