"""Hostile inputs (issue 15): a malformed labels.csv, a query too big or too slow, and a
library whose manifests, links or files point somewhere they should not. Each is one
`error:` line (or one audit violation) naming the file and saying what to do."""
from __future__ import annotations

import json
import os
import shutil
import tracemalloc
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from model.data import ManifestDataset
from model.errors import MsrError
from rb_helpers import build, invoke, make_faces, one_line_error, read
from rel_helpers import record
from refbuild.db import run_query
from refbuild.errors import RefbuildError
from refbuild.library import Library
from tampering import clone, rewrite

NFC, NFD = unicodedata.normalize("NFC", "José"), unicodedata.normalize("NFD", "José")


def flat(res) -> str:
    return " ".join(res.output.split())


def violations(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.startswith("violation")]


# -- A, B: labels.csv ------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("photos") / "src"
    make_faces(src, n_ids=3, per_id=2, duplicate=False)
    return src


def detect_labels(src: Path, labels: Path, out: Path, ok: bool = True):
    return invoke("detect", src, "--out", out, "--aligned", "--labels", labels, "--crop-size", 32, "-q", ok=ok)


BAD_LABELS = {  # name -> (bytes of labels.csv, what the one error line must say)
    "row with only a path": (b"path,identity\nid00/img0.png,a\nid00/img1.png\n", "line 3"),
    "latin-1": ("path,identity\nid00/img0.png,a\nid01/img0.png,Jos\u00e9\n".encode("latin-1"),
                "not UTF-8 at line 3; re-save it as UTF-8"),
    "one path, two identities": (b"path,identity\nid00/img0.png,alice\nid00/img1.png,alice\nid00/img0.png,bob\n",
                                 "'id00/img0.png' is 'alice' at line 2 and 'bob' at line 4"),
    "a field over csv's size limit": (b"path,identity\nid00/img0.png,a\nid00/img1.png,\"" + b"x" * 200_000 + b"\"\n",
                                      "not a readable CSV at line 3"),
}


@pytest.mark.parametrize("name", list(BAD_LABELS))
def test_bad_labels_csv_is_one_line(photos, tmp_path, name):
    data, says = BAD_LABELS[name]
    labels = tmp_path / "labels.csv"
    labels.write_bytes(data)
    line = one_line_error(detect_labels(photos, labels, tmp_path / "lib", ok=False))
    flat_line = " ".join(line.split())
    assert str(labels) in flat_line and says in flat_line, line
    assert not (tmp_path / "lib" / "faces.parquet").exists()
    record("hostile_inputs", f"labels: {name}")


def test_labels_with_bom_and_unicode_forms_just_work(photos, tmp_path):
    """A UTF-8 BOM (Excel's "CSV UTF-8") is no part of the `path` column; 'José' composed (NFC)
    and decomposed (NFD), with stray spaces, is one identity; a path twice with one identity is fine."""
    labels = tmp_path / "labels.csv"
    rows = [("id00/img0.png", NFC), ("id00/img1.png", f" {NFD} "), ("id01/img0.png", "bob"), ("id01/img0.png", "bob")]
    labels.write_bytes(b"\xef\xbb\xbf" + ("path,identity\n" + "".join(f"{p},{i}\n" for p, i in rows)).encode())
    detect_labels(photos, labels, tmp_path / "lib")
    got = {r["src_path"]: r["identity"] for r in read(tmp_path / "lib" / "faces.parquet")}
    assert got["id00/img0.png"] == got["id00/img1.png"] == NFC
    assert got["id01/img0.png"] == "bob"
    # the same path as José in both forms is one identity, not a conflict
    labels.write_text(f"path,identity\nid00/img0.png,{NFC}\nid00/img0.png,{NFD}\n", encoding="utf-8")
    detect_labels(photos, labels, tmp_path / "lib2")
    record("hostile_inputs", "labels: BOM, NFC/NFD identities")


def test_folder_identities_are_nfc(tmp_path):
    """Two folders 'José' (NFC) and 'José' (NFD), distinct names on Linux: one identity."""
    src = tmp_path / "src"
    make_faces(src, n_ids=2, per_id=2, duplicate=False)
    os.rename(src / "id00", src / NFC)
    os.rename(src / "id01", src / NFD)
    invoke("detect", src, "--out", tmp_path / "lib", "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    assert {r["identity"] for r in read(tmp_path / "lib" / "faces.parquet")} == {NFC}
    record("hostile_inputs", "folder: NFC/NFD identities")


# -- C: refbuild query ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    b = build(tmp_path_factory.mktemp("pristine"))
    return b.lib, b.manifests


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_query_table_holds_only_the_rows_it_shows(pristine):
    """`SELECT * FROM range(300000000)` ran out of memory: the table view fetched every row to show 50."""
    lib, _ = pristine
    out = {}
    peak = _peak_mb(lambda: out.setdefault("res", invoke("query", lib, "SELECT * FROM range(1000000)")))
    assert "showing first 50 rows; add LIMIT" in flat(out["res"]), out["res"].output
    assert peak < 20, f"{peak:.0f} MB held to show 50 rows"
    assert "2 rows" in flat(invoke("query", lib, "SELECT * FROM range(2)"))
    record("hostile_inputs", "query: huge result, table")


def test_query_csv_and_json_stream(pristine):
    lib, _ = pristine
    out = {}
    peak = _peak_mb(lambda: out.setdefault("res", invoke("query", lib, "SELECT * FROM range(1000000)", "-f", "csv")))
    assert out["res"].output.count("\n") == 1_000_001
    assert peak < 40, f"{peak:.0f} MB held to stream a CSV"
    for sql in ("SELECT face_id, identity FROM faces ORDER BY face_id", "SELECT 1 AS a WHERE false"):  # bytes unchanged
        cols, rows = run_query(Library(lib), sql)
        assert invoke("query", lib, sql, "-f", "json").output == json.dumps([dict(zip(cols, r)) for r in rows], default=str) + "\n"
    record("hostile_inputs", "query: huge result, csv/json")


def test_query_time_limit(pristine):
    lib, _ = pristine
    slow = "SELECT count(*) FROM range(1000000000000)"
    line = one_line_error(invoke("query", lib, slow, "--timeout", "1", ok=False))
    assert str(lib) in line and "stopped after 1 s" in line and "--timeout" in line, line
    with pytest.raises(RefbuildError, match="stopped after 0.5 s"):
        run_query(Library(lib), slow, timeout=0.5)
    assert run_query(Library(lib), "SELECT * FROM range(10)", max_rows=3)[1] == [(0,), (1,), (2,)]
    record("hostile_inputs", "query: too slow")


# -- D: audit and the data loader --------------------------------------------------------

def test_manifest_rooted_at_etc(pristine, tmp_path):
    """hr_root /etc, every hr_path `passwd`: the files are there, so the file check passed."""
    lib, man = clone(*pristine, tmp_path)

    def passwd(rows):
        for r in rows:
            r["hr_path"] = "passwd"

    rewrite(man / "train.parquet", passwd, meta={"hr_root": "/etc"})
    res = invoke("audit", lib, ok=False)
    assert res.exit_code == 1 and "hr_root '/etc' is not a refbuild library" in flat(res), res.output
    rewrite(man / "val.parquet", meta={"hr_root": "/etc", "ref_root": "/etc"})
    res = invoke("audit", lib, ok=False)
    assert "ref_root '/etc' is not a refbuild library" in flat(res), res.output
    record("hostile_inputs", "manifest rooted at /etc")


def test_crop_symlinked_out_of_the_library(pristine, tmp_path):
    lib, man = clone(*pristine, tmp_path)
    hr = pq.read_table(man / "train.parquet").to_pylist()[0]["hr_path"]
    outside = tmp_path / "outside.png"
    shutil.copyfile(lib / hr, outside)
    (lib / hr).unlink()
    (lib / hr).symlink_to(outside)
    res = invoke("audit", lib, "--no-hashes", ok=False)
    assert res.exit_code == 1 and f"crop {hr} missing or outside the library" in flat(res), res.output
    with pytest.raises(MsrError, match=f"resolves to {outside}, outside its root") as e:
        ManifestDataset(man / "train.parquet", scale=2)
    assert "\n" not in str(e.value)
    record("hostile_inputs", "crop symlinked out")


def test_features_deleted_under_pairs(pristine, tmp_path):
    """features.parquet deleted, pairs and manifests kept, and no fingerprints recorded (an older
    refbuild): nothing said it was missing."""
    lib, man = clone(*pristine, tmp_path)
    (lib / "features.parquet").unlink()
    for p in [lib / "pairs.parquet", *man.glob("*.parquet")]:
        rewrite(p, drop_meta=("inputs",))
    res = invoke("audit", lib, "--no-hashes", ok=False)
    assert res.exit_code == 1, res.output
    assert f"{lib / 'features.parquet'}: missing, yet pairs.parquet" in flat(res) and "refbuild embed" in flat(res), res.output
    record("hostile_inputs", "features deleted under pairs")


def test_moved_library_is_one_line(tmp_path):
    """A library (manifests in LIB/manifests, the default) and its photos moved as one folder:
    one line per file of every manifest before, now one line saying so."""
    old = tmp_path / "old"
    src, lib = old / "src", old / "lib"
    make_faces(src)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", lib, "-q")
    invoke("pair", lib, "-m", 2, "--device", "cpu", "-q")
    os.rename(old, tmp_path / "new")
    res = invoke("audit", tmp_path / "new" / "lib", ok=False)
    v = violations(res)
    assert res.exit_code == 1 and len(v) == 2, res.output
    assert f"this library moved from {lib.resolve()}" in flat(res) and "--data-root" in flat(res), res.output
    assert f"{src}: source folder of faces.parquet not found" in flat(res), res.output
    record("hostile_inputs", "library moved")
