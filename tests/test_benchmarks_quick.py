"""`python -m benchmarks.run --quick` runs every stage's bench and writes a complete JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAGES = ("detect", "embed", "pair", "matching", "train", "infer", "quality")
NEEDS_FACES = {"detect", "embed", "infer", "quality"}  # skipped, with a reason, where the real photos (or a library) are absent


@pytest.mark.slow
def test_bench_quick_writes_every_stage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (js,) = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    assert res["mode"] == "quick"
    by = {s["stage"]: s for s in res["stages"]}
    assert set(by) == set(STAGES)
    for name, st in by.items():
        if st["skipped"]:
            assert name in NEEDS_FACES and "not found" in st["skipped"], f"{name}: {st['skipped']}"
            continue
        if name == "quality":  # a table of methods, not ours-vs-baseline
            rows = {p["method"]: p for p in st["points"]}
            assert {"msrnet2_x8", "msrnet2_noref_x8", "sparnet_x8", "swinir_light_x8"} <= set(rows), set(rows)
            assert all(p["faces_per_s"] > 0 for p in st["points"] if p["method"] != "bicubic")
            assert rows["msrnet2_x8"]["psnr_y"] > rows["bicubic"]["psnr_y"]
            continue
        assert isinstance(st["ratio"], float) and st["ratio"] > 0, name
        assert st["same_answer"] is True, f"{name}: ours and the baseline disagree: {st['notes']}"
        assert st["ours_timing"]["median_s"] > 0 and st["baseline_timing"]["median_s"] > 0, name
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "QUICK RUN, NOT THE FIGURES" in md and "| stage |" in md
