"""pipelines.table1 end to end with tiny settings: every method trained, evaluated and tabled."""
from __future__ import annotations

import json

import pytest

from pipelines import table1


def test_equal_time_steps():
    assert table1.equal_time_steps({"a": 10.0, "b": 5.0, "c": 0.1}, 100) == {"a": 100, "b": 50, "c": 1}


def test_table1_end_to_end(comparison_manifests, tmp_path):
    man = comparison_manifests
    out = tmp_path / "t1"
    argv = ["--manifests", str(man), "--steps", "3", "--seeds", "0,1", "--methods", ",".join(table1.TINY_METHODS),
            "--out", str(out), "--batch-size", "2", "--num-refs", "2", "--ema-decay", "0", "--speed-steps", "1"]
    table = table1.main(argv)
    md = (out / "table1.md").read_text()
    for m in table1.TINY_METHODS:
        assert f"| {m} |" in md
        row = table["methods"][m]
        assert row["params"] > 0 and row["flops"] > 0 and row["samples_per_s"] > 0
        assert len(row["runs"]) == 2
        for r in row["runs"]:
            assert 1 <= r["equal_time_step"] <= 3 and r["train_seconds"] > 0
            for k in ("psnr_y", "ssim_y", "psnr_y_full", "ssim_y_full"):
                assert r["equal_samples"][k] > 0 and r["equal_time"][k] > 0
            assert (out / "runs" / f"{m}_s{r['seed']}" / "last.safetensors").is_file()
    assert "| bicubic (MATLAB-style) |" in md and "±" in md and "FSRGAN" in md
    # the two seeds are two trainings
    a, b = (table["methods"]["msrnet2_tiny_x8"]["runs"][i]["equal_samples"]["psnr_y"] for i in (0, 1))
    assert a != b
    # a rerun reads finished runs back instead of refusing the existing run folders
    again = table1.main(argv)
    for m in table1.TINY_METHODS:  # results and the measured speeds (hence the equal-time steps) are kept
        assert again["methods"][m] == table["methods"][m]
    assert json.loads((out / "table1.json").read_text())["config"]["steps"] == 3
    # --table-only trains nothing and tables what is there, a partial (equal-time only) result included
    slow = "sparnet_tiny_x8"
    partial = out / "results" / f"{slow}_s0.json"
    res = json.loads(partial.read_text())
    partial.with_suffix(".equal_time.json").write_text(json.dumps({k: v for k, v in res.items() if k in (
        "method", "seed", "equal_time_step", "equal_time")}))  # what run_one keeps before the full budget
    partial.unlink()
    (out / "results" / f"{slow}_s1.json").unlink()
    runs_before = sorted(p.name for p in (out / "runs").iterdir())
    only = table1.main(argv + ["--table-only"])
    assert sorted(p.name for p in (out / "runs").iterdir()) == runs_before
    assert only["methods"]["msrnet2_tiny_x8"] == table["methods"]["msrnet2_tiny_x8"]
    md = (out / "table1.md").read_text()
    assert f"| {slow} |" in md and "not finished" in md.split(f"| {slow} |")[1].split("\n")[0]


def test_unknown_method_is_refused(comparison_manifests, tmp_path):
    man = comparison_manifests
    with pytest.raises(SystemExit, match="unknown method"):
        table1.main(["--manifests", str(man), "--steps", "1", "--methods", "nope_x8"])
    with pytest.raises(SystemExit, match="missing"):
        table1.main(["--manifests", str(tmp_path), "--steps", "1"])


def test_table1_resumes_a_run_killed_mid_budget(comparison_manifests, tmp_path, monkeypatch):
    """A kill after the equal-time score and before the full budget: the rerun resumes that run, not refuses it."""
    import model.train as mt
    from model.checkpoint import load_checkpoint

    man = comparison_manifests
    out = tmp_path / "t1"
    slow, fast = "sparnet_tiny_x8", "msrnet2_tiny_x8"
    (out / "results").mkdir(parents=True)  # measured speeds are kept: fix them so the slow one stops at step 2
    (out / "results" / "speed.json").write_text(json.dumps({
        m: {"params": 1, "flops": 1.0, "batch_size": 2, "num_refs": 2, "samples_per_s": v, "threads": 1}
        for m, v in ((slow, 5.0), (fast, 10.0))}))
    argv = ["--manifests", str(man), "--steps", "4", "--seeds", "0", "--methods", f"{slow},{fast}",
            "--out", str(out), "--batch-size", "2", "--num-refs", "2", "--ema-decay", "0"]
    real = mt.train

    def killed_on_resume(cfg):
        if cfg.resume:
            raise RuntimeError("killed")
        return real(cfg)

    monkeypatch.setattr(mt, "train", killed_on_resume)
    with pytest.raises(RuntimeError, match="killed"):
        table1.main(argv)
    assert (out / "results" / f"{slow}_s0.equal_time.json").is_file()
    assert not (out / "results" / f"{slow}_s0.json").exists()
    monkeypatch.setattr(mt, "train", real)
    with pytest.raises(SystemExit, match="equal-time step 2, but these --methods give 4"):
        table1.main([*argv[:7], slow, *argv[8:]])  # without the fast method, equal time would be another step
    table = table1.main(argv)
    (r,) = table["methods"][slow]["runs"]
    assert r["equal_time_step"] == 2 and r["resumed"] and "equal_samples" in r
    assert load_checkpoint(out / "runs" / f"{slow}_s0" / "last.safetensors").meta["step"] == 4
    assert "≥" in (out / "table1.md").read_text().split(f"| {slow} |")[1].split("\n")[0]
