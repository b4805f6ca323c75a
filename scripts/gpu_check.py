"""`make gpu-check`: every CUDA path in one command, its figures in one folder.

    python scripts/gpu_check.py [--out gpu_check/] [--faces ../shared/faces] [--train-steps 1500] [--budget-s 480]

1. the tests marked `gpu` (batched letterboxed detect, VGG features in bf16, FAISS GPU
   L1 against the CPU kernel, 50-step bf16 training, one-process nccl DDP, eval on GPU);
2. the benchmarks' GPU rows in the quick setting (detect, embed, train, infer);
3. the shipped x8 recipe (weights/README.md) as a short GPU run: library from
   `celeba_facecrops`, `msrnet2_x8` trained `--train-steps` steps of batch 8 on
   CUDA (bf16), then `model eval` on the test split with matched and no references.

Each step's output and a `summary.json` (wall seconds, exit codes, figures) go to
`--out`. Steps after the budget is spent are skipped, saying so. Without CUDA it
prints the plan and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def plan(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    py, out, lib = sys.executable, a.out, a.out / "lib"
    src = a.faces / "celeba_facecrops"
    man = lib / "manifests" / "fc_lr"  # pair's default place: LIB/manifests/<name>/
    steps = [
        ("tests", [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", "--junitxml", str(out / "tests.xml")]),
        ("bench", [py, "-m", "benchmarks.run", "--quick", "--only", "detect,embed,train,infer",
                   "--out", str(out / "bench"), "--md", str(out / "bench" / "BENCHMARKS.md")]),
        ("detect", [py, "-m", "refbuild", "detect", str(src), "--out", str(lib), "--labels", str(src / "labels.csv"),
                    "--identity-column", "celeba_identity", "--aligned", "--crop-size", "128"]),
        ("embed", [py, "-m", "refbuild", "embed", str(lib), "--backbone", "pixels", "--views", "hr,lr"]),
        ("split", [py, "-m", "refbuild", "split", str(lib), "--ratios", "14,3,1", "--seed", "0"]),
        ("pair", [py, "-m", "refbuild", "pair", str(lib), "-m", "5", "--query-view", "lr", "--name", "fc_lr"]),
        ("train", [py, "-m", "model", "train", "--manifest", str(man / "train.parquet"), "--model", "msrnet2_x8",
                   "--num-refs", "4", "--ref-dropout", "0.5", "--jitter", "0.1", "--steps", str(a.train_steps),
                   "--batch-size", "8", "--lr", "5e-4", "--warmup-steps", "200", "--ema-decay", "0.999",
                   "--ckpt-every", "500", "--device", "cuda", "--runs-dir", str(out / "runs"), "--name", "x8"]),
    ]
    for refs in ("matched", "none"):
        steps.append((f"eval_{refs}", [py, "-m", "model", "eval", "--checkpoint", str(out / "runs" / "x8" / "last.safetensors"),
                                       "--manifest", str(man / "test.parquet"), "--refs", refs, "--no-ema",
                                       "--out", str(out / f"eval_{refs}"), "--device", "cuda"]))
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip the steps that would start after this")
    a = ap.parse_args(argv)
    a.out = a.out.resolve()
    steps = plan(a)
    print("gpu-check plan:")
    for name, cmd in steps:
        print(f"  {name:12s} {' '.join(cmd[1:])}")
    import torch

    if not torch.cuda.is_available():
        print("no CUDA on this machine: nothing run (run `make gpu-check` where a GPU is at hand)")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": {}}
    t0 = time.time()
    for name, cmd in steps:
        if time.time() - t0 > a.budget_s:
            summary["steps"][name] = {"skipped": f"budget of {a.budget_s:.0f} s spent"}
            print(f"[{name}] skipped: budget spent")
            continue
        t = time.time()
        with open(a.out / f"{name}.log", "w") as log:
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        summary["steps"][name] = {"rc": rc, "wall_s": round(time.time() - t, 1)}
        print(f"[{name}] rc={rc} {time.time() - t:.0f} s")
        ev = a.out / name / "summary.json"
        if name.startswith("eval_") and ev.is_file():
            s = json.loads(ev.read_text())
            summary["steps"][name]["figures"] = {"sr": s["sr"], "bicubic": s["bicubic"]}
    summary["wall_s"] = round(time.time() - t0, 1)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"figures in {a.out}")
    return 0 if all(v.get("rc", 0) == 0 for v in summary["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
