"""pipelines.realfaces: its matching, its table, and an --out that would put cut photos into the repository."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import realfaces


def test_iou():
    assert realfaces.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert realfaces.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert realfaces.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_table_has_a_column_per_width_and_the_recall_rows():
    rows = [{"width": w, "bicubic": 24.0 + k, "rule": 1.0 - k, "plain": -k, "single_pass": 0.75 - k, "rule_decision": "restored" if w < 40 else "left",
             "found": True, "found_mtcnn_defaults": w > 8, "found_infer_before": w > 12}
            for w in (8, 16, 48) for k in (0, 1)]
    md = realfaces.table({"photos": [{}, {}], "rows": rows,
                          "false_faces": {"photos": 18, "infer_p0.95": 2, "infer_p0.9": 3, "mtcnn_defaults": 3, "infer_before": 1}})
    lines = md.splitlines()
    assert lines[0] == "| face width | 8 px | 16 px | 48 px |"
    assert "| **the rule**: restored - bicubic (dB) | **+0.50** | **+0.50** | **+0.50** |" in lines
    assert "| the rule, one pass (`--single-pass`) | +0.25 | +0.25 | +0.25 |" in lines
    assert "| faces the rule restored, and the worst face (dB) | 2, +0.00 | 2, +0.00 | 0, +0.00 |" in lines
    assert "| found (of 2): MTCNN defaults | 0 | 2 | 2 |" in lines
    assert lines[-1].startswith("False faces on 18 photos without a face: infer 2 (p >= 0.95; 3 at p >= 0.9)")


def test_an_out_folder_inside_the_repository_is_refused(capsys):
    repo = Path(realfaces.__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as e:
        realfaces.main(["--photos", "x", "--checkpoint", "y", "--out", str(repo / "cut_photos")])
    assert e.value.code == 2 and "inside the repository" in capsys.readouterr().err
