"""Rough edges a new user hit in refbuild (issue 27): retrieval repeating a photo, small crops enlarged
silently, bystanders given the photo's label, a folder that is no library, Ctrl-C, summaries."""
from __future__ import annotations

import io
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

import refbuild.progress
from data_manifests import read_table
from refbuild.detect import DetectConfig, process_shard
from refbuild.detector import Faces
from refbuild.dupes import NEAR_DUP_CORR, thumbnails
from refbuild.errors import RefbuildError
from refbuild.retrieve import retrieve

from rb_helpers import DUP_ORIGINAL, invoke, make_faces, read


def test_retrieval_gives_one_reference_per_photo(tmp_path):
    """A photo under two names (byte-identical) and re-encoded under a third: the LR of that photo
    gets it once among its references, as `refbuild pair` would give it."""
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=6, per_id=3, size=48)  # id01/dup.png: a byte-identical copy of id00/img0.png
    a = np.asarray(Image.open(src / DUP_ORIGINAL), np.int16)
    a[::7, ::5] += 1  # other bytes, the same photo to the eye
    (src / "id05").mkdir(exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(src / "id05" / "reencoded.png")
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    lr = Image.open(src / DUP_ORIGINAL).resize((16, 16), Image.BICUBIC)
    refs = retrieve(lib, [lr], m=4, pool="all", device="cpu")[0]
    assert len(refs) == 4
    faces = {r["face_id"]: r for r in read(lib / "faces.parquet")}
    shas = [faces[r.face_id]["src_sha256"] for r in refs]
    assert len(set(shas)) == 4, [faces[r.face_id]["src_path"] for r in refs]
    t = thumbnails([r.path for r in refs])
    corr = t @ t.T
    assert (corr[~np.eye(4, dtype=bool)] <= NEAR_DUP_CORR).all(), [faces[r.face_id]["src_path"] for r in refs]
    assert [r.distance for r in refs] == sorted(r.distance for r in refs)


def test_a_folder_that_is_no_library_is_called_so(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(RefbuildError, match="not a refbuild library") as e:
        retrieve(tmp_path / "photos", [Image.new("RGB", (16, 16))], device="cpu")
    assert "embed" not in str(e.value).split(";")[0]
    with pytest.raises(RefbuildError, match="library folder not found"):
        retrieve(tmp_path / "nosuch", [Image.new("RGB", (16, 16))], device="cpu")


def test_detect_records_source_size_and_warns_of_enlarged_crops(tmp_path):
    src = tmp_path / "src"
    make_faces(src, n_ids=3, per_id=2, size=48, duplicate=False)
    res = invoke("detect", src, "--out", tmp_path / "big", "--aligned", "--crop-size", 64, "-q")
    line = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(line) == 1 and "6 of 6 faces" in line[0] and "--crop-size 64" in line[0] and "48 px" in line[0], res.output
    assert {r["src_side"] for r in read(tmp_path / "big" / "faces.parquet")} == {48}
    res = invoke("detect", src, "--out", tmp_path / "small", "--aligned", "--crop-size", 32, "-q")
    assert "warning" not in res.output, res.output
    assert {r["src_side"] for r in read(tmp_path / "small" / "faces.parquet")} == {48}


def test_a_library_made_before_source_sizes_reads_as_unknown(built, tmp_path):
    t = pq.read_table(built.lib / "faces.parquet")
    old = tmp_path / "faces.parquet"
    pq.write_table(t.drop_columns(["src_side"]).replace_schema_metadata(t.schema.metadata), old)
    back = read_table(old, "faces")
    assert back.column("src_side").null_count == back.num_rows == t.num_rows
    assert back.column("crop_path").equals(t.column("crop_path")) and back.column("identity").equals(t.column("identity"))


class _TwoFaces:
    """Stands for MTCNN: every photo holds two faces, the first the more confident."""

    def __init__(self, **_):
        pass

    def detect(self, images, batch_size=8):
        boxes = np.array([[10, 10, 60, 60], [64, 20, 110, 66]], np.float32)
        return [Faces(boxes, np.array([0.999, 0.98], np.float32), np.zeros((2, 5, 2), np.float32)) for _ in images]


def _group_photos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(src / f"group{k}.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,identity\ngroup0.png,alice\ngroup1.png,bob\n")
    return src, labels


def test_all_faces_labels_only_the_most_confident_face(tmp_path):
    src, labels = _group_photos(tmp_path)
    cfg = DetectConfig(src=src, out=tmp_path / "lib", labels=labels, identity_from="csv", all_faces=True)
    faces, _ = process_shard(["group0.png", "group1.png"], cfg, {"group0.png": "alice", "group1.png": "bob"},
                             _TwoFaces())
    got = [(r["src_path"], r["face_index"], r["identity"]) for r in faces.to_pylist()]
    assert got == [("group0.png", 0, "alice"), ("group0.png", 1, None), ("group1.png", 0, "bob"), ("group1.png", 1, None)]


def test_all_faces_says_it_left_bystanders_unlabelled(tmp_path, monkeypatch):
    import refbuild.detector

    src, labels = _group_photos(tmp_path)
    monkeypatch.setattr(refbuild.detector, "Detector", _TwoFaces)
    res = invoke("detect", src, "--out", tmp_path / "lib", "--labels", labels, "--all-faces", "--workers", 1,
                 "--device", "cpu")
    assert re.search(r"note: 2 face\(s\) of labelled photos were left unlabelled", res.output), res.output
    assert [r["identity"] for r in read(tmp_path / "lib" / "faces.parquet")] == ["alice", None, "bob", None]


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    import refbuild.detect
    from refbuild.cli import main

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(refbuild.detect, "run", interrupted)
    (tmp_path / "src").mkdir()
    res = invoke("detect", tmp_path / "src", "--out", tmp_path / "lib", ok=False)
    assert res.exit_code == 130, res.output
    assert res.output.strip().splitlines() == ["interrupted; rerun the same command to resume"], res.output
    monkeypatch.setattr(sys, "argv", ["refbuild", "detect", str(tmp_path / "src"), "--out", str(tmp_path / "lib")])
    with pytest.raises(SystemExit) as e:  # the installed entry point too
        main()
    assert e.value.code == 130


def test_margin_default_says_why_it_differs_from_infer():
    from pathlib import Path

    res = invoke("detect", "--help", env={"COLUMNS": "200"})
    text = " ".join(res.output.split())
    assert "0.52" in text and "model infer --detect" in text, res.output
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    pipeline = readme.split("## The pipeline", 1)[1].split("\n## ", 1)[0]
    assert "--margin 0.52" in pipeline and "--margin 0" in pipeline, "README's pipeline section says nothing of --margin"


def test_a_no_op_rerun_shows_no_none(tmp_path):
    src = tmp_path / "src"
    make_faces(src, n_ids=2, per_id=2, size=48, duplicate=False)
    invoke("detect", src, "--out", tmp_path / "lib", "--aligned", "--crop-size", 32)
    res = invoke("detect", src, "--out", tmp_path / "lib", "--aligned", "--crop-size", 32)
    assert "images_per_s" in res.output and "None" not in res.output, res.output


def test_summary_title_never_breaks_its_path(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(refbuild.progress, "console", Console(file=buf, width=60, color_system=None))
    path = "/very/long/" + "x" * 80 + "/lib"
    refbuild.progress.summary(f"refbuild detect -> {path}", [("faces", 12)])
    assert path in buf.getvalue().splitlines()[0], buf.getvalue()


def test_report_names_the_features_without_a_none():
    from refbuild.library import Library
    from refbuild.report import _summary_html

    meta = {"backbone": "pixels", "weights_id": "none", "note": "pixels: 16x16 RGB, mean-removed (baseline, no network)",
            "m": "2", "pool": "train", "query_view": "hr"}
    html = _summary_html(Library(__import__("pathlib").Path("/lib")), [], {}, [], meta, 0)
    assert "(none)" not in html and "pixels: 16x16 RGB" in html
