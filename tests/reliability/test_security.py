"""Security: no path escapes the library or source folder, `refbuild query` cannot
write or read outside the library, and weight files are never unpickled."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import duckdb
import pytest
import torch

from rb_helpers import build, invoke, make_faces, one_line_error
from refbuild.db import connect
from refbuild.library import Library
from rel_helpers import accounted, assert_same, record, snapshot
from tampering import rewrite


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build(tmp_path_factory.mktemp("sec"))


SECRET = "top-secret-outside-the-library"

ATTACKS = [
    "COPY faces TO '{out}/copied.csv'",
    "ATTACH '{out}/new.duckdb' AS x",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO faces SELECT * FROM faces",
    "DROP VIEW faces",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "PRAGMA enable_external_access",
    "EXPORT DATABASE '{out}/exported'",
    "SELECT 1; COPY faces TO '{out}/second.csv'",
    "SELECT * FROM query('COPY faces TO ''{out}/inner.csv''')",
    "SELECT * FROM read_csv('{out}/secret.csv')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('{lib}/../../secret.csv')",
    "SELECT * FROM read_csv('{lib}/link_out.csv')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_json_auto('/proc/self/environ')",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_query_cannot_write_or_read_outside(lib, tmp_path, monkeypatch, attack):
    out = tmp_path / "out"
    out.mkdir()
    (out / "secret.csv").write_text(f"x\n{SECRET}\n")
    shutil.copyfile(out / "secret.csv", lib.lib.parent / "secret.csv")
    link = lib.lib / "link_out.csv"  # a link inside the library to a file outside it
    link.unlink(missing_ok=True)
    link.symlink_to(out / "secret.csv")
    before = snapshot(lib.lib)
    monkeypatch.chdir(tmp_path)
    try:
        res = invoke("query", lib.lib, attack.format(out=out, lib=lib.lib), "--format", "csv", ok=False)
    finally:
        link.unlink()
    line = one_line_error(res)
    assert SECRET not in res.output and "root:" not in res.output
    assert any(s in line for s in ("read-only SELECT", "Permission Error", "single SELECT", "does not parse")), line
    assert sorted(p.name for p in out.iterdir()) == ["secret.csv"], "the query wrote a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the query wrote into the working folder"
    after = snapshot(lib.lib)
    after.pop("lib/link_out.csv", None)
    before.pop("lib/link_out.csv", None)
    assert_same(after, before, "library after a hostile query")
    record("security_attacks", attack)


def test_connection_itself_is_locked_down(lib, tmp_path):
    """Even past the SELECT-only check, the connection can neither write files nor
    lift its own restrictions."""
    con, present = connect(Library(lib.lib))
    try:
        assert "faces" in present
        for sql in (f"COPY faces TO '{tmp_path}/x.csv'", "SET enable_external_access = true",
                    "SET allowed_directories = ['/']", f"ATTACH '{tmp_path}/y.duckdb'"):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
    finally:
        con.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "/etc/passwd"])
def test_embed_refuses_crop_path_outside_library(lib, tmp_path, bad):
    copy = tmp_path / "lib"
    shutil.copytree(lib.lib, copy)
    rewrite(copy / "faces.parquet", lambda rows: rows[3].__setitem__("crop_path", bad))
    res = invoke("embed", copy, "--backbone", "pixels", "--device", "cpu", "--overwrite", "-q", ok=False)
    line = one_line_error(res)
    assert "escapes the library" in line and bad in line
    record("security_attacks", f"embed crop_path {bad}")


def test_labels_paths_outside_source_are_never_read(tmp_path):
    """A labels CSV naming files outside SRC (.. and absolute) reads none of them."""
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=2, per_id=2, duplicate=False)
    outside = tmp_path / "outside.png"
    shutil.copyfile(src / "id00" / "img0.png", outside)
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "identity"])
        w.writerows([["id00/img0.png", "a"], ["../outside.png", "b"], [str(outside), "c"]])
    invoke("detect", src, "--out", lib, "--aligned", "--labels", labels, "-q")
    faces, rejects = accounted(lib)
    assert set(faces) == {"id00/img0.png", "id00/img1.png", "id01/img0.png", "id01/img1.png"}
    assert {rejects[k]["reason"] for k in ("../outside.png", str(outside))} == {"missing_file"}
    assert all(r["src_sha256"] is None for r in rejects.values()), "a file outside SRC was read"
    record("security_attacks", "labels paths outside SRC")


class _Evil:
    """Unpickling this runs a shell command: what torch.load(weights_only=False) would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_file_is_never_unpickled(lib, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "vgg_face_dag.pth"
    torch.save({"conv1_1.weight": _Evil(marker)}, evil)
    res = invoke("embed", lib.lib, "--weights", evil, "--device", "cpu", "--overwrite", "-q", ok=False)
    line = one_line_error(res)
    assert "not a loadable weights file" in line, line
    assert not marker.exists(), "the weights file ran code when loaded"
    record("security_attacks", "pickled payload as VGGFace weights")
