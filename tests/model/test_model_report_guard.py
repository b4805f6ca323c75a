"""`model eval --report` replaces only report folders it wrote; a folder of the user's is never deleted."""
from __future__ import annotations

import pytest

from model.checkpoint import save_checkpoint
from model.errors import MsrError
from model.evaluate import evaluate
from model.registry import create_model


def test_report_replaces_its_own_folder_and_refuses_a_foreign_one(synthetic_manifest, tmp_path):
    ck = tmp_path / "m.safetensors"
    save_checkpoint(ck, create_model("msrnet2_tiny_x4"), {"model": "msrnet2_tiny_x4", "model_kwargs": {}})
    out = tmp_path / "ev"
    evaluate(ck, synthetic_manifest, out, device="cpu", report=True)
    assert (out / "report" / "index.html").is_file() and (out / "report" / "eval_report.json").is_file()
    evaluate(ck, synthetic_manifest, out, device="cpu", report=True)  # a rerun replaces its own report
    assert (out / "report" / "index.html").is_file()

    mine = tmp_path / "ev2" / "report"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(MsrError, match="did not write"):
        evaluate(ck, synthetic_manifest, tmp_path / "ev2", device="cpu", report=True)
    assert (mine / "notes.txt").read_text() == "the user's"
