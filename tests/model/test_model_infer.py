"""`model infer`: inputs as users aim them, mirrored outputs, notes, infer.json, grids, --detect paste-back."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from model.checkpoint import save_checkpoint
from model.cli import app
from model.inputs import collect_inputs
from model.paste import auto_upscale, feather_mask, paste_back
from model.registry import create_model

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _ok(*args):
    r = _invoke(*args)
    assert r.exit_code == 0, f"{r.output}\n{r.exception!r}"
    return r


def _error(result, fragment: str) -> str:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error:") and fragment in text and "Traceback" not in text, text
    assert len(text.splitlines()) == 1, text
    return text


def _img(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained msrnet2_tiny_x4 in a run folder (only `last`): enough to test the plumbing."""
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "last.safetensors", create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    return run / "last.safetensors"


def test_two_same_names_in_two_folders_give_two_mirrored_outputs(ckpt, tmp_path):
    _img(tmp_path / "in" / "a" / "face.png", (16, 16), 1)
    _img(tmp_path / "in" / "b" / "c" / "face.png", (16, 16), 2)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    ref = _img(tmp_path / "ref.png", (64, 64), 3)
    _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--refs", ref, "--out", tmp_path / "out")
    a, b = tmp_path / "out" / "a" / "face_x4.png", tmp_path / "out" / "b" / "c" / "face_x4.png"
    assert a.is_file() and b.is_file() and Image.open(a).size == (64, 64)
    assert a.read_bytes() != b.read_bytes()
    rec = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert rec["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert rec["model"] == "msrnet2_tiny_x4" and rec["scale"] == 4 and rec["references"] == "files"
    assert [Path(i["input"]).relative_to(tmp_path / "in").as_posix() for i in rec["inputs"]] == ["a/face.png", "b/c/face.png"]
    face = rec["inputs"][0]["faces"][0]
    assert face["output"] == str(a) and face["references"][0]["path"] == str(ref)


def test_files_given_one_by_one_and_globs_also_mirror(ckpt, tmp_path):
    a = _img(tmp_path / "x" / "face.png", (16, 16), 1)
    b = _img(tmp_path / "y" / "face.png", (16, 16), 2)
    _ok("infer", "--checkpoint", ckpt, "--lr", a, "--lr", b, "--out", tmp_path / "o1")
    assert (tmp_path / "o1" / "x" / "face_x4.png").is_file() and (tmp_path / "o1" / "y" / "face_x4.png").is_file()
    _ok("infer", "--checkpoint", ckpt, "--lr", f"{tmp_path}/*/face.png", "--out", tmp_path / "o2")
    assert sorted(p.relative_to(tmp_path / "o2").as_posix() for p in (tmp_path / "o2").rglob("*.png")) == [
        "x/face_x4.png", "y/face_x4.png"]


def test_collect_inputs_relative_paths_and_duplicates(tmp_path):
    a = _img(tmp_path / "d" / "s" / "1.png", (16, 16))
    got = collect_inputs([str(tmp_path / "d"), str(a), f"{tmp_path}/d/**/*.png"])
    assert [i.rel.as_posix() for i in got] == ["s/1.png"]  # the same file three ways: once, relative to d/


def test_a_rerun_never_overwrites_silently(ckpt, tmp_path):
    lr = _img(tmp_path / "face.png", (16, 16))
    _ok("infer", "--checkpoint", ckpt, "--lr", lr, "--out", tmp_path / "out")
    first = (tmp_path / "out" / "face_x4.png").stat().st_mtime_ns
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", lr, "--out", tmp_path / "out"), "--overwrite")
    assert (tmp_path / "out" / "face_x4.png").stat().st_mtime_ns == first
    (tmp_path / "out" / "infer.json").unlink()  # an output left by another run is refused too, naming it
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", lr, "--out", tmp_path / "out"), "face_x4.png: exists")
    _ok("infer", "--checkpoint", ckpt, "--lr", lr, "--out", tmp_path / "out", "--overwrite")


def test_two_inputs_that_would_share_an_output_are_refused(ckpt, tmp_path):
    _img(tmp_path / "in" / "face.png", (16, 16))
    Image.open(tmp_path / "in" / "face.png").save(tmp_path / "in" / "face.jpg")
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--out", tmp_path / "out"), "rename one")


def test_resize_and_pad_notes_and_refusal(ckpt, tmp_path):
    _img(tmp_path / "in" / "big.png", (64, 64))
    _img(tmp_path / "in" / "wide.png", (20, 16))
    r = _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--out", tmp_path / "out")
    assert "big.png: 64x64, resized to 16x16 (bicubic)" in r.output, r.output
    assert "wide.png: 20x16, not square: centre-padded with its edge pixels to 20x20, then resized to 16x16" in r.output
    rec = json.loads((tmp_path / "out" / "infer.json").read_text())
    assert rec["inputs"][0]["prepared"] == "64x64, resized to 16x16 (bicubic)"
    text = _error(_invoke("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in" / "wide.png", "--non-square", "refuse",
                          "--out", tmp_path / "out2"), "20x16 is not square")
    assert "wide.png" in text


def test_no_references_is_said_once_with_how_to_give_them(ckpt, tmp_path):
    lr = _img(tmp_path / "face.png", (16, 16))
    r = _ok("infer", "--checkpoint", ckpt, "--lr", lr, "--out", tmp_path / "out")
    lines = [ln for ln in r.output.splitlines() if "no references" in ln]
    assert len(lines) == 1 and "--library" in lines[0] and "--refs" in lines[0], r.output
    r = _ok("infer", "--checkpoint", ckpt, "--lr", lr, "--refs", lr, "--out", tmp_path / "out2")
    assert "no references" not in r.output


def test_a_model_without_references_says_they_are_ignored(tmp_path):
    ck = tmp_path / "noref.safetensors"
    save_checkpoint(ck, create_model("sparnet_tiny_x8"), {"model": "sparnet_tiny_x8", "model_kwargs": {}})
    lr = _img(tmp_path / "face.png", (16, 16))
    r = _ok("infer", "--checkpoint", ck, "--lr", lr, "--out", tmp_path / "out")
    assert "no references" not in r.output and "ignored" not in r.output  # nothing to give: nothing said
    r = _ok("infer", "--checkpoint", ck, "--lr", lr, "--refs", lr, "--out", tmp_path / "out2")
    assert "sparnet_tiny_x8 takes no references" in r.output
    rec = json.loads((tmp_path / "out2" / "infer.json").read_text())
    faces = [f for i in rec["inputs"] for f in i.get("faces", [])]
    assert faces and all(not f["references"] for f in faces), rec


def test_grid_has_lr_bicubic_refs_sr_columns(ckpt, tmp_path):
    for k in range(3):
        _img(tmp_path / "in" / f"{k}.png", (16, 16), k)
    ref = _img(tmp_path / "ref.png", (64, 64), 9)
    r = _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--refs", ref, "--refs", ref, "--grid",
            "--out", tmp_path / "out")
    grid = tmp_path / "out" / "grid-001.png"
    assert f"grid: {grid}" in r.output
    assert Image.open(grid).size == (5 * 64, 14 + 3 * 64)  # LR, bicubic, 2 refs, SR; a label row on top
    assert json.loads((tmp_path / "out" / "infer.json").read_text())["grids"] == [str(grid)]


def test_checkpoint_folder_uses_best_else_last(ckpt, tmp_path):
    lr = _img(tmp_path / "face.png", (16, 16))
    r = _ok("infer", "--checkpoint", ckpt.parent, "--lr", lr, "--out", tmp_path / "out")
    assert "using" in r.output and "last.safetensors" in r.output
    assert json.loads((tmp_path / "out" / "infer.json").read_text())["checkpoint"] == str(ckpt)
    (tmp_path / "empty").mkdir()
    _error(_invoke("infer", "--checkpoint", tmp_path / "empty", "--lr", lr, "--out", tmp_path / "o2"),
           "without best.safetensors or last.safetensors")


def test_bad_inputs_are_one_line_errors(ckpt, tmp_path):
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", tmp_path / "nope.png"), "nope.png: no such file or folder")
    (tmp_path / "empty").mkdir()
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", tmp_path / "empty"), "a folder without images")
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", f"{tmp_path}/*.png"), "matches no file")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    _error(_invoke("infer", "--checkpoint", ckpt, "--lr", tmp_path / "bad.png", "--out", tmp_path / "o"),
           "bad.png: not a readable image")


def test_library_scale_mismatch_warns(tmp_path):
    from model.infer import check_library_scale

    (tmp_path / "embed.config.json").write_text(json.dumps({"views": ["hr", "lr"], "lr_scale": 8}))
    assert check_library_scale(tmp_path, 8) is None
    warning = check_library_scale(tmp_path, 4)
    assert "x8" in warning and "x4" in warning and "--lr-scale 4" in warning


def test_feather_mask_and_paste_back():
    m = feather_mask(40)
    assert m.shape == (40, 40) and m[20, 20] == 1.0 and m[0, 0] < 0.05 and np.allclose(m, m[::-1, ::-1])
    photo = Image.new("RGB", (50, 40), (10, 10, 10))
    sr = Image.new("RGB", (64, 64), (250, 250, 250))
    out = np.asarray(paste_back(photo, [((10, 5, 30, 25), sr)], 2))
    assert out.shape == (80, 100, 3)
    assert out[30, 40].min() == 250 and out[2, 2].max() == 10  # the face's middle restored, the rest the photo
    assert 10 < out[30, 21, 0] < 250  # feathered at the box edge
    assert auto_upscale((50, 40), [(10, 5, 30, 25)], 64, 4) == 3 and auto_upscale((5000, 40), [(0, 0, 8, 8)], 64, 8) == 1


def test_detect_skips_photos_without_a_face_and_pastes_the_rest(ckpt, tmp_path, monkeypatch):
    import model.paste

    a = _img(tmp_path / "in" / "group.png", (60, 40), 1)
    _img(tmp_path / "in" / "empty.png", (30, 30), 2)
    monkeypatch.setattr(model.paste, "find_faces", lambda photos, all_faces, margin, device: [
        [(5, 5, 21, 21), (30, 10, 46, 26)] if p.size == (60, 40) else [] for p in photos])
    r = _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--detect", "--all-faces", "--out", tmp_path / "out")
    assert "empty.png: no face found, skipped" in r.output and "1 photo(s) without a face skipped" in r.output
    out = tmp_path / "out"
    assert (out / "group_face1_x4.png").is_file() and (out / "group_face2_x4.png").is_file()
    assert Image.open(out / "group_restored.png").size == (240, 160)  # 16 px faces -> x4 (the model's scale)
    rec = {Path(i["input"]).name: i for i in json.loads((out / "infer.json").read_text())["inputs"]}
    assert rec["empty.png"]["status"] == "skipped" and rec["empty.png"]["reason"] == "no face found"
    assert [f["box"] for f in rec["group.png"]["faces"]] == [[5, 5, 21, 21], [30, 10, 46, 26]]
    assert rec["group.png"]["restored"] == str(out / "group_restored.png") and str(a) == rec["group.png"]["input"]
    assert all(f["pasted"] for f in rec["group.png"]["faces"])


def test_detect_does_not_paste_a_face_larger_than_the_sr(ckpt, tmp_path, monkeypatch):
    import model.paste

    photo = _img(tmp_path / "in" / "big.png", (200, 200), 1)
    monkeypatch.setattr(model.paste, "find_faces", lambda photos, all_faces, margin, device: [[(10, 10, 190, 190)]])
    r = _ok("infer", "--checkpoint", ckpt, "--lr", photo, "--detect", "--out", tmp_path / "out")
    assert "larger than the model's 64 px output" in r.output and "not pasted back" in r.output, r.output
    restored = tmp_path / "out" / "big_restored.png"
    assert np.array_equal(np.asarray(Image.open(restored)), np.asarray(Image.open(photo).convert("RGB")))
    rec = json.loads((tmp_path / "out" / "infer.json").read_text())["inputs"][0]
    assert rec["faces"][0]["pasted"] is False and (tmp_path / "out" / "big_x4.png").is_file()


def test_version():
    r = _invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("msrface ")


def test_detect_only_options_without_detect_are_a_usage_error(ckpt, tmp_path):
    lr = _img(tmp_path / "face.png", (16, 16))
    r = _invoke("infer", "--checkpoint", ckpt, "--lr", lr, "--all-faces", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "need --detect" in r.output
    assert not (tmp_path / "out").exists()
