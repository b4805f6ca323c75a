"""quality: every method's PSNR-Y on the test split beside its speed, parameters and FLOPs.

The shipped weights (weights/*.safetensors) and any trained checkpoints of the other
architectures (the reference-free twin, SPARNet, SwinIR-light: `MSRFACE_BENCH_CHECKPOINTS`,
a `pipelines.table1` runs folder or `name=path;...`) are scored with `model.evaluate` on the
test manifest (`MSRFACE_TEST_MANIFEST`); an architecture without trained weights here is
still timed and counted, its PSNR left blank and said so. faces/s: the model's forward alone
on real 16 px test faces with their references, as `model infer --single-pass` runs it
(channels_last; batch 1 on CPU, 16 on CUDA; the default self-ensemble runs two forwards a face),
repeats interleaved across methods.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.common import REPO, Skip, Stage, interleaved

ARCHS = ("msrnet2_noref_x8", "sparnet_x8", "swinir_light_x8")
N_FACES = {"quick": 4, "default": 32, "full": 64}
N_SCORED = {"quick": 16, "default": None, "full": None}  # None: the whole test split


def test_manifest() -> Path:
    p = Path(os.environ.get("MSRFACE_TEST_MANIFEST", "/work/lib_fc/manifests/fc_lr/test.parquet"))
    if not p.is_file():
        raise Skip(f"{p} not found: set MSRFACE_TEST_MANIFEST to a test manifest of a library built from "
                   "celeba_facecrops (README: the shipped model's recipe)")
    return p


def trained_checkpoints() -> dict[str, Path]:
    """name -> checkpoint: the shipped weights, then MSRFACE_BENCH_CHECKPOINTS (a folder of
    `<model>_s<seed>/` runs, the first seed of each kept, or `name=path;name=path`)."""
    found = {p.stem: p for p in sorted((REPO / "weights").glob("*.safetensors"))}
    spec = os.environ.get("MSRFACE_BENCH_CHECKPOINTS", "")
    if spec and Path(spec).is_dir():
        runs = {}  # (model, seed) -> checkpoint
        for run in Path(spec).glob("*_s*/last.safetensors"):
            model, _, seed = run.parent.name.rpartition("_s")
            if seed.isdigit():
                runs[model, int(seed)] = run
        if not runs:
            raise Skip(f"MSRFACE_BENCH_CHECKPOINTS={spec}: no <model>_s<seed>/last.safetensors in it (the `runs` "
                       "folder inside a pipelines.table1 --out)")
        for (model, _), run in sorted(runs.items()):
            found.setdefault(model, run)  # the lowest seed of each
    elif spec:
        for item in filter(None, spec.split(";")):
            name, _, path = item.partition("=")
            if not Path(path).is_file():
                raise Skip(f"MSRFACE_BENCH_CHECKPOINTS: {path}: no such checkpoint (for {name})")
            found[name] = Path(path)
    return found


def run(mode: str, repeats: int) -> Stage:
    from model.checkpoint import load_checkpoint, model_from_checkpoint
    from model.data import ManifestDataset
    from model.evaluate import evaluate_dataset
    from model.registry import create_model, model_cost
    from refbuild.torchutil import pick_device

    manifest = test_manifest()
    dev = pick_device("auto")
    batch = 16 if dev.type == "cuda" else 1
    st = Stage("quality", "bicubic (MATLAB-style)", "each model on the test split", "PSNR-Y against faces/s")
    methods: dict[str, tuple[torch.nn.Module, Path | None]] = {}
    arch_of: dict[str, str] = {}
    budget: dict[str, str] = {}  # training samples of the checkpoint's own run (+ what it started from)
    for name, path in trained_checkpoints().items():
        ck = load_checkpoint(path)
        methods[name], arch_of[name] = (model_from_checkpoint(ck), path), ck.meta["model"]
        cfg = ck.meta.get("config") or {}
        if isinstance(ck.meta.get("step"), int) and isinstance(cfg.get("batch_size"), int):
            budget[name] = f"{ck.meta['step'] * cfg['batch_size']:,}" + (" + its --init-from's" if cfg.get("init_from") else "")
    for arch in ARCHS:
        if arch not in methods:
            torch.manual_seed(0)
            methods[arch] = (create_model(arch), None)  # timed and counted; no PSNR without training
    ds = ManifestDataset(manifest, 8, 4, "matched", check_files=True)
    if N_SCORED[mode]:
        ds.rows = ds.rows[: N_SCORED[mode]]
    n = min(N_FACES[mode], len(ds))
    batch_in = [ds[i] for i in range(n)]
    lr = torch.stack([b["lr"] for b in batch_in]).to(dev)  # n, 3, 16, 16
    refs = torch.stack([b["refs"] for b in batch_in]).to(dev)  # n, 4, 3, 128, 128
    mask = torch.stack([b["ref_mask"] for b in batch_in]).to(dev)

    def forward(model: torch.nn.Module):
        def go():
            with torch.no_grad():
                for s in range(0, n, batch):
                    model(lr[s : s + batch], refs[s : s + batch], mask[s : s + batch])
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return go

    for name, (model, _) in methods.items():
        methods[name] = (model.eval().to(dev, memory_format=torch.channels_last), methods[name][1])
    timings = interleaved({k: forward(m) for k, (m, _) in methods.items()}, repeats, warmup=1)
    bicubic = None
    for name, (model, path) in methods.items():
        arch = arch_of.get(name) or name
        cost = model_cost(model, 4)  # the checkpoint's own settings (model_kwargs), not the variant's defaults
        row = {"method": name, "architecture": arch, "params": cost["params"], "gflops": round(cost["flops"] / 1e9, 2),
               "faces_per_s": round(n / timings[name][0].median, 2), "training_samples": budget.get(name, "-"),
               "checkpoint": str(path) if path else "none (untrained)"}
        if path is not None:
            summary = evaluate_dataset(model, ds, dev)[1]
            bicubic = bicubic or summary["bicubic"]
            row.update({"psnr_y": round(summary["sr"]["psnr_y"], 3), "psnr_y_literature": round(summary["sr"]["psnr_y_full"], 3),
                        "ssim_y": round(summary["sr"]["ssim_y"], 4)})
        else:
            row.update({"psnr_y": "not trained here", "psnr_y_literature": "-", "ssim_y": "-"})
        st.points.append(row)
    if bicubic is not None:
        st.points.insert(0, {"method": "bicubic", "architecture": "-", "params": 0, "gflops": "-", "faces_per_s": "-",
                             "training_samples": "-", "checkpoint": "-", "psnr_y": round(bicubic["psnr_y"], 3),
                             "psnr_y_literature": round(bicubic["psnr_y_full"], 3), "ssim_y": round(bicubic["ssim_y"], 4)})
    st.notes += [f"test manifest {manifest} ({len(ds)} faces scored, x8 = 16 -> 128, matched references m=4, clean "
                 "bicubic inputs); PSNR-Y with border crop 8, literature: MATLAB Y, no crop",
                 f"faces/s: forward only on {n} real test faces, device {dev}, batch {batch}, fp32, channels_last, "
                 f"median of {repeats} interleaved repeats; GFLOPs per face (torch FlopCounterMode, 4 references)",
                 "an architecture with checkpoint 'none (untrained)' had no trained weights on this machine "
                 "(MSRFACE_BENCH_CHECKPOINTS): its speed and size are measured, its PSNR is not",
                 "training_samples: steps x batch of the checkpoint's own run ('+ its --init-from's': it continued "
                 "another checkpoint, weights/README.md gives the total); PSNR compares fairly only at equal "
                 "samples (RESULTS.md section 6 trains every method at one budget)"]
    return st
