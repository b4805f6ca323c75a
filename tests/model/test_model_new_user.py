"""Rough edges a new user hit in `model` (issue 27): eval accepting what train refuses (stale manifests,
references paired for another scale), enlarged HR targets, copied libraries, a folder that is no
library, Ctrl-C, checkpoint permissions."""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from model.checkpoint import save_checkpoint
from model.checks import enlarged_targets
from model.cli import app
from model.errors import MsrError
from model.evaluate import evaluate
from model.registry import create_model
from model.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "refbuild"))  # rb_helpers: the refbuild tests' builders
from rb_helpers import invoke as refbuild, make_faces  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained x4 model (64 px output): enough to test what eval accepts."""
    path = tmp_path_factory.mktemp("run") / "last.safetensors"
    save_checkpoint(path, create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    return path


def _library(tmp: Path, size: int = 64, views: str = "hr", lr_scale: int = 8, query_view: str = "hr") -> Path:
    """detect --aligned (sources of `size` px, crops 64) -> embed -> split -> pair into LIB/manifests/lib/."""
    src, lib = tmp / "src", tmp / "lib"
    make_faces(src, n_ids=8, per_id=3, size=size, duplicate=False)
    refbuild("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 64, "-q")
    refbuild("embed", lib, "--backbone", "pixels", "--views", views, "--lr-scale", lr_scale, "--device", "cpu", "-q")
    refbuild("split", lib, "--ratios", "2,1,1", "-q")
    refbuild("pair", lib, "-m", 2, "--query-view", query_view, "--device", "cpu", "-q")
    return lib


def _eval(ckpt: Path, manifest: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["eval", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(out),
                                    "--device", "cpu", "--num-refs", "2", *extra])


def _one_error(res) -> str:
    assert res.exit_code == 1, f"exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    return lines[0]


def test_eval_refuses_a_stale_manifest_as_train_does(ckpt, tmp_path):
    lib = _library(tmp_path)
    test = lib / "manifests" / "lib" / "test.parquet"
    assert _eval(ckpt, test, tmp_path / "ev").exit_code == 0
    refbuild("split", lib, "--ratios", "1,1,1", "--overwrite", "-q")  # the manifests now name faces of the old split
    line = _one_error(_eval(ckpt, test, tmp_path / "ev2"))
    assert "stale" in line and "splits.parquet" in line and "refbuild pair" in line, line


def test_eval_and_train_refuse_references_paired_for_another_scale(ckpt, tmp_path):
    lib = _library(tmp_path, views="hr,lr", lr_scale=8, query_view="lr")
    test = lib / "manifests" / "lib" / "test.parquet"
    line = _one_error(_eval(ckpt, test, tmp_path / "ev"))
    assert "x8" in line and "x4" in line and "--lr-scale 4" in line, line
    with pytest.raises(MsrError, match="degraded x8"):
        train(TrainConfig(manifest=lib / "manifests" / "lib" / "train.parquet", model="msrnet_tiny_x4", num_refs=2,
                          runs_dir=tmp_path / "runs", steps=1, batch_size=1, device="cpu", progress=False))


def test_eval_accepts_references_paired_at_its_own_scale(ckpt, tmp_path):
    lib = _library(tmp_path, views="hr,lr", lr_scale=4, query_view="lr")
    res = _eval(ckpt, lib / "manifests" / "lib" / "test.parquet", tmp_path / "ev")
    assert res.exit_code == 0, res.output


def test_enlarged_hr_targets_are_refused_unless_allowed_and_then_said(ckpt, tmp_path, caplog):
    lib = _library(tmp_path, size=48)  # 48 px sources: every crop enlarged, under the x4 output's 64 px
    test = lib / "manifests" / "lib" / "test.parquet"
    line = _one_error(_eval(ckpt, test, tmp_path / "ev"))
    assert "HR targets were enlarged" in line and "48 px" in line and "--allow-enlarged" in line, line
    with pytest.raises(MsrError, match="--allow-enlarged"):
        train(TrainConfig(manifest=lib / "manifests" / "lib" / "train.parquet", model="msrnet_tiny_x4", num_refs=2,
                          runs_dir=tmp_path / "runs", steps=1, batch_size=1, device="cpu", progress=False))
    with caplog.at_level(logging.WARNING, logger="model"):
        _, summary = evaluate(ckpt, test, tmp_path / "ev2", num_refs=2, device="cpu", allow_enlarged=True)
    assert summary["hr_enlarged"] == summary["n"] > 0
    assert any("--allow-enlarged" in r.getMessage() and "enlarged" in r.getMessage() for r in caplog.records)


def test_a_library_without_source_sizes_counts_none_as_enlarged(tmp_path):
    import pyarrow.parquet as pq

    lib = _library(tmp_path, size=48)
    faces = pq.read_table(lib / "faces.parquet")
    pq.write_table(faces.drop_columns(["src_side"]).replace_schema_metadata(faces.schema.metadata), lib / "faces.parquet")
    got = enlarged_targets(lib / "manifests" / "lib" / "test.parquet", 64)
    assert (got.n, got.known) == (0, 0) and got.rows > 0


def test_a_copied_library_is_refused_naming_both_places_until_paired_there(ckpt, tmp_path):
    lib = _library(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(lib, copy)
    test = copy / "manifests" / "lib" / "test.parquet"
    line = _one_error(_eval(ckpt, test, tmp_path / "ev"))
    assert str(lib.resolve()) in line and str(copy.resolve()) in line, line
    res = refbuild("audit", copy, ok=False)
    assert res.exit_code == 1
    violations = [ln for ln in res.output.splitlines() if ln.startswith("violation")]
    assert len(violations) == 1 and str(lib.resolve()) in violations[0] and str(copy) in violations[0], res.output
    cmd = shlex.split(re.search(r"`(refbuild pair [^`]*)`", line).group(1))  # what the line says to run
    refbuild(*cmd[1:], "-q")
    assert _eval(ckpt, test, tmp_path / "ev").exit_code == 0
    refbuild("audit", copy, "-q")
    refbuild("audit", lib, "-q")


def test_infer_library_on_a_folder_that_is_no_library_says_so(ckpt, tmp_path):
    lr = tmp_path / "face.png"
    Image.new("RGB", (16, 16), (120, 90, 80)).save(lr)
    (tmp_path / "photos").mkdir()
    res = CliRunner().invoke(app, ["infer", "--checkpoint", str(ckpt), "--lr", str(lr), "--library",
                                   str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    line = _one_error(res)
    assert "not a refbuild library" in line and "embed` first" not in line, line


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_ctrl_c_in_train_says_how_to_go_on_and_exits_130(tmp_path, monkeypatch, with_checkpoint):
    import model.train

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(model.train, "train", interrupted)
    if with_checkpoint:
        (tmp_path / "runs" / "r").mkdir(parents=True)
        (tmp_path / "runs" / "r" / "last.safetensors").write_bytes(b"x")
    args = ["train", "--manifest", str(tmp_path / "m.parquet"), "--runs-dir", str(tmp_path / "runs"), "--name", "r"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 130, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), res.output
    assert ("--resume" in lines[0]) == with_checkpoint, lines[0]
    res = CliRunner().invoke(app, args + ["--resume"])
    assert res.exit_code == 130 and res.output.strip() == "interrupted; rerun the same command to resume", res.output


def test_checkpoints_are_written_with_the_permissions_of_every_other_output(tmp_path):
    from refbuild.io import write_bytes

    save_checkpoint(tmp_path / "last.safetensors", create_model("msrnet2_tiny_x4"),
                    {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    write_bytes(tmp_path / "other.json", b"{}")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "last.safetensors") == mode(tmp_path / "other.json") != 0o600
