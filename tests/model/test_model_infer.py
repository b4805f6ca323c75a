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
    assert Image.open(grid).size == (5 * 64, 14 + 3 * (14 + 64))  # LR, bicubic, 2 refs, SR; labels on top, a name per row
    assert json.loads((tmp_path / "out" / "infer.json").read_text())["grids"] == [str(grid)]


def test_grid_rows_name_their_input_file(ckpt, tmp_path, monkeypatch):
    """Each row of a grid says which input it shows (a caption line above it)."""
    import model.infer

    seen = []
    real = model.infer.labelled_grid
    monkeypatch.setattr(model.infer, "labelled_grid", lambda rows, labels, tile, names=None: (
        seen.append(names), real(rows, labels, tile, names))[1])
    for k in range(2):
        _img(tmp_path / "in" / "sub" / f"face{k}.png", (16, 16), k)
    _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--grid", "--out", tmp_path / "out")
    assert seen == [["sub/face0.png", "sub/face1.png"]]
    grid = Image.open(tmp_path / "out" / "grid-001.png").convert("RGB")
    caption = np.asarray(grid.crop((0, 14, grid.width, 28)))  # the first row's caption line: light, with dark text
    assert caption.min() < 100 and caption.max() > 200


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
    kept = np.asarray(paste_back(photo, [((10, 5, 30, 25), sr)], 2, keep_out=[(24.0, 10.0, 40.0, 30.0)]))
    assert kept[30, 40].min() == 250 and kept[30, 48].max() == 10  # a face left as it was keeps the photo's pixels
    assert (kept[20:60, 48:80] == np.asarray(photo.resize((100, 80), Image.BICUBIC))[20:60, 48:80]).all()
    frac = np.asarray(paste_back(photo, [((10, 5, 30, 25), sr)], 2, keep_out=[(23.6, 9.5, 40.0, 30.0)]))
    assert frac[30, 47].max() == 10 and frac[30, 46].min() > 10  # a fractional box: every pixel it touches kept
    assert auto_upscale((50, 40), [(10, 5, 30, 25)], 64, 4) == 3 and auto_upscale((5000, 40), [(0, 0, 8, 8)], 64, 8) == 1


def _fake_detector(monkeypatch, faces_by_size: dict, seen: list | None = None):
    """model.paste.find_faces replaced: photos of a given size hold the given detector boxes (p = 0.99)."""
    import model.paste
    from model.paste import Found
    from refbuild.detect import square_box

    def find_faces(photos, margin, device="auto", **kw):
        if seen is not None:
            seen.append(kw)
        return [[Found(square_box(np.array(b, np.float32), margin), tuple(map(float, b)), 0.99)
                 for b in faces_by_size.get(p.size, [])] for p in photos]

    monkeypatch.setattr(model.paste, "find_faces", find_faces)


def _faces_of(out: Path) -> dict:
    return {Path(i["input"]).name: i for i in json.loads((out / "infer.json").read_text())["inputs"]}


def test_detect_skips_photos_without_a_face_and_pastes_the_rest(ckpt, tmp_path, monkeypatch):
    a = _img(tmp_path / "in" / "group.png", (60, 40), 1)
    _img(tmp_path / "in" / "empty.png", (30, 30), 2)
    _fake_detector(monkeypatch, {(60, 40): [(8, 8, 18, 18), (33, 13, 43, 23)]})  # 10 px faces: 15 px crops
    r = _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--detect", "--all-faces", "--out", tmp_path / "out")
    assert "empty.png: no face found, skipped" in r.output and "1 photo(s) skipped (first: no face found)" in r.output
    assert "2 face(s) restored, 0 left as they were" in r.output, r.output
    out = tmp_path / "out"
    assert (out / "group_face1_x4.png").is_file() and (out / "group_face2_x4.png").is_file()
    assert Image.open(out / "group_restored.png").size == (240, 160)  # 15 px crops -> x4 (the model's scale)
    rec = _faces_of(out)
    assert rec["empty.png"]["status"] == "skipped" and rec["empty.png"]["reason"] == "no face found"
    assert [f["box"] for f in rec["group.png"]["faces"]] == [[5, 5, 20, 20], [30, 10, 45, 25]]
    assert rec["group.png"]["restored"] == str(out / "group_restored.png") and str(a) == rec["group.png"]["input"]
    assert rec["group.png"]["status"] == "restored"
    assert all(f["pasted"] and f["decision"] == "restored" and f["agreement_db"] >= 30 for f in rec["group.png"]["faces"])


def test_the_size_rule_restores_small_faces_and_leaves_wider_ones():
    from model.paste import MAX_FACE, size_rule

    for width in (8, 12, 16, 24, 32, MAX_FACE):
        assert size_rule(width) is None, width
    for width in (MAX_FACE + 1, 48, 64, 96, 150):
        assert size_rule(width) == f"wider than {MAX_FACE:g} px", width
    assert size_rule(30, max_face=32) is None and size_rule(40, max_face=32) == "wider than 32 px"


def test_detect_restores_a_small_face_and_leaves_a_wide_one_in_the_same_photo(ckpt, tmp_path, monkeypatch):
    photo = _img(tmp_path / "two.png", (200, 120), 1)
    from model.paste import MAX_FACE

    _fake_detector(monkeypatch, {(200, 120): [(10, 10, 24, 24), (100, 20, 160, 90)]})  # 14 px and 60 px wide
    r = _ok("infer", "--checkpoint", ckpt, "--lr", photo, "--detect", "--all-faces", "--out", tmp_path / "out")
    assert f"1 face(s) restored, 1 left as they were (wider than {MAX_FACE} px)" in r.output, r.output
    small, wide = _faces_of(tmp_path / "out")["two.png"]["faces"]
    assert small["decision"] == "restored" and small["width"] == 14 and small["pasted"]
    assert wide["decision"] == "left" and wide["reason"] == f"wider than {MAX_FACE} px" and not wide["pasted"]
    assert "output" not in wide and not (tmp_path / "out" / "two_face2_x4.png").exists()  # never run through the model
    restored = np.asarray(Image.open(tmp_path / "out" / "two_restored.png"), dtype=np.float64)
    up = _faces_of(tmp_path / "out")["two.png"]["upscale"]
    plain = np.asarray(Image.open(photo).convert("RGB").resize((200 * up, 120 * up), Image.BICUBIC), dtype=np.float64)
    l, t, r_, b = (v * up for v in wide["box"])
    assert np.array_equal(restored[t:b, l:r_], plain[t:b, l:r_])  # the wide face: the photo's own bicubic pixels


def test_a_restoration_is_never_pasted_over_a_face_with_more_detail():
    from model.paste import MIN_AGREEMENT, fit_to_face, paste_rule

    rng = np.random.default_rng(0)
    face = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((24, 24), Image.BICUBIC)
    sr = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).resize((128, 128), Image.BICUBIC)
    plain, agreement = fit_to_face(sr, face, 96, iters=0)  # a restoration unrelated to the face
    assert plain.size == (96, 96) and agreement < MIN_AGREEMENT
    assert paste_rule(96, 24, agreement).startswith("restoration disagrees with the face: ")
    fitted, agreement = fit_to_face(sr, face, 96)  # back-projected: shrunk back, it is the face
    assert agreement >= MIN_AGREEMENT and paste_rule(96, 24, agreement) is None
    assert paste_rule(24, 24, 99.0) == "output no larger than the face: 24 px <= 24 px"
    assert paste_rule(20, 24, 99.0) is not None
    assert paste_rule(192, 130, 99.0, sr_side=128) == "restoration no larger than the face: 128 px <= 130 px"


def test_nothing_restored_is_said_and_no_restored_photo_is_written(ckpt, tmp_path, monkeypatch):
    from model.paste import MAX_FACE

    photo = _img(tmp_path / "in" / "big.png", (200, 200), 1)
    small = _img(tmp_path / "in" / "small.png", (60, 40), 2)
    _fake_detector(monkeypatch, {(200, 200): [(30, 30, 150, 170)], (60, 40): [(8, 8, 18, 18)]})
    r = _ok("infer", "--checkpoint", ckpt, "--lr", photo, "--detect", "--out", tmp_path / "out")
    assert (f"0 face(s) restored, 1 left as they were (wider than {MAX_FACE} px); nothing restored in 1 photo(s)"
            in r.output), r.output
    assert not list((tmp_path / "out").glob("*.png"))  # no byte-copy of the input under a "restored" name
    rec = _faces_of(tmp_path / "out")["big.png"]
    assert rec["status"] == "nothing_restored" and "restored" not in rec
    assert rec["reason"] == f"nothing restored: 1 face(s) left as they were (wider than {MAX_FACE} px)"
    assert rec["faces"][0]["decision"] == "left" and rec["faces"][0]["pasted"] is False
    r = _ok("infer", "--checkpoint", ckpt, "--lr", small, "--detect", "--upscale", "1", "--out", tmp_path / "o2")
    assert "0 face(s) restored, 1 left as they were (output no larger than the face)" in r.output, r.output
    assert _faces_of(tmp_path / "o2")["small.png"]["status"] == "nothing_restored"


def test_a_small_face_inside_a_face_left_as_it_was_is_not_pasted(ckpt, tmp_path, monkeypatch):
    """A (false) small face found on a large face that is left: its paste would be kept out entirely, so
    it is recorded as left, and the photo as nothing restored (no copy of the input under a restored name)."""
    photo = _img(tmp_path / "in" / "big.png", (200, 200), 1)
    _fake_detector(monkeypatch, {(200, 200): [(30, 30, 150, 170), (60, 60, 72, 72)]})
    r = _ok("infer", "--checkpoint", ckpt, "--lr", photo, "--detect", "--all-faces", "--out", tmp_path / "out")
    rec = _faces_of(tmp_path / "out")["big.png"]
    assert [f["decision"] for f in rec["faces"]] == ["left", "left"], r.output
    assert rec["faces"][1]["reason"].startswith("inside a face left as it was") and rec["status"] == "nothing_restored"
    assert not list((tmp_path / "out").glob("*_restored.png"))


def test_one_bad_photo_is_one_skip_and_the_batch_goes_on(ckpt, tmp_path, monkeypatch):
    good = _img(tmp_path / "in" / "good.png", (60, 40), 1)
    _img(tmp_path / "in" / "huge.png", (100, 100), 2)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # huge.png (10,000 px) > 2x: DecompressionBombError
    _fake_detector(monkeypatch, {(60, 40): [(8, 8, 18, 18)]})
    r = _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "in", "--detect", "--out", tmp_path / "out")
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if "skipped" in ln and "photo(s)" not in ln]
    assert len(lines) == 2 and any("broken.jpg: not a readable image" in ln for ln in lines), r.output
    assert any("huge.png: too large to open" in ln for ln in lines), r.output
    rec = _faces_of(tmp_path / "out")
    assert rec["broken.jpg"]["status"] == rec["huge.png"]["status"] == "skipped"
    assert "too large" in rec["huge.png"]["reason"] and "\n" not in rec["huge.png"]["reason"]
    assert rec["good.png"]["status"] == "restored" and (tmp_path / "out" / "good_restored.png").is_file()
    assert str(good) == rec["good.png"]["input"] and "2 photo(s) skipped" in r.output


def test_min_face_and_min_prob_reach_the_detector(ckpt, tmp_path, monkeypatch):
    from model.paste import MIN_FACE, MIN_PROB

    photo = _img(tmp_path / "p.png", (60, 40), 1)
    seen: list = []
    _fake_detector(monkeypatch, {(60, 40): [(8, 8, 18, 18)]}, seen)
    _ok("infer", "--checkpoint", ckpt, "--lr", photo, "--detect", "--min-face", 8, "--min-prob", 0.5, "--out", tmp_path / "o")
    assert seen == [{"min_face": 8, "min_prob": 0.5}]
    det = json.loads((tmp_path / "o" / "infer.json").read_text())["detection"]
    assert det["min_face"] == 8 and det["min_prob"] == 0.5
    _ok("infer", "--checkpoint", ckpt, "--lr", photo, "--detect", "--out", tmp_path / "o2")
    assert seen[-1] == {"min_face": MIN_FACE, "min_prob": MIN_PROB} and MIN_FACE <= 12
    r = _invoke("infer", "--checkpoint", ckpt, "--lr", photo, "--min-prob", 0.5, "--out", tmp_path / "o3")
    assert r.exit_code == 2 and "--min-prob: need --detect" in r.output


def test_detector_enlarges_photos_so_the_smallest_face_is_seen():
    from refbuild.detector import Detector

    assert Detector("cpu")._scale((500, 400)) == 1.0 and Detector("cpu")._scale((2048, 100)) == 0.5  # as before
    det = Detector("cpu", min_face=12, enlarge_to=24, detect_size=2048)
    assert det._scale((500, 400)) == 2.0 and det._scale((1600, 100)) == 1.28 and det._minsize((500, 400)) == 24
    assert len(det.detect([Image.new("RGB", (50, 40))])[0]) == 0  # boxes come back in photo pixels, none here


def test_default_checkpoint_prefers_the_real_one_for_whole_photos(ckpt, tmp_path, monkeypatch):
    import shutil

    import model.infer
    from model.errors import MsrError
    from model.infer import DEFAULT_CLEAN, DEFAULT_REAL, default_checkpoint

    w = tmp_path / "weights"
    w.mkdir()
    with pytest.raises(MsrError, match="give --checkpoint"):
        default_checkpoint(True, w)
    shutil.copy(ckpt, w / DEFAULT_CLEAN)
    path, why = default_checkpoint(True, w)
    assert path == w / DEFAULT_CLEAN and DEFAULT_REAL in why and "not in" in why
    shutil.copy(ckpt, w / DEFAULT_REAL)
    assert default_checkpoint(True, w)[0] == w / DEFAULT_REAL and default_checkpoint(False, w)[0] == w / DEFAULT_CLEAN
    monkeypatch.setattr(model.infer, "WEIGHTS", w)
    photo = _img(tmp_path / "p.png", (60, 40), 1)
    _fake_detector(monkeypatch, {(60, 40): [(8, 8, 18, 18)]})
    r = _ok("infer", "--lr", photo, "--detect", "--out", tmp_path / "o")
    assert f"model: msrnet2_tiny_x4 from {w / DEFAULT_REAL}" in r.output and "realistic degradations" in r.output
    rec = json.loads((tmp_path / "o" / "infer.json").read_text())
    assert rec["checkpoint"] == str(w / DEFAULT_REAL) and "realistic" in rec["checkpoint_choice"]


@pytest.mark.realdata
def test_a_real_face_12_px_wide_is_found_and_restored(ckpt, tmp_path, real_faces):
    from model.paste import find_faces

    src = real_faces / "facenet_pytorch" / "data" / "test_images" / "kate_siegel" / "1.jpg"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    with Image.open(src) as im:
        photo = im.convert("RGB")
    big = find_faces([photo], 0.52, "cpu")[0][0]
    f = 12 / big.width
    small = photo.resize((round(photo.width * f), round(photo.height * f)), Image.BICUBIC)
    small.save(tmp_path / "small.png")  # in tmp only, never the repo
    found = find_faces([small], 0.52, "cpu")[0]
    assert found and abs(found[0].width - 12) < 4, found
    r = _ok("infer", "--checkpoint", ckpt, "--lr", tmp_path / "small.png", "--detect", "--out", tmp_path / "out")
    assert "1 face(s) restored, 0 left as they were" in r.output, r.output


def test_version():
    r = _invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("msrface ")


def test_detect_only_options_without_detect_are_a_usage_error(ckpt, tmp_path):
    lr = _img(tmp_path / "face.png", (16, 16))
    r = _invoke("infer", "--checkpoint", ckpt, "--lr", lr, "--all-faces", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "need --detect" in r.output
    assert not (tmp_path / "out").exists()
