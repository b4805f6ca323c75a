"""Recipe: the paper's tables (Table 1-3 and reference ablations) at a chosen budget.

Trains a grid of MSRNet runs on a refbuild manifest set, evaluates each on the
test split (PSNR/SSIM, Y and RGB, bicubic beside), and writes a JSON of all
figures plus Markdown tables. The grid and budget are options, so the same
recipe is a small CPU run here and the full protocol on a GPU:

    python -m pipelines.paper_tables --manifests LIB/manifests/celeba_facecrops \
        --lr-view-manifests LIB/manifests/celeba_facecrops_lr --steps 300 --model-size tiny
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def grid(size: str, x16: bool) -> list[dict]:
    p = "msrnet_tiny" if size == "tiny" else "msrnet"
    runs = [{"name": "x4_m4", "model": f"{p}_x4", "refs": 4}, {"name": "x8_m4", "model": f"{p}_x8", "refs": 4}]
    runs += [{"name": f"x4_m{k}", "model": f"{p}_x4", "refs": k} for k in (0, 1, 2, 3, 5)]
    if x16:
        runs += [{"name": "x16_swin", "model": f"{p}_x16", "refs": 4},
                 {"name": "x16_noswin", "model": f"{p}_x16", "refs": 4, "no_swin": True}]
    return runs


def sh(args: list[str], log: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.call(args, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"paper_tables: {' '.join(args[:4])} failed (exit {rc}); see {log}")
    return time.perf_counter() - t


def train_and_eval(run: dict, a: argparse.Namespace) -> dict:
    py = [sys.executable, "-m", "model"]
    allow = ["--allow-enlarged"] if a.allow_enlarged else []
    out = a.runs_dir / run["name"]
    log = a.runs_dir / f"{run['name']}.log"
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if (out / "last.safetensors").exists() else []
    secs = sh(py + ["train", "--manifest", str(a.manifests / "train.parquet"), "--model", run["model"],
                    "--num-refs", str(run["refs"]), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                    "--lr", str(a.lr), "--warmup-steps", "20", "--name", run["name"], "--runs-dir", str(a.runs_dir),
                    "--device", a.device, "--log-every", "25", "--ckpt-every", str(a.steps), "--sample-every", str(a.steps)]
              + (["--no-swin"] if run.get("no_swin") else []) + resume + allow, log, a.threads)
    ckpt = out / "last.safetensors"
    evals = {"matched": ["--refs", "matched"]}
    if run["name"] in ("x4_m4", "x8_m4"):
        evals |= {"random": ["--refs", "random"], "none": ["--refs", "none"]}
    res = {"run": run, "train_seconds": round(secs, 1), "evals": {}}
    for key, extra in evals.items():
        sh(py + ["eval", "--checkpoint", str(ckpt), "--manifest", str(a.manifests / "test.parquet"),
                 "--out", str(out / f"eval_{key}"), "--device", a.device] + extra + allow, log, a.threads)
        res["evals"][key] = json.loads((out / f"eval_{key}" / "summary.json").read_text())
    if a.lr_view_manifests and run["name"] in ("x4_m4", "x8_m4"):
        sh(py + ["eval", "--checkpoint", str(ckpt), "--manifest", str(a.lr_view_manifests / "test.parquet"),
                 "--out", str(out / "eval_lrview"), "--device", a.device] + allow, log, a.threads)
        res["evals"]["lr_view"] = json.loads((out / "eval_lrview" / "summary.json").read_text())
    (out / "result.json").write_text(json.dumps(res, indent=2))
    return res


def _cells(summary: dict, method: str) -> str:
    m = summary[method]
    return f"{m['psnr_y']:.2f} | {m['ssim_y']:.4f} | {m['psnr_rgb']:.2f} | {m['ssim_rgb']:.4f}"


def render(results: dict) -> str:
    """Markdown tables of a results.json (PSNR/SSIM on Y with border crop = scale, and RGB)."""
    head = "| PSNR-Y | SSIM-Y | PSNR-RGB | SSIM-RGB |"
    rule = "|---:|---:|---:|---:|"
    r = {k: v for k, v in results.items() if not k.startswith("_")}
    out = ["### Table 1: bicubic vs MSRNet", "", "| scale | method " + head, "|---|---" + rule]
    for name, scale in (("x4_m4", "x4"), ("x8_m4", "x8"), ("x16_swin", "x16")):
        if name in r:
            ev = r[name]["evals"]["matched"]
            out += [f"| {scale} | bicubic | {_cells(ev, 'bicubic')} |", f"| {scale} | MSRNet (m=4) | {_cells(ev, 'sr')} |"]
    out += ["", "### Table 2: number of references (each trained with that many)", "", "| scale | refs " + head, "|---|---" + rule]
    for name in sorted(n for n in r if n.startswith("x4_m")):
        out.append(f"| x4 | {r[name]['run']['refs']} | {_cells(r[name]['evals']['matched'], 'sr')} |")
    if "x16_swin" in r or "x16_noswin" in r:
        out += ["", "### Table 3: GFE (Swin) at x16", "", "| variant " + head, "|---" + rule]
        for name, label in (("x16_noswin", "no_sw (3x3 conv)"), ("x16_swin", "with_sw")):
            if name in r:
                out.append(f"| {label} | {_cells(r[name]['evals']['matched'], 'sr')} |")
    out += ["", "### References at evaluation: matched, random (other identities), none; HR-view vs LR-view selection",
            "", "| model | references " + head, "|---|---" + rule]
    for name in ("x4_m4", "x8_m4"):
        if name in r:
            for key, label in (("matched", "matched, HR view"), ("lr_view", "matched, LR view"), ("random", "random"),
                               ("none", "none")):
                if key in r[name]["evals"]:
                    out.append(f"| {name} | {label} | {_cells(r[name]['evals'][key], 'sr')} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifests", type=Path, required=True, help="folder with train/val/test.parquet (HR-view pairing)")
    ap.add_argument("--lr-view-manifests", type=Path, help="the same faces paired on the LR view")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/paper_tables"))
    ap.add_argument("--model-size", choices=["tiny", "paper"], default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--x16", action="store_true", help="also Table 3 (x16 with and without Swin)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--allow-enlarged", action="store_true",
                    help="train and evaluate on HR targets refbuild enlarged (refused otherwise; model.checks)")
    ap.add_argument("--only", nargs="*", help="run names to (re)run")
    ap.add_argument("--render", action="store_true", help="print the Markdown tables of runs-dir/results.json and stop")
    a = ap.parse_args(argv)
    if a.render:
        print(render(json.loads((a.runs_dir / "results.json").read_text())), end="")
        return
    runs = [r for r in grid(a.model_size, a.x16) if not a.only or r["name"] in a.only]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(lambda r: train_and_eval(r, a), runs))
    all_path = a.runs_dir / "results.json"
    old = json.loads(all_path.read_text()) if all_path.exists() else {}
    old.update({r["run"]["name"]: r for r in results} | {"_protocol": vars(a) | {"wall_seconds": round(time.perf_counter() - t0)}})
    all_path.write_text(json.dumps(old, indent=2, default=str))
    print(f"paper_tables: {len(results)} runs in {time.perf_counter() - t0:.0f} s; figures in {all_path}")


if __name__ == "__main__":
    main()
