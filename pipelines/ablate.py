"""Recipe: do references help? Reference ablations of one checkpoint with paired bootstrap CIs.

Evaluates a checkpoint on one manifest (the identity-disjoint test split) under every
reference arm and compares the arms face by face:

    matched    the manifest's references (chosen on the view the manifest says)
    random     other identities of the manifest, resampled per seed
    none       no reference
    shuffled   the matched references with their 4x4 grid of blocks permuted, per seed
    oracle     the HR target itself as every reference (an upper bound)

Decision rule, fixed before any run (issue 11): "references help" only if both
matched - random and matched - none are >= 0.2 dB PSNR-Y (crop = scale) with the lower end of the
95% bootstrap CI of the per-face paired difference above 0. Random and shuffled arms are
averaged over the seeds per face before differencing (the spread over seeds is reported too).

Identity, when `model eval` scored it (the face recogniser is installed): the same paired
differences and CIs of the SR's recogniser distance to its own HR (`sr_id_dist`; lower is the
right person, so a negative matched - random means matched references keep identity better),
and each arm's verification rate and count of faces drifted to a reference's identity.

    python -m pipelines.ablate --checkpoint weights/msrnet2_x8.safetensors \\
        --manifest LIB/manifests/NAME/test.parquet --seeds 0,1,2 --out ablation/
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

ARMS = ("matched", "random", "none", "shuffled", "oracle")
SEEDED = ("random", "shuffled")
THRESHOLD_DB = 0.2


def paired_ci(diff: np.ndarray, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-face differences and its 95% percentile-bootstrap CI (resampling faces)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run_arms(checkpoint: Path, manifest: Path, out: Path, seeds: list[int], device: str, num_refs: int | None,
             metric: str, allow_enlarged: bool = False) -> dict[str, dict]:
    """Per arm: face_id -> metric (mean over seeds for seeded arms), plus the per-seed means."""
    from model.evaluate import evaluate

    res: dict[str, dict] = {}
    for arm in ARMS:
        per_face: dict[str, list[float]] = {}
        per_face_id: dict[str, list[float]] = {}  # sr_id_dist, when identity was scored
        seed_means, bicubic, ident = [], None, []
        for seed in (seeds if arm in SEEDED else [0]):
            where, summary = evaluate(checkpoint, manifest, out / f"{arm}_s{seed}", arm, num_refs, device=device,
                                      seed=seed, allow_enlarged=allow_enlarged)
            seed_means.append(summary["sr"][metric])
            bicubic = summary["bicubic"][metric]
            if summary.get("identity"):
                ident.append(summary["identity"])
            with open(where / "per_image.csv", newline="") as fh:
                for row in csv.DictReader(fh):
                    per_face.setdefault(row["face_id"], []).append(float(row[f"sr_{metric}"]))
                    if row.get("sr_id_dist"):
                        per_face_id.setdefault(row["face_id"], []).append(float(row["sr_id_dist"]))
        res[arm] = {"per_face": {k: float(np.mean(v)) for k, v in per_face.items()}, "seed_means": seed_means,
                    "bicubic": bicubic, "summary": summary, "identity": ident,
                    "per_face_id": {k: float(np.mean(v)) for k, v in per_face_id.items()}}
    return res


def compare(res: dict[str, dict], a: str, b: str, key: str = "per_face") -> dict[str, float]:
    """Paired a - b over the faces (key: "per_face", the metric; "per_face_id", the SR's identity distance)."""
    faces = sorted(res[a][key])
    diff = np.array([res[a][key][f] - res[b][key][f] for f in faces])
    mean, lo, hi = paired_ci(diff)
    return {"mean": mean, "ci_lo": lo, "ci_hi": hi, "n": len(faces)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("ablation"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num-refs", type=int, default=None)
    ap.add_argument("--metric", default="psnr_y", help="psnr_y (crop = scale) or psnr_y_full (literature)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--allow-enlarged", action="store_true",
                    help="evaluate on HR targets refbuild enlarged (refused otherwise; model.checks)")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    res = run_arms(a.checkpoint, a.manifest, a.out, seeds, a.device, a.num_refs, a.metric, a.allow_enlarged)
    pairs = {f"{x} - {y}": compare(res, x, y) for x, y in
             (("matched", "random"), ("matched", "none"), ("matched", "shuffled"), ("oracle", "none"),
              ("random", "none"))}
    helps = all(pairs[k]["mean"] >= THRESHOLD_DB and pairs[k]["ci_lo"] > 0 for k in ("matched - random", "matched - none"))
    s = res["matched"]["summary"]
    lines = [f"{s['n']} faces of split {s.get('split')}, x{s['scale']}, references chosen on the {s.get('ref_view')} "
             f"view, metric {a.metric}; seeds {seeds} for random/shuffled.", "",
             "| arm | mean | spread over seeds |", "|---|---:|---:|",
             f"| bicubic | {res['matched']['bicubic']:.3f} | |"]
    for arm in ARMS:
        sm = res[arm]["seed_means"]
        spread = f"{min(sm):.3f} .. {max(sm):.3f}" if len(sm) > 1 else ""
        lines.append(f"| {arm} | {np.mean(sm):.3f} | {spread} |")
    lines += ["", "| paired difference (dB) | mean | 95% CI |", "|---|---:|---|"]
    lines += [f"| {k} | {v['mean']:+.3f} | [{v['ci_lo']:+.3f}, {v['ci_hi']:+.3f}] |" for k, v in pairs.items()]
    lines += ["", f"references help (both matched - random and matched - none >= {THRESHOLD_DB} dB, CI above 0): "
              f"**{'yes' if helps else 'no'}**"]
    id_pairs = {}
    if all(res[arm]["per_face_id"] for arm in ARMS):
        id_pairs = {k: compare(res, *k.split(" - "), key="per_face_id") for k in pairs}
        b = res["matched"]["identity"][0]["bicubic"]
        lines += ["", "Identity (face recogniser distance of the SR to its own HR; lower is the right person; same "
                  "person below 0.6):", "", "| arm | distance | verified | drifted to a reference |",
                  "|---|---:|---:|---:|", f"| bicubic | {b['distance']:.3f} | {100 * b['verified']:.1f}% | |"]
        for arm in ARMS:
            ids = res[arm]["identity"]
            drifted = [s["sr"].get("drifted") for s in ids]
            lines.append(f"| {arm} | {np.mean([s['sr']['distance'] for s in ids]):.3f} | "
                         f"{100 * np.mean([s['sr']['verified'] for s in ids]):.1f}% | "
                         f"{'/'.join('n/a' if d is None else str(d) for d in drifted)} |")
        lines += ["", "| paired difference (identity distance) | mean | 95% CI |", "|---|---:|---|"]
        lines += [f"| {k} | {v['mean']:+.4f} | [{v['ci_lo']:+.4f}, {v['ci_hi']:+.4f}] |" for k, v in id_pairs.items()]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ablation.json").write_text(json.dumps(
        {"checkpoint": str(a.checkpoint), "manifest": str(a.manifest), "metric": a.metric, "seeds": seeds,
         "arms": {k: {"mean": float(np.mean(v["seed_means"])), "seed_means": v["seed_means"],
                      "bicubic": v["bicubic"]} for k, v in res.items()},
         "pairs": pairs, "references_help": helps, "identity_pairs": id_pairs,
         "identity": {k: v["identity"] for k, v in res.items()}}, indent=2))
    (a.out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
