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


def test_merge_replaces_stages_and_keeps_a_failed_rerun_out(tmp_path):
    """`--merge-into`: a rerun stage replaces its record (noted as a rerun); a skipped one keeps the old figures."""
    from benchmarks.run import merged

    def rec(stage, **kw):
        return {"stage": stage, "skipped": kw.get("skipped"), "points": kw.get("points", [])}

    old = {"mode": "default", "date": "d0", "stages": [rec("train", points=[1]), rec("quality", points=[2])]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    new = {"mode": "default", "date": "d1", "machine": {"host": "h", "load_avg_at_start": [0.5, 0.5, 0.5]},
           "stages": [rec("quality", points=[3]), rec("train", skipped="bench crashed (exit 1)"), rec("infer", points=[4])]}
    m = merged(tmp_path / "old.json", new)
    by = {s["stage"]: s for s in m["stages"]}
    assert by["quality"]["points"] == [3] and by["train"]["points"] == [1] and by["infer"]["points"] == [4]
    assert set(m["reruns"]) == {"quality", "infer"}
    with pytest.raises(SystemExit, match="it is a default run, this one quick"):
        merged(tmp_path / "old.json", {**new, "mode": "quick"})
