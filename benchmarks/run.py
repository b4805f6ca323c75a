"""`python -m benchmarks.run [--quick | --full] [--only detect,embed,...] [--out DIR]`

Runs each stage's bench in its own child process (so one stage's threads, caches
and peak memory do not leak into the next), collects the records into
`<out>/<host>-<date>.json` and renders BENCHMARKS.md from that JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import REPO, Skip, Stage

STAGES = ("detect", "embed", "pair", "matching", "train", "infer", "quality")
REPEATS = {"quick": 2, "default": 5, "full": 7}


def run_stage(stage: str, mode: str, out: Path) -> None:
    """In the child: run one bench, write its record as JSON."""
    import importlib

    mod = importlib.import_module(f"benchmarks.bench_{stage}")
    try:
        rec = mod.run(mode, REPEATS[mode]).to_json()
    except Skip as e:
        rec = Stage(stage, "", "", "", skipped=str(e)).to_json()
    out.write_text(json.dumps(rec, indent=1, default=float))


def machine() -> dict:
    import torch

    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_at_start": list(os.getloadavg())}


def merged(into: Path, new: dict) -> dict:
    """`into`'s record with the stages of `new` replacing its own (or added), each noted as a rerun; a stage
    that was skipped or crashed now keeps its earlier record (a failed rerun must not erase figures)."""
    try:
        old = json.loads(into.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--merge-into {into}: not a results JSON ({e})")
    if old.get("mode") != new["mode"]:
        raise SystemExit(f"--merge-into {into}: it is a {old.get('mode')} run, this one {new['mode']}: run with the same size")
    load = ", ".join(f"{x:.1f}" for x in new["machine"]["load_avg_at_start"])
    by = {st["stage"]: i for i, st in enumerate(old["stages"])}
    for st in new["stages"]:
        if st.get("skipped") and st["stage"] in by:
            print(f"[bench] {st['stage']}: skipped now ({st['skipped']}); its earlier record is kept", flush=True)
            continue
        if st["stage"] in by:
            old["stages"][by[st["stage"]]] = st
        else:
            old["stages"].append(st)
        old.setdefault("reruns", {})[st["stage"]] = (f"rerun at {new['date']} on {new['machine']['host']} "
                                                     f"(load average at start {load}) with --merge-into")
    return old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (< 2 minutes); not figures to quote")
    size.add_argument("--full", action="store_true", help="larger sizes than the default (more images, more repeats)")
    ap.add_argument("--only", default="", help=f"comma-separated stages, of {','.join(STAGES)}")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--merge-into", type=Path, default=None,
                    help="a results JSON of an earlier run: replace (or add) the stages run now in it, "
                         "note them as reruns, and render BENCHMARKS.md from the merged record")
    ap.add_argument("--md", type=Path, default=None, help="BENCHMARKS.md path (default: repo root, or <out>/ with --out)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        run_stage(a.child, a.mode, a.child_json)
        return 0
    mode = "quick" if a.quick else "full" if a.full else "default"
    only = [s.strip() for s in a.only.split(",") if s.strip()] or list(STAGES)
    bad = sorted(set(only) - set(STAGES))
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {','.join(STAGES)}")
    out_dir = a.out or REPO / "benchmarks" / "results"
    md = a.md or (out_dir / "BENCHMARKS.md" if a.out else REPO / "BENCHMARKS.md")
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now()
    results = {"mode": mode, "date": now.isoformat(timespec="seconds"), "machine": machine(), "stages": []}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for stage in only:
            t0 = time.perf_counter()
            print(f"[bench] {stage} ({mode}) ...", flush=True)
            js = Path(tmp) / f"{stage}.json"
            cmd = [sys.executable, "-m", "benchmarks.run", "--child", stage, "--mode", mode, "--child-json", str(js)]
            rc = subprocess.run(cmd, cwd=REPO).returncode
            if rc != 0 or not js.is_file():
                rec = Stage(stage, "", "", "", skipped=f"bench crashed (exit {rc}); see its traceback above").to_json()
            else:
                rec = json.loads(js.read_text())
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            results["stages"].append(rec)
            print(f"[bench] {stage}: " + (f"SKIPPED: {rec['skipped']}" if rec.get("skipped") else
                  (f"ratio {rec['ratio']}x, " if rec.get("ratio") is not None else "")
                  + f"same_answer {rec['same_answer']}, met {rec['met']}") + f" ({rec['wall_s']} s)", flush=True)
    results["wall_s"] = round(time.perf_counter() - t_all, 1)
    name = f"{socket.gethostname()}-{now:%Y%m%d-%H%M%S}{'-quick' if mode == 'quick' else ''}.json"
    path = out_dir / name
    if a.merge_into:
        results, path = merged(a.merge_into, results), a.merge_into
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(results, indent=1))
    tmp_path.replace(path)
    from benchmarks.report import write_markdown

    write_markdown(results, md, path)
    print(f"[bench] wrote {path} and {md} in {results['wall_s']} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
