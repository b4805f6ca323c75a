"""Issue 14: the cases that ended with a wrong or lost result and exit 0. Each test
failed before its fix (the case is named in the docstring)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from rb_helpers import build, invoke, make_faces, one_line_error, read


def _lib(tmp: Path, name: str, n_ids: int = 10, seed: int = 0) -> Path:
    src, lib = tmp / f"src_{name}", tmp / name
    make_faces(src, n_ids=n_ids, per_id=4, seed=seed)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", lib, "-q")
    return lib


def test_manifests_belong_to_their_library(tmp_path, monkeypatch):
    """14.1: two libraries both called `lib`, paired from one folder, used to share
    ./data_manifests/lib/ (the second replaced the first, audit of the first passed on it)."""
    a, b = _lib(tmp_path / "a", "lib", seed=0), _lib(tmp_path / "b", "lib", seed=1)
    monkeypatch.chdir(tmp_path)
    invoke("pair", a, "-m", 2, "--device", "cpu", "-q")
    invoke("pair", b, "-m", 2, "--device", "cpu", "-q")
    assert not (tmp_path / "data_manifests").exists()
    for lib in (a, b):
        cfg = json.loads((lib / "pair.config.json").read_text())
        assert cfg["lib"] == str(lib.resolve())  # resolved: found from any folder
        for split, path in cfg["manifests"].items():
            assert Path(path) == (lib / "manifests" / "lib" / f"{split}.parquet").resolve()
            assert pq.read_schema(path).metadata[b"ref_root"].decode() == str(lib.resolve())
    # a shared --manifest-dir: b may not overwrite the manifests a made
    shared = tmp_path / "shared"
    invoke("pair", a, "-m", 2, "--manifest-dir", shared, "--device", "cpu", "-q")
    before = (shared / "lib" / "train.parquet").read_bytes()
    line = one_line_error(invoke("pair", b, "-m", 2, "--manifest-dir", shared, "--device", "cpu", "-q", ok=False))
    assert str(shared / "lib") in line and f"made from library {a.resolve()}" in line and "--name" in line
    assert (shared / "lib" / "train.parquet").read_bytes() == before
    monkeypatch.chdir(tmp_path / "a")  # audit from another folder finds a's own manifests
    res = invoke("audit", a)
    assert "manifests/lib/train.parquet" not in res.output or "audit passed" in res.output
    # and a manifest of b given to a's audit is named as b's
    res = invoke("audit", a, "--manifest", b / "manifests" / "lib" / "train.parquet", ok=False)
    assert res.exit_code == 1 and f"made from library '{b.resolve()}'" in res.output


def test_identity_is_the_immediate_folder(tmp_path):
    """14.3: `--identity-from-folder` used the whole relative folder path, so one person
    under two parent folders became two identities; a photo directly in SRC has none."""
    src, lib = tmp_path / "src", tmp_path / "lib"
    for rel in ("data/test_images/angelina_jolie/a.png", "data/test_images_aligned/angelina_jolie/b.png",
                "data/c.png", "top.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (len(rel) * 7 % 256, 90, 30)).save(src / rel)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    ident = {f["src_path"]: f["identity"] for f in read(lib / "faces.parquet")}
    assert ident == {"data/test_images/angelina_jolie/a.png": "angelina_jolie",
                     "data/test_images_aligned/angelina_jolie/b.png": "angelina_jolie",
                     "data/c.png": "data", "top.png": None}


def test_empty_split_is_an_error(tmp_path):
    """14.5: a split with a non-zero share left empty passed (a 0-row test manifest)."""
    lib = _lib(tmp_path, "lib")  # 10 identity groups, --ratios 14,3,1: test used to get 0 faces
    assert {r["split"] for r in read(lib / "splits.parquet")} >= {"train", "val", "test"}
    src, small = tmp_path / "src2", tmp_path / "small"
    make_faces(src, n_ids=2, per_id=2, duplicate=False)
    invoke("detect", src, "--out", small, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    line = one_line_error(invoke("split", small, "--ratios", "1,1,1", "-q", ok=False))
    assert "2 identity groups" in line and "test" in line and "empty" in line and "--allow-empty" in line
    assert not (small / "splits.parquet").exists()
    invoke("split", small, "--ratios", "1,1,1", "--allow-empty", "-q")  # asked for: allowed
    assert (small / "splits.parquet").is_file()


def test_rerun_with_other_settings_is_refused_and_stale_stages_are_flagged(tmp_path):
    """14.6: `split --ratios 8,1,1` after 14,3,1 and `pair -m 3` after -m 2 just reran;
    after a re-split audit did not say "rerun pair" and `model train` took the stale manifests."""
    b = build(tmp_path)
    line = one_line_error(invoke("pair", b.lib, "-m", 3, "--manifest-dir", b.manifests.parent, "--device", "cpu", "-q", ok=False))
    assert "other settings (m)" in line and "--overwrite" in line
    line = one_line_error(invoke("split", b.lib, "--ratios", "8,1,1", "-q", ok=False))
    assert "ratios" in line and "--overwrite" in line
    invoke("split", b.lib, "--ratios", "8,1,1", "--overwrite", "-q")
    res = invoke("audit", b.lib, ok=False)
    assert res.exit_code == 1
    stale = [ln for ln in res.output.splitlines() if "stale" in ln and "splits.parquet changed" in ln]
    assert stale and all(f"rerun `refbuild pair {b.lib.resolve()} -m 2" in ln for ln in stale), res.output
    from model.cli import app as model_app

    r = CliRunner().invoke(model_app, ["train", "--manifest", str(b.manifests / "train.parquet"), "--model", "msrnet_tiny_x4",
                                       "--runs-dir", str(tmp_path / "runs"), "--steps", "1", "--device", "cpu"])
    assert r.exit_code == 1 and "stale" in r.output and "refbuild pair" in r.output, r.output
    invoke("pair", b.lib, "-m", 2, "--manifest-dir", b.manifests.parent, "--device", "cpu", "-q")  # same settings: updates
    invoke("audit", b.lib)


def test_configs_are_resolved(tmp_path, monkeypatch):
    """Also: every *.config.json holds absolute paths, what was used, and the versions."""
    monkeypatch.chdir(tmp_path)
    make_faces(Path("src"), n_ids=4, per_id=2, duplicate=False)
    invoke("detect", "src", "--out", "lib", "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", "lib", "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", "lib", "--ratios", "2,1,1", "-q")
    invoke("pair", "lib", "-m", 1, "--device", "cpu", "-q")
    for stage in ("detect", "embed", "split", "pair"):
        cfg = json.loads((tmp_path / "lib" / f"{stage}.config.json").read_text())
        assert Path(cfg["lib" if stage != "detect" else "out"]).is_absolute(), stage
        prov = cfg["provenance"]
        assert prov["msrface_version"] and prov["python"] and prov["torch"], stage
        assert "git_commit" in prov
    assert json.loads((tmp_path / "lib" / "embed.config.json").read_text())["used"]["device"] == "cpu"
    assert json.loads((tmp_path / "lib" / "pair.config.json").read_text())["used"]["device"] == "cpu"
    assert isinstance(json.loads((tmp_path / "lib" / "detect.config.json").read_text())["used"]["workers"], int)


def test_near_duplicates_are_one_photo(tmp_path):
    """14.4: a photo under three names filled all of a query's references, and a JPEG
    q70 re-encoding of a photo was paired with its original as a "non-identity" reference."""
    src, lib = tmp_path / "src", tmp_path / "lib"
    make_faces(src, n_ids=10, per_id=4, duplicate=False)
    for name in ("copy1.png", "copy2.png"):  # one photo under three names
        shutil.copyfile(src / "id03" / "img0.png", src / "id03" / name)
    with Image.open(src / "id05" / "img1.png") as im:  # re-encoded under another identity's folder
        im.save(src / "id07" / "reenc.jpg", quality=70)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", lib, "--ratios", "1,1,1", "-q")
    invoke("pair", lib, "-m", 3, "--pool", "all", "--device", "cpu", "-q")
    by_path = {f["src_path"]: f["face_id"] for f in read(lib / "faces.parquet")}
    splits = {r["face_id"]: r for r in read(lib / "splits.parquet")}
    orig, reenc = by_path["id05/img1.png"], by_path["id07/reenc.jpg"]
    assert splits[orig]["group"] == splits[reenc]["group"]  # one photo: one group, one split
    copies = {by_path[f"id03/{n}"] for n in ("img0.png", "copy1.png", "copy2.png")}
    pairs = read(lib / "pairs.parquet")
    for p in pairs:
        refs = set(p["ref_face_ids"])
        assert len(refs & copies) <= 1, p  # never two references of one photo
        if p["query_face_id"] == orig:
            assert reenc not in refs
        if p["query_face_id"] == reenc:
            assert orig not in refs
    assert all(p["n_refs"] == 3 for p in pairs)
    invoke("pair", lib, "-m", 3, "--device", "cpu", "--overwrite", "-q")  # the leak-free pool, which audit accepts
    invoke("audit", lib)
    # audit checks both: a reference list holding two copies, and the query's own re-encoding
    import pyarrow as pa

    t = pq.read_table(lib / "pairs.parquet")
    rows = t.to_pylist()
    other = next(r for r in rows if r["query_face_id"] not in copies)
    other["ref_face_ids"][:2] = sorted(copies)[:2]
    q = next(r for r in rows if r["query_face_id"] == orig)
    q["ref_face_ids"][0] = reenc
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), lib / "pairs.parquet")
    res = invoke("audit", lib, "--no-hashes", ok=False)
    assert res.exit_code == 1
    assert "are one photo" in res.output and f"reference {reenc} is the same photo" in res.output, res.output
