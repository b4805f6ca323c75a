"""Reruns after an input changed (issue 15): never a wrong result with exit 0.

A finished shard is reused only while its inputs are the ones it was made from
(label rows, source bytes, its crops); a changed input redoes the shards it
touches, and a changed source folder is refused.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
from rb_helpers import build, invoke, make_faces, one_line_error, read

DETECT = ("--aligned", "--crop-size", 32, "--shard-size", 4, "-q")


def detect(src: Path, lib: Path, *extra, ok: bool = True):
    return invoke("detect", src, "--out", lib, *DETECT, *extra, ok=ok)


def stat(res, key: str) -> str:
    return next(ln.split("│")[2].strip() for ln in res.output.splitlines() if f" {key} " in ln)


def audit_ok(lib: Path) -> None:
    res = invoke("audit", lib, ok=False)
    assert res.exit_code == 0, res.output[-3000:]


def write_labels(path: Path, rels: list[str], name) -> None:
    path.write_text("path,identity\n" + "".join(f"{r},{name(r)}\n" for r in rels))


def test_relabelled_labels_csv_changes_identities(tmp_path):
    src, lib, labels = tmp_path / "src", tmp_path / "lib", tmp_path / "labels.csv"
    rels = make_faces(src, n_ids=4, per_id=3, duplicate=False)
    write_labels(labels, rels, lambda r: r.split("/")[0])
    detect(src, lib, "--labels", labels)
    write_labels(labels, rels, lambda r: "p" + r.split("/")[0] if r.startswith("id00") else r.split("/")[0])
    res = invoke("detect", src, "--out", lib, *DETECT[:-1], "--labels", labels)
    got = {r["src_path"]: r["identity"] for r in read(lib / "faces.parquet")}
    assert got == {r: ("p" if r.startswith("id00") else "") + r.split("/")[0] for r in rels}
    assert stat(res, "processed_now") == "4"  # only the shard of the relabelled photos was redone


def test_margin_change_remakes_crops_features_and_pairs(tmp_path):
    b = build(tmp_path, extra_detect=("--shard-size", 4))
    old = {r["face_id"]: r["crop_path"] for r in read(b.lib / "faces.parquet")}
    detect(b.src, b.lib, "--identity-from-folder", "--margin", "0.4", "--overwrite")
    new = {r["face_id"]: r["crop_path"] for r in read(b.lib / "faces.parquet")}
    assert new.keys() == old.keys() and all(new[f] != old[f] for f in old)
    res = invoke("embed", b.lib, "--backbone", "pixels", "--views", "hr,lr", "--device", "cpu")
    assert stat(res, "embedded_now") == str(2 * len(new))
    invoke("split", b.lib, "-q")
    invoke("pair", b.lib, "-m", 2, "--manifest-dir", tmp_path / "manifests", "--device", "cpu", "-q")
    audit_ok(b.lib)
    for row in read(b.manifests / "train.parquet"):
        assert row["hr_path"] == new[row["face_id"]]


def test_replaced_source_photo_is_redone(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=4, per_id=3, duplicate=False)
    detect(src, lib, "--identity-from-folder")
    shutil.copyfile(src / "id03/img0.png", src / "id01/img1.png")  # same name, other content
    res = invoke("detect", src, "--out", lib, *DETECT[:-1], "--identity-from-folder")
    assert stat(res, "processed_now") == "4"  # the one shard holding it
    fresh = tmp_path / "fresh"
    detect(src, fresh, "--identity-from-folder")
    no_prob = lambda d: [{k: v for k, v in r.items() if k != "prob"} for r in read(d / "faces.parquet")]  # NaN != NaN
    assert no_prob(lib) == no_prob(fresh)
    audit_ok(lib)


def test_touched_but_unchanged_source_is_not_redone(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=4, per_id=3, duplicate=False)
    detect(src, lib, "--identity-from-folder")
    (src / "id01/img1.png").write_bytes((src / "id01/img1.png").read_bytes())  # new mtime, same bytes
    res = invoke("detect", src, "--out", lib, *DETECT[:-1], "--identity-from-folder")
    assert stat(res, "processed_now") == "0"


def test_deleted_crop_is_restored_by_a_rerun(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=4, per_id=3, duplicate=False)
    detect(src, lib, "--identity-from-folder")
    crop = lib / read(lib / "faces.parquet")[5]["crop_path"]
    want = crop.read_bytes()
    crop.unlink()
    res = invoke("detect", src, "--out", lib, *DETECT[:-1], "--identity-from-folder")
    assert crop.read_bytes() == want and stat(res, "processed_now") == "4"
    audit_ok(lib)


def test_overwritten_crop_fails_audit_and_a_rerun_restores_it(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=4, per_id=3, duplicate=False)
    detect(src, lib, "--identity-from-folder")
    rows = read(lib / "faces.parquet")
    a, b = lib / rows[0]["crop_path"], lib / rows[-1]["crop_path"]
    want = a.read_bytes()
    shutil.copyfile(b, a)  # another face under this face's name
    res = invoke("audit", lib, ok=False)
    assert res.exit_code == 1 and f"{rows[0]['crop_path']}" in res.output and "sha256" in res.output, res.output
    detect(src, lib, "--identity-from-folder")
    assert a.read_bytes() == want
    audit_ok(lib)


def test_detect_with_another_src_into_a_built_library_is_refused(tmp_path):
    b = build(tmp_path)
    other = tmp_path / "other"
    make_faces(other, n_ids=3, per_id=2, seed=5, duplicate=False)
    before = {p: p.read_bytes() for p in b.lib.rglob("*") if p.is_file() and p.name != ".lock"}
    for wipe_work in (False, True):  # with its shards, and after `.work/` was cleaned away
        if wipe_work:
            shutil.rmtree(b.lib / ".work")
            before = {p: v for p, v in before.items() if ".work" not in p.parts}
        line = one_line_error(invoke("detect", other, "--out", b.lib, "--aligned", "--identity-from-folder",
                                     "--crop-size", 32, "-q", ok=False))
        assert str(b.lib) in line and str(b.src.resolve()) in line and str(other) in line and "--overwrite" in line
        assert {p: p.read_bytes() for p in b.lib.rglob("*") if p.is_file() and p.name != ".lock"} == before
    audit_ok(b.lib)
    invoke("detect", other, "--out", b.lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q", "--overwrite")
    assert pq.read_table(b.lib / "faces.parquet").num_rows == 6
