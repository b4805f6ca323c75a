"""The two halves together: a refbuild library's manifests train MSRNet, and
`model infer --library` retrieves references from that library per face."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from model.cli import app as model_app
from refbuild.cli import app as refbuild_app

pytestmark = pytest.mark.slow


def _ok(app, *args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"{' '.join(map(str, args))}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    return res


def _faces(root: Path, n_ids: int = 6, per_id: int = 3) -> None:
    rng = np.random.default_rng(0)
    for i in range(n_ids):
        base = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
        (root / f"p{i}").mkdir(parents=True)
        for k in range(per_id):
            a = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 10, (64, 64, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(root / f"p{i}" / f"{k}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    src, lib, mdir, runs = tmp / "src", tmp / "lib", tmp / "manifests", tmp / "runs"
    _faces(src)
    _ok(refbuild_app, "detect", src, "--out", lib, "--aligned", "--identity-from-folder", "-q")
    _ok(refbuild_app, "embed", lib, "--backbone", "pixels", "-q")
    _ok(refbuild_app, "split", lib, "--ratios", "4,1,1", "-q")
    _ok(refbuild_app, "pair", lib, "-m", 2, "--manifest-dir", mdir, "--name", "e2e", "-q")
    _ok(model_app, "train", "--manifest", mdir / "e2e" / "train.parquet", "--model", "msrnet_tiny_x4", "--num-refs", 2,
        "--steps", 2, "--batch-size", 2, "--runs-dir", runs, "--name", "t", "--device", "cpu")
    return tmp, lib, mdir, runs / "t" / "last.safetensors"


def test_train_and_eval_on_refbuild_manifests(trained, tmp_path):
    tmp, lib, mdir, ckpt = trained
    _ok(model_app, "eval", "--checkpoint", ckpt, "--manifest", mdir / "e2e" / "test.parquet", "--out", tmp_path / "ev",
        "--device", "cpu")
    summary = json.loads(next((tmp_path / "ev").glob("*.json")).read_text())
    assert summary["n"] >= 1 and np.isfinite(summary["sr"]["psnr_y"])


def test_infer_retrieves_references_from_the_library(trained, tmp_path):
    tmp, lib, mdir, ckpt = trained
    lr = tmp_path / "lr.png"
    Image.open(tmp / "src" / "p0" / "0.png").resize((16, 16), Image.BICUBIC).save(lr)
    res = _ok(model_app, "infer", "--checkpoint", ckpt, "--lr", lr, "--library", lib, "--num-refs", 2,
              "--out", tmp_path / "sr", "--device", "cpu")
    out = tmp_path / "sr" / "lr_x4.png"
    assert out.is_file() and Image.open(out).size == (64, 64), res.output


def test_infer_library_and_refs_together_is_refused(trained, tmp_path):
    tmp, lib, mdir, ckpt = trained
    ref = next((lib / "crops").rglob("*.png"))
    res = CliRunner().invoke(model_app, ["infer", "--checkpoint", str(ckpt), "--lr", str(ref), "--refs", str(ref),
                                         "--library", str(lib), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "not both" in res.output


@pytest.mark.realdata
def test_infer_detects_faces_in_whole_photos(trained, tmp_path, real_faces):
    tmp, lib, mdir, ckpt = trained
    photo = real_faces / "celeba_wild_identity" / "Celeb" / "000180.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} not found")
    shutil.copy(photo, tmp_path / "photo.jpg")  # into tmp only, never the repo
    _ok(model_app, "infer", "--checkpoint", ckpt, "--lr", tmp_path / "photo.jpg", "--detect", "--max-face", 1000,
        "--library", lib,
        "--num-refs", 2, "--out", tmp_path / "sr", "--device", "cpu")
    assert (tmp_path / "sr" / "photo_x4.png").is_file()
    negative = real_faces / "nonface_negatives" / "testsets" / "Set5" / "HR" / "bird.png"
    res = CliRunner().invoke(model_app, ["infer", "--checkpoint", str(ckpt), "--lr", str(negative), "--detect",
                                         "--library", str(lib), "--out", str(tmp_path / "sr2"), "--device", "cpu"])
    assert res.exit_code == 1 and "no face found" in res.output
