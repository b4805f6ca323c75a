"""`make gpu-check`: every CUDA path in one command, its figures in one folder.

    python scripts/gpu_check.py [--out gpu_check/] [--faces ../shared/faces] [--train-steps 1500] [--budget-s 480]

1. the tests marked `gpu` (batched letterboxed detect, VGG features in bf16, FAISS GPU
   L1 against the CPU kernel, 50-step bf16 training, one-process nccl DDP, eval on GPU);
2. the benchmarks' GPU rows in the quick setting (detect, embed, train, infer);
3. the shipped x8 recipe (weights/README.md) as a short GPU run: library from
   `celeba_facecrops`, `msrnet2_x8` trained `--train-steps` steps of batch 8 on
   CUDA (bf16), then `model eval` on the test split with matched and no references.

`--mode train` (`make gpu-train`) is the ten-minute window's job: the library, then the
best recipe (`msrnet2_x8` with framing augmentation (zoom and shift), `--degradation` bicubic,
or real_mild as the shipped camera model; no identity loss, whose GPU cost is unmeasured)
trained from scratch on CUDA in bf16 for `--train-steps` steps of batch `--batch-size`,
evaluated on the test split (clean and camera-degraded inputs, centred, three zooms and one
shift), exported to `OUT/msrnet2_x8[_real].safetensors` with `OUT/MODEL_CARD.md`: one folder
ready to commit.

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
    library = [
        ("detect", [py, "-m", "refbuild", "detect", str(src), "--out", str(lib), "--labels", str(src / "labels.csv"),
                    "--identity-column", "celeba_identity", "--aligned", "--crop-size", "128"]),
        ("embed", [py, "-m", "refbuild", "embed", str(lib), "--backbone", "pixels", "--views", "hr,lr"]),
        ("split", [py, "-m", "refbuild", "split", str(lib), "--ratios", "14,3,1", "--seed", "0"]),
        ("pair", [py, "-m", "refbuild", "pair", str(lib), "-m", "5", "--query-view", "lr", "--name", "fc_lr"]),
    ]
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
                   "--ckpt-every", "500", "--device", "cuda", "--allow-enlarged", "--runs-dir", str(out / "runs"), "--name", "x8"]),
    ]
    if a.mode == "train":
        return library + train_plan(a, man)
    for refs in ("matched", "none"):
        steps.append((f"eval_{refs}", [py, "-m", "model", "eval", "--checkpoint", str(out / "runs" / "x8" / "last.safetensors"),
                                       "--manifest", str(man / "test.parquet"), "--refs", refs, "--no-ema",
                                       "--out", str(out / f"eval_{refs}"), "--device", "cuda", "--allow-enlarged"]))
    return steps


def weights_name(a: argparse.Namespace) -> str:
    return "msrnet2_x8" + ("_real" if a.degradation.startswith("real") else "")


def train_plan(a: argparse.Namespace, man: Path) -> list[tuple[str, list[str]]]:
    """Train the best recipe from scratch on CUDA, evaluate it, export it: `make gpu-train`."""
    py, out, run = sys.executable, a.out, a.out / "runs" / "x8"
    steps = [("train", [py, "-m", "model", "train", "--manifest", str(man / "train.parquet"), "--model", "msrnet2_x8",
                        "--num-refs", "4", "--ref-dropout", "0.5", "--jitter", "0.1", "--framing", "0.9,1.25",
                        "--shift", "0.08", "--degradation", a.degradation, "--steps", str(a.train_steps), "--batch-size", str(a.batch_size),
                        "--lr", "5e-4", "--warmup-steps", "200", "--ema-decay", "0.999", "--ckpt-every", "1000",
                        "--workers", "8", "--device", "cuda", "--precision", "bf16", "--allow-enlarged",
                        "--runs-dir", str(out / "runs"), "--name", "x8"])]
    for deg in ("bicubic", "camera"):
        steps.append((f"eval_{deg}", [py, "-m", "model", "eval", "--checkpoint", str(run / "last.safetensors"),
                                      "--manifest", str(man / "test.parquet"), "--degradation", deg,
                                      "--zooms", "0.9,1.15,1.3", "--shifts", "0.075", "--out", str(out / f"eval_{deg}"), "--device", "cuda", "--allow-enlarged"]))
    steps.append(("export", [py, "-m", "model", "export", "--checkpoint", str(run / "last.safetensors"),
                             "--out", str(out / f"{weights_name(a)}.safetensors")]))
    return steps


def model_card(a: argparse.Namespace, summary: dict) -> str:
    """OUT/MODEL_CARD.md from what ran: the recipe, the machine, the figures."""
    lines = [f"## `{weights_name(a)}.safetensors`: x8, trained by `make gpu-train` on {summary['gpu']}", "",
             f"Recipe: scripts/gpu_check.py --mode train --degradation {a.degradation} --train-steps {a.train_steps} "
             f"--batch-size {a.batch_size} ({a.train_steps * a.batch_size:,} samples, bf16, from scratch).", "",
             "| inputs | framing (zoom, or dy: face moved down) | bicubic PSNR-Y | SR PSNR-Y | SR PSNR-Y literature |", "|---|---:|---:|---:|---:|"]
    for deg in ("bicubic", "camera"):
        f = summary["steps"].get(f"eval_{deg}", {}).get("figures")
        if f:
            lines.append(f"| {deg} | 1 | {f['bicubic']['psnr_y']:.2f} | {f['sr']['psnr_y']:.2f} | {f['sr']['psnr_y_full']:.2f} |")
            for z, g in (f.get("framings") or {}).items():
                lines.append(f"| {deg} | {z} | {g['bicubic']['psnr_y']:.2f} | {g['sr']['psnr_y']:.2f} | {g['sr']['psnr_y_full']:.2f} |")
    t = summary["steps"].get("train", {}).get("wall_s")
    lines += ["", f"Training wall time: {t} s on one GPU." if t else "Training did not finish."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip the steps that would start after this")
    ap.add_argument("--mode", choices=("check", "train"), default="check",
                    help="check: every CUDA path (make gpu-check); train: the shipped network and inputs from scratch, ready to commit (make gpu-train)")
    ap.add_argument("--degradation", choices=("bicubic", "real", "real_mild"), default="bicubic",
                    help="with --mode train (real_mild: the shipped camera model's inputs)")
    ap.add_argument("--batch-size", type=int, default=32, help="with --mode train")
    a = ap.parse_args(argv)
    a.out = a.out.resolve()
    steps = plan(a)
    print(f"gpu-{a.mode} plan:")
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
            summary["steps"][name]["figures"] = {"sr": s["sr"], "bicubic": s["bicubic"], "framings": s.get("framings")}
    summary["wall_s"] = round(time.time() - t0, 1)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if a.mode == "train":
        (a.out / "MODEL_CARD.md").write_text(model_card(a, summary))
    print(f"figures in {a.out}")
    return 0 if all(v.get("rc", 0) == 0 for v in summary["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
