"""Recipe: the paper's Table 1, every method retrained in one harness at an equal budget.

Every method is trained by `model.train.train` with one `TrainConfig` that differs only in
the model name (same manifest, degradation, steps x batch, optimiser, schedule, seed), then
evaluated on the test split by `model.evaluate.evaluate` (both protocols). Methods that take
no references (SPARNet, MSRNet2's reference-free twin) are given the same batches and
ignore the references. Not included: FSRGAN / FSRNet (they need landmark and parsing
priors the project does not have).

Two budgets:
  equal samples  every method trains `--steps` x `--batch-size` samples (the headline).
  equal time     the CPU seconds the fastest method needs for that budget: a slower method
                 is stopped (and evaluated) at the step it reaches in that time, from its
                 measured training speed, then resumed to the full budget (`--stop-after`
                 and `--resume` of the same run, so both numbers cost one training).

    python -m pipelines.table1 --manifests LIB/manifests/NAME --steps 3600 --seeds 0,1,2 --out table1/

`--manifests DIR` holds train.parquet and test.parquet (refbuild pair). Writes
`OUT/table1.md`, `OUT/table1.json`, the runs under `OUT/runs/` and evaluations under `OUT/eval/`.
A finished (method, seed) is read back from `OUT/results/` on a rerun.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.registry import model_cost

DEFAULT_METHODS = ("sparnet_x8", "swinir_light_x8", "msrnet2_noref_x8", "msrnet2_x8")
TINY_METHODS = ("sparnet_tiny_x8", "swinir_tiny_x8", "msrnet2_noref_tiny_x8", "msrnet2_tiny_x8")
REPORTED = ("psnr_y", "ssim_y", "psnr_y_full", "ssim_y_full")
NOT_INCLUDED = {
    "FSRGAN / FSRNet": "needs facial landmark heatmaps and parsing maps as training priors; the project has neither",
}


def train_speed(name: str, batch_size: int, num_refs: int, steps: int = 3, seed: int = 0) -> float:
    """CPU training samples/s of the model alone (forward, L1, backward, Adam; channels_last, fp32),
    on random tensors, after one warm-up step: the speed the equal-time budget is computed from."""
    from model import create_model

    with torch.random.fork_rng(devices=[]):  # a measurement must not reseed the caller
        torch.manual_seed(seed)
        model = create_model(name).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    S = model.out_size
    lr, hr = torch.rand(batch_size, 3, 16, 16), torch.rand(batch_size, 3, S, S)
    refs, mask = torch.rand(batch_size, num_refs, 3, S, S), torch.ones(batch_size, num_refs, dtype=torch.bool)

    def step() -> None:
        loss = F.l1_loss(model(lr, refs, mask), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - t0)


def equal_time_steps(speeds: dict[str, float], steps: int) -> dict[str, int]:
    """Steps each method reaches in the CPU time the fastest needs for `steps` (at least 1)."""
    fastest = max(speeds.values())
    return {m: max(1, min(steps, round(steps * s / fastest))) for m, s in speeds.items()}


def _scores(summary: dict[str, Any], method: str = "sr") -> dict[str, float]:
    return {k: summary[method][k] for k in REPORTED}


def run_one(base, method: str, seed: int, stop_at: int, test: Path, out: Path, device: str,
            on_partial=None) -> dict[str, Any]:
    """Train one (method, seed) to base.steps, evaluating at `stop_at` too when it is earlier."""
    from model.evaluate import evaluate
    from model.train import train
    from refbuild.io import write_json

    done = out / "results" / f"{method}_s{seed}.json"
    partial = done.with_suffix(".equal_time.json")  # the equal-time score, kept while the full budget trains
    if done.is_file():
        return json.loads(done.read_text())
    cfg = replace(base, model=method, name=f"{method}_s{seed}", seed=seed, runs_dir=out / "runs")
    started = (cfg.runs_dir / cfg.name / "last.safetensors").is_file()  # a run killed part-way: resume it
    res: dict[str, Any] = {"method": method, "seed": seed, "equal_time_step": stop_at}
    if partial.is_file():  # the equal-time score exists: only the rest of the budget is left
        kept = json.loads(partial.read_text())
        if kept.get("equal_time_step") != stop_at:
            raise SystemExit(f"{partial}: equal-time step {kept.get('equal_time_step')}, but these --methods give "
                             f"{stop_at} (equal time is set by the fastest method listed); rerun with the --methods "
                             f"of the run that made it")
        res = {**kept, **res}
    if started:  # the seconds trained before the kill were not kept: train_seconds is a lower bound
        res["resumed"] = True
    t0 = time.perf_counter()
    if stop_at < cfg.steps and "equal_time" not in res:
        run = train(replace(cfg, stop_after=stop_at, resume=started))
        res["seconds_to_equal_time_step"] = time.perf_counter() - t0
        _, s = evaluate(run / "last.safetensors", test, out / "eval" / f"{cfg.name}_step{stop_at}", device=device,
                        allow_enlarged=cfg.allow_enlarged)
        res["equal_time"] = _scores(s)
        write_json(partial, res)
        if on_partial:
            on_partial()
        started = True
    t1 = time.perf_counter()
    run = train(replace(cfg, resume=started))
    seconds = res.get("seconds_to_equal_time_step", 0.0) + time.perf_counter() - t1
    res["train_seconds"] = seconds
    _, s = evaluate(run / "last.safetensors", test, out / "eval" / cfg.name, device=device,
                    allow_enlarged=cfg.allow_enlarged)
    res["equal_samples"] = _scores(s)
    res["bicubic"] = _scores(s, "bicubic")
    res["n_test"], res["split"], res["ref_view"] = s["n"], s.get("split"), s.get("ref_view")
    res.setdefault("equal_time", res["equal_samples"])
    write_json(done, res)
    return res


def _agg(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_markdown(table: dict[str, Any]) -> str:
    """Table 1 as Markdown: one row per method (bicubic first), mean ± sd over seeds."""
    cfg, rows = table["config"], table["methods"]
    seeds = cfg["seeds"]
    any_res = next(x for r in rows.values() for x in r["runs"] if "equal_samples" in x)
    lines = [
        f"Test split: {any_res['n_test']} faces (split {any_res['split']}, references chosen on the "
        f"{any_res['ref_view'] or 'unrecorded'} view), LR 16x16. Every method: {cfg['steps']} steps x batch "
        f"{cfg['batch_size']} = {cfg['steps'] * cfg['batch_size']} samples, Adam lr {cfg['lr']} (warmup {cfg['warmup_steps']}, cosine), "
        f"L1, EMA {cfg['ema_decay']} (warmup: min(decay, (1+t)/(10+t))), jitter {cfg['jitter']}, ref dropout {cfg['ref_dropout']}, seeds {seeds} (a row's own in its seeds column); "
        f"mean ± sd over seeds. PSNR/SSIM Y crop = scale (BasicSR) and the literature's (MATLAB Y uint8, whole "
        f"image). FLOPs: forward, per sample, FlopCounterMode ({cfg['num_refs']} references where used). "
        f"samples/s: CPU training speed of the model alone, batch {cfg['batch_size']}; train s: wall seconds of "
        f"each training (data loading included; ≥: resumed after a kill, the seconds before it not counted). Equal time: each method stopped at the step it reaches in the "
        f"seconds the fastest needs for the full budget (mid-schedule), then resumed.",
        "",
        "| method | params | GFLOPs | train samples/s | train s | PSNR-Y | SSIM-Y | PSNR-Y lit. | SSIM-Y lit. "
        "| equal-time step | PSNR-Y at equal time | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    b = any_res["bicubic"]
    lines.append(f"| bicubic (MATLAB-style) | 0 | - | - | - | {b['psnr_y']:.2f} | {b['ssim_y']:.4f} "
                 f"| {b['psnr_y_full']:.2f} | {b['ssim_y_full']:.4f} | - | - | - |")
    for name, r in rows.items():
        runs = [x for x in r["runs"] if "equal_samples" in x]
        if not runs:  # only the equal-time score so far: the full budget did not finish
            et = [x["equal_time"]["psnr_y"] for x in r["runs"]]
            lines.append(f"| {name} | {r['params']:,} | {r['flops'] / 1e9:.2f} | {r['samples_per_s']:.1f} | not finished "
                         f"| - | - | - | - | {r['runs'][0]['equal_time_step']} | {_agg(et, 2)} "
                         f"| {','.join(str(x['seed']) for x in r['runs'])} |")
            continue
        es = {k: [x["equal_samples"][k] for x in runs] for k in REPORTED}
        et = [x["equal_time"]["psnr_y"] for x in runs]
        lines.append(
            f"| {name} | {r['params']:,} | {r['flops'] / 1e9:.2f} | {r['samples_per_s']:.1f} "
            f"| {'≥ ' if any(x.get('resumed') for x in runs) else ''}{_agg([x['train_seconds'] for x in runs], 1)} | {_agg(es['psnr_y'], 2)} | {_agg(es['ssim_y'], 4)} "
            f"| {_agg(es['psnr_y_full'], 2)} | {_agg(es['ssim_y_full'], 4)} | {runs[0]['equal_time_step']} "
            f"| {_agg(et, 2)} | {','.join(str(x['seed']) for x in runs)} |")
    lines += ["", "Not included:"] + [f"- {k}: {v}." for k, v in NOT_INCLUDED.items()]
    return "\n".join(lines) + "\n"


def comparison_manifests(folder: Path) -> tuple[Path, Path]:
    """FOLDER's train.parquet and test.parquet (what `refbuild pair` writes), or a one-line exit naming the missing one."""
    train_m, test_m = folder / "train.parquet", folder / "test.parquet"
    for p in (train_m, test_m):
        if not p.is_file():
            raise SystemExit(f"{p}: missing; --manifests must hold train.parquet and test.parquet (refbuild pair)")
    return train_m, test_m


def add_recipe_args(ap: argparse.ArgumentParser) -> None:
    """The training recipe every method of a comparison shares (table1, libsize)."""
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: min(200, steps // 10)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--ref-dropout", type=float, default=0.5)
    ap.add_argument("--jitter", type=float, default=0.1)
    ap.add_argument("--num-refs", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--allow-enlarged", action="store_true",
                    help="train and evaluate on HR targets refbuild enlarged (refused otherwise; model.checks)")


def recipe_config(a: argparse.Namespace, manifest: Path, ckpt_every: int):
    """The shared recipe as a TrainConfig (model, name and seed set per run)."""
    from model.train import TrainConfig

    warmup = a.warmup_steps if a.warmup_steps is not None else min(200, a.steps // 10)
    return TrainConfig(manifest=manifest, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=warmup,
                       ema_decay=a.ema_decay, ref_dropout=a.ref_dropout, jitter=a.jitter, num_refs=a.num_refs,
                       workers=a.workers, device=a.device, progress=False, ckpt_every=ckpt_every,
                       sample_every=a.steps, log_every=max(1, min(50, a.steps)), allow_enlarged=a.allow_enlarged)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifests", type=Path, required=True, help="folder with train.parquet and test.parquet")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--method-seeds", default="",
                    help="per-method seeds overriding --seeds, e.g. sparnet_x8=0 (a slow method on fewer seeds)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"registered model names (tiny: {','.join(TINY_METHODS)})")
    ap.add_argument("--out", type=Path, default=Path("table1"))
    add_recipe_args(ap)
    ap.add_argument("--speed-steps", type=int, default=3, help="timed steps per method for samples/s")
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing: write the table from the results OUT holds (partial ones included)")
    a = ap.parse_args(argv)

    from model import MsrError, list_models
    from refbuild.io import write_bytes, write_json

    train_m, test_m = comparison_manifests(a.manifests)
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in list_models()]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose registered models (`model list`)")
    seeds = [int(s) for s in a.seeds.split(",")]
    per_method = {m: seeds for m in methods}
    for item in filter(None, a.method_seeds.split(";")):
        m, _, ss = item.partition("=")
        if m not in per_method or not ss:
            raise SystemExit(f"--method-seeds {item!r}: expected METHOD=SEED[,SEED] with METHOD in --methods")
        per_method[m] = [int(x) for x in ss.split(",")]
    base = recipe_config(a, train_m, ckpt_every=min(a.steps, 100))  # a kill loses at most 100 steps

    measured = a.out / "results" / "speed.json"  # kept: a rerun must stop each run at the same step
    known = json.loads(measured.read_text()) if measured.is_file() else {}
    for m in methods:
        if m not in known or known[m]["batch_size"] != a.batch_size or known[m]["num_refs"] != a.num_refs:
            known[m] = {**model_cost(m, a.num_refs), "batch_size": a.batch_size, "num_refs": a.num_refs,
                        "samples_per_s": train_speed(m, a.batch_size, a.num_refs, a.speed_steps),
                        "threads": torch.get_num_threads()}
    measured.parent.mkdir(parents=True, exist_ok=True)
    measured.write_text(json.dumps(known, indent=2))
    cost = {m: {"params": known[m]["params"], "flops": known[m]["flops"]} for m in methods}
    speed = {m: known[m]["samples_per_s"] for m in methods}
    stops = equal_time_steps(speed, a.steps)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    config = {**{k: v for k, v in base.to_json().items() if k not in ("model", "name", "seed")},
              "seeds": seeds, "method_seeds": per_method, "methods": methods, "manifests": str(a.manifests)}

    def write_table() -> dict[str, Any]:
        """Table 1 from every result so far (a partial equal-time score where a run is still training)."""
        have = {m: runs[m] + [json.loads(p.read_text()) for s in per_method[m] if s not in {x["seed"] for x in runs[m]}
                              for p in [a.out / "results" / f"{m}_s{s}.equal_time.json"] if p.is_file()]
                for m in methods}
        table = {"config": config, "methods": {m: {**cost[m], "samples_per_s": speed[m], "runs": have[m]}
                                               for m in methods if have[m]}, "not_included": NOT_INCLUDED}
        if any("equal_samples" in x for r in table["methods"].values() for x in r["runs"]):
            write_json(a.out / "table1.json", table)
            write_bytes(a.out / "table1.md", table_markdown(table).encode())
        return table

    if a.table_only:
        for m in methods:
            runs[m] = [json.loads(p.read_text()) for s in per_method[m]
                       for p in [a.out / "results" / f"{m}_s{s}.json"] if p.is_file()]
    try:  # seed-major: every method's first seed lands before any method's second
        for s in sorted({s for ss in per_method.values() for s in ss}) if not a.table_only else ():
            for m in methods:
                if s in per_method[m]:
                    runs[m].append(run_one(base, m, s, stops[m], test_m, a.out, a.device, on_partial=write_table))
                    write_table()
    except MsrError as e:
        raise SystemExit(str(e)) from e
    table = write_table()
    md = table_markdown(table)
    print(md)
    return table


if __name__ == "__main__":
    main()
