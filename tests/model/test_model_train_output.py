"""What a training run shows as it goes: validation PSNR per checkpoint, labelled sample grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from model.cli import app
from model.runlog import sample_grid


def test_training_prints_validation_psnr_at_each_checkpoint(synthetic_manifest, manifest_writer, tmp_path):
    val = manifest_writer(tmp_path / "val.parquet", [{"face_id": "v", "hr_path": "img0.png", "identity": "other",
                                                      "ref_paths": ["img1.png"]}],
                          synthetic_manifest.parent, synthetic_manifest.parent)
    r = CliRunner().invoke(app, ["train", "--manifest", str(synthetic_manifest), "--val-manifest", str(val),
                                 "--model", "msrnet2_tiny_x4", "--runs-dir", str(tmp_path), "--steps", "2",
                                 "--ckpt-every", "1", "--batch-size", "2", "--num-refs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if "val PSNR-Y" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["step 1", "step 2"], r.output
    assert "bicubic" in lines[0] and "new best" in lines[0]


def test_sample_grid_has_a_label_row():
    lr, refs = torch.rand(2, 3, 16, 16), torch.rand(2, 2, 3, 64, 64)
    sr, hr = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    g = sample_grid(lr, refs, sr, hr)
    assert g.size == (6 * 64, 14 + 2 * 64)
    header = np.asarray(g)[:14]
    assert (header == 255).mean() > 0.8 and (header < 128).any()  # white strip with dark text
    assert isinstance(g, Image.Image)


def test_run_config_and_eval_summary_are_resolved(synthetic_manifest, tmp_path, monkeypatch):
    """config.json and summary.json say what truly ran: absolute paths, device used, versions."""
    import json

    from model.evaluate import evaluate
    from model.train import TrainConfig, train

    monkeypatch.chdir(synthetic_manifest.parent)
    run = train(TrainConfig(manifest=type(synthetic_manifest)(synthetic_manifest.name), model="msrnet2_tiny_x4",
                            runs_dir=type(tmp_path)("runs"), name="r", steps=1, batch_size=2, num_refs=1,
                            progress=False, device="cpu"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["manifest"] == str(synthetic_manifest.resolve()) and cfg["runs_dir"].startswith("/")
    from refbuild.torchutil import native_cpu_bf16

    # auto: bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere
    assert cfg["used"]["device"] == "cpu" and cfg["used"]["precision"] == ("bf16" if native_cpu_bf16() else "fp32")
    assert cfg["provenance"]["torch"] == torch.__version__ and cfg["provenance"]["python"]
    _, summary = evaluate(run / "last.safetensors", synthetic_manifest, tmp_path / "ev", device="cpu")
    saved = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert saved["device"] == "cpu" and saved["provenance"]["torch"] == torch.__version__
    assert saved["checkpoint"].startswith("/") and saved["manifest"] == str(synthetic_manifest.resolve())


def test_eval_on_a_train_split_manifest_warns(synthetic_manifest, tmp_path, caplog):
    import logging

    from model.checkpoint import save_checkpoint
    from model.evaluate import evaluate
    from model.registry import create_model

    ck = tmp_path / "m.safetensors"
    save_checkpoint(ck, create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    with caplog.at_level(logging.WARNING):
        _, summary = evaluate(ck, synthetic_manifest, tmp_path / "ev", device="cpu")  # its rows say split=train
    assert summary["split"] == "train"
    assert any("split=train" in r.getMessage() and "training faces" in r.getMessage() for r in caplog.records)
