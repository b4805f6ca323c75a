"""`model` CLI: exit codes and one-line messages (typer CliRunner)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from data_manifests import PAIRS, with_metadata
from model.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert fragment in text, text
    assert "Traceback" not in text
    assert text.startswith("error:"), text


@pytest.mark.slow
def test_python_dash_m_model_works():
    r = subprocess.run([sys.executable, "-m", "model", "list"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "msrnet_tiny_x8" in r.stdout


def test_missing_manifest(tmp_path):
    _one_line_error(_invoke("train", "--manifest", tmp_path / "nope.parquet", "--runs-dir", tmp_path), "no such file")


def test_wrong_schema(tmp_path):
    t = pa.Table.from_pylist([], schema=PAIRS)
    pq.write_table(with_metadata(t, "pairs"), tmp_path / "pairs.parquet")
    _one_line_error(_invoke("train", "--manifest", tmp_path / "pairs.parquet", "--runs-dir", tmp_path),
                    "expected 'training_manifest'")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x.png", "a/../../x.png"])
def test_unsafe_paths_rejected(tmp_path, manifest_writer, bad):
    m = manifest_writer(tmp_path / "m.parquet", [{"face_id": "a", "hr_path": bad, "identity": "1", "ref_paths": []}],
                        tmp_path, tmp_path)
    _one_line_error(_invoke("train", "--manifest", m, "--runs-dir", tmp_path), "relative path without '..'")


def test_missing_images(tmp_path, manifest_writer):
    m = manifest_writer(tmp_path / "m.parquet", [{"face_id": "a", "hr_path": "a.png", "identity": "1",
                                                  "ref_paths": ["r.png"]}], tmp_path, tmp_path)
    _one_line_error(_invoke("train", "--manifest", m, "--runs-dir", tmp_path), "image file(s) missing")


def test_unknown_model(synthetic_manifest, tmp_path):
    _one_line_error(_invoke("train", "--manifest", synthetic_manifest, "--model", "resnet50", "--runs-dir", tmp_path),
                    "unknown model")


def test_usage_error_keeps_exit_code_2(tmp_path):
    assert _invoke("train", "--num-refs", "9", "--manifest", tmp_path / "m.parquet").exit_code == 2


@pytest.fixture(scope="module")
def trained(synthetic_manifest, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    r = _invoke("train", "--manifest", synthetic_manifest, "--model", "msrnet_tiny_x4", "--runs-dir", runs,
                "--name", "cli", "--steps", "2", "--batch-size", "2", "--num-refs", "1", "--ema-decay", "0.5")
    assert r.exit_code == 0, r.output
    return runs / "cli"


def test_train_then_eval_then_infer(trained, synthetic_manifest, tmp_path):
    assert (trained / "last.safetensors").is_file() and (trained / "config.json").is_file()
    r = _invoke("train", "--manifest", synthetic_manifest, "--model", "msrnet_tiny_x4", "--runs-dir", trained.parent,
                "--name", "cli", "--steps", "2")
    _one_line_error(r, "--resume")
    r = _invoke("eval", "--checkpoint", trained / "last.safetensors", "--manifest", synthetic_manifest,
                "--out", tmp_path / "ev", "--refs", "random", "--num-refs", "2")
    assert r.exit_code == 0, r.output
    for f in ("per_image.csv", "summary.json", "summary.md"):
        assert (tmp_path / "ev" / f).is_file()
    assert "bicubic" in (tmp_path / "ev" / "summary.md").read_text()
    imgs = sorted(synthetic_manifest.parent.glob("*.png"))
    r = _invoke("infer", "--checkpoint", trained / "last.safetensors", "--lr", imgs[0], "--lr", imgs[1],
                "--refs", imgs[2], "--out", tmp_path / "sr")
    assert r.exit_code == 0, r.output
    from PIL import Image

    outs = sorted((tmp_path / "sr").glob("*.png"))
    assert len(outs) == 2 and Image.open(outs[0]).size == (64, 64)


def test_eval_scores_other_framings(trained, synthetic_manifest, tmp_path):
    """`--zooms` and `--shifts` score the same faces re-framed; each framing its own row in JSON and Markdown."""
    import json

    r = _invoke("eval", "--checkpoint", trained / "last.safetensors", "--manifest", synthetic_manifest, "--no-identity",
                "--out", tmp_path / "ev", "--num-refs", "1", "--zooms", "1.15", "--shifts", "0.075,-0.05")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert list(s["framings"]) == ["1.15", "dy+0.075", "dy-0.05"]
    assert s["framings"]["dy+0.075"]["bicubic"]["psnr_y"] != s["bicubic"]["psnr_y"]  # other pixels were scored
    md = (tmp_path / "ev" / "summary.md").read_text()
    assert "| dy+0.075 |" in md and "| 1.15 |" in md
    r = _invoke("eval", "--checkpoint", trained / "last.safetensors", "--manifest", synthetic_manifest,
                "--out", tmp_path / "bad", "--shifts", "0.4")  # refused before any work: nothing written
    assert r.exit_code == 2 and "--shifts values must be in [-0.25, 0.25]" in r.output, r.output
    assert not (tmp_path / "bad").exists()


def test_infer_library_that_is_not_a_library(trained, tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16), (120, 90, 80)).save(tmp_path / "x.png")
    r = _invoke("infer", "--checkpoint", trained / "last.safetensors", "--lr", tmp_path / "x.png",
                "--library", tmp_path)
    _one_line_error(r, "refbuild embed")


def test_truncated_checkpoint(trained, synthetic_manifest, tmp_path):
    data = (trained / "last.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:1000])
    _one_line_error(_invoke("eval", "--checkpoint", tmp_path / "t.safetensors", "--manifest", synthetic_manifest),
                    "truncated")


def test_msrnet2_trains_with_ref_dropout_and_exports_weights_only(synthetic_manifest, tmp_path):
    import json

    from safetensors import safe_open

    r = _invoke("train", "--manifest", synthetic_manifest, "--model", "msrnet2_tiny_x4", "--runs-dir", tmp_path,
                "--name", "m2", "--steps", "2", "--batch-size", "2", "--num-refs", "2", "--ref-dropout", "0.5",
                "--jitter", "0.1", "--ema-decay", "0.5")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert cfg["ref_dropout"] == 0.5 and cfg["jitter"] == 0.1
    r = _invoke("export", "--checkpoint", tmp_path / "m2" / "last.safetensors", "--out", tmp_path / "w.safetensors")
    assert r.exit_code == 0, r.output
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith(("optim.", "ema.")) for k in keys)
    assert (tmp_path / "w.safetensors").stat().st_size < (tmp_path / "m2" / "last.safetensors").stat().st_size / 2
    r = _invoke("eval", "--checkpoint", tmp_path / "w.safetensors", "--manifest", synthetic_manifest,
                "--out", tmp_path / "ev", "--refs", "shuffled")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert {"psnr_y_full", "ssim_y_full"} <= set(s["sr"]) and s["refs"] == "shuffled"


def test_cli_ref_modes_are_the_datasets():
    """`--refs` spells its choices out (no torch import to parse options); they must be model.data's."""
    from model.cli import RefMode
    from model.data import REF_MODES

    assert tuple(m.value for m in RefMode) == REF_MODES


def test_cli_galleries_are_identity_evals():
    from model.cli import Gallery
    from model.identity_eval import GALLERIES

    assert tuple(g.value for g in Gallery) == GALLERIES
