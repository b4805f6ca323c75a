"""Evaluation: PSNR/SSIM of SR and bicubic, per image and summarised."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from refbuild.io import write_bytes, write_json
from refbuild.torchutil import pick_device

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import ManifestDataset
from .ensemble import super_resolve
from .errors import MsrError
from .metrics import bicubic_upsample, psnr, ssim, tensor_to_uint8

log = logging.getLogger(__name__)

METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "psnr_y_full", "ssim_y_full")


def image_metrics(sr, hr, scale: int) -> dict[str, float]:
    """Three conventions, HWC uint8 inputs: Y (BT.601) with border crop = scale (BasicSR), RGB without
    crop, and the face-SR literature's (`*_y_full`: MATLAB Y rounded to uint8, whole image, no crop)."""
    return {
        "psnr_y": psnr(sr, hr, crop_border=scale, test_y_channel=True),
        "ssim_y": ssim(sr, hr, crop_border=scale, test_y_channel=True),
        "psnr_rgb": psnr(sr, hr),
        "ssim_rgb": ssim(sr, hr),
        "psnr_y_full": psnr(sr, hr, test_y_channel=True, y_uint8=True),
        "ssim_y_full": ssim(sr, hr, test_y_channel=True, y_uint8=True),
    }


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module, ds: ManifestDataset, device: torch.device, batch_size: int = 8,
    visit: Callable[..., None] | None = None, self_ensemble: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the model on every row (`self_ensemble`: x2 flip, `model.ensemble`); returns (per-image rows,
    summary of means).

    `visit(face_id, lr, bicubic, refs, sr, hr)`, when given, sees every image of
    the pass (CPU tensors in [0, 1]; refs only the real ones), e.g. to draw a report.
    """
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        lr, hr = batch["lr"].to(device), batch["hr"]
        sr = super_resolve(model, lr, batch["refs"].to(device), batch["ref_mask"].to(device), self_ensemble).cpu()
        # the bicubic row as the literature computes it (MATLAB-style: PIL, a = -0.5)
        bic = torch.stack([torch.from_numpy(bicubic_upsample(tensor_to_uint8(x), hr.shape[-1])).permute(2, 0, 1)
                           for x in batch["lr"]]).float() / 255.0
        for i in range(lr.shape[0]):
            h = tensor_to_uint8(hr[i])
            row: dict[str, Any] = {"face_id": ds.rows[int(batch["index"][i])].face_id}
            if visit is not None:
                visit(row["face_id"], batch["lr"][i], bic[i].clamp(0, 1), batch["refs"][i][batch["ref_mask"][i]],
                      sr[i], hr[i])
            row.update({f"sr_{k}": v for k, v in image_metrics(tensor_to_uint8(sr[i]), h, ds.scale).items()})
            row.update({f"bicubic_{k}": v for k, v in image_metrics(tensor_to_uint8(bic[i]), h, ds.scale).items()})
            rows.append(row)
    model.train(was_training)
    summary = {"n": len(rows), "scale": ds.scale, "refs": ds.ref_mode, "num_refs": ds.num_refs, "seed": ds.seed,
               "ref_view": ds.ref_view, "split": ds.split, "self_ensemble": self_ensemble}
    for method in ("sr", "bicubic"):
        summary[method] = {k: sum(r[f"{method}_{k}"] for r in rows) / len(rows) for k in METRICS}
    return rows, summary


def summary_markdown(summary: dict[str, Any], title: str) -> str:
    lines = [
        f"# {title}", "",
        f"{summary['n']} images of split {summary.get('split')}, x{summary['scale']}, refs {summary['refs']} "
        f"(k={summary['num_refs']}), references chosen on the {summary.get('ref_view')} view. "
        f"Y: BT.601 luma, border crop {summary['scale']}; RGB: no crop; Y full: MATLAB Y (uint8), whole image. "
        "Bicubic: MATLAB-style (PIL).", "",
        "| method | PSNR Y | SSIM Y | PSNR RGB | SSIM RGB | PSNR Y full | SSIM Y full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in ("bicubic", "sr"):
        m = summary[method]
        lines.append(f"| {method} | {m['psnr_y']:.3f} | {m['ssim_y']:.4f} | {m['psnr_rgb']:.3f} | {m['ssim_rgb']:.4f} "
                     f"| {m['psnr_y_full']:.3f} | {m['ssim_y_full']:.4f} |")
    if summary.get("degradation", "bicubic") != "bicubic":
        lines += ["", f"Inputs degraded with preset `{summary['degradation']}` (model.degradations), seeded per face "
                      f"by (seed {summary['seed']}, face index); each face's parameters are in summary.json."]
    if summary.get("framings"):
        lines += ["", "Framings (centre zoom, > 1 closer, < 1 farther; dy: face moved down by that part of the side):", "",
                  "| framing | bicubic PSNR Y | SR PSNR Y | gain | SR PSNR Y full |", "|---:|---:|---:|---:|---:|"]
        for z, f in summary["framings"].items():
            lines.append(f"| {z} | {f['bicubic']['psnr_y']:.3f} | {f['sr']['psnr_y']:.3f} | "
                         f"{f['sr']['psnr_y'] - f['bicubic']['psnr_y']:+.3f} | {f['sr']['psnr_y_full']:.3f} |")
    if summary.get("identity"):
        from .identity_eval import summary_lines

        lines += summary_lines(summary["identity"])
    elif summary.get("identity_note"):
        lines += ["", summary["identity_note"]]
    return "\n".join(lines) + "\n"


def evaluate(
    checkpoint: Path,
    manifest: Path,
    out_dir: Path | None = None,
    refs: str = "matched",
    num_refs: int | None = None,
    data_root: Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
    use_ema: bool = True,
    report: bool = False,
    seed: int = 0,
    degradation: str = "bicubic",
    zooms: tuple[float, ...] = (),
    allow_enlarged: bool = False,
    identity: bool | None = None,
    shifts: tuple[float, ...] = (),
    self_ensemble: bool = False,
    gallery: str = "split",
) -> tuple[Path, dict[str, Any]]:
    """Evaluate a checkpoint on a manifest; writes per_image.csv, summary.json, summary.md.

    degradation: how each 16 px input is made (`model.degradations` preset), seeded per face by
        (seed, face index): reproducible; recorded in summary.json with each face's parameters.
    zooms: also score at these centre framings (zoom > 1 closer, < 1 farther; `data.framed`):
        a model that only works at its training framing shows it here. summary["framings"], keyed by zoom.
    shifts: also score with every face moved down by these fractions of the side (zoom 1): the standard
        aligned CelebA test crops hold faces ~0.075 lower than `refbuild detect --aligned` crops (DESIGN.md
        "Framing"). summary["framings"], keyed "dy+0.075".
    self_ensemble: average the output on each face and on its mirror image (`model.ensemble`; twice the
        compute); off by default: the benchmark's protocol is one pass. summary["self_ensemble"] records it.
    report=True also writes `report/index.html` with its pictures (see model.report).
    allow_enlarged: score HR targets refbuild enlarged (`model.checks`; refused otherwise, as a stale
        manifest or one paired for another scale always is); summary["hr_enlarged"] counts them.
    identity: also score identity with the face recogniser (`model.identity_eval`): per-face columns,
        summary["identity"]. None: when its weights are installed (else summary["identity_note"] says
        why not); True: required (RefbuildError naming the pip command when absent); False: never.
    gallery: rank-1's gallery (`identity_eval.gallery_photos`): "split", the manifest's people, or
        "library", every identity in the library (the other splits' people as distractors).
    """
    if gallery != "split" and identity is False:
        raise MsrError(f"--gallery {gallery} is a gallery for identity: drop --no-identity, or the --gallery option")
    ck = load_checkpoint(checkpoint)
    checkpoint = ck.path  # a run folder stands for its best (else last) checkpoint
    dev = pick_device(device)
    model = model_from_checkpoint(ck, use_ema).to(dev)
    k = num_refs if num_refs is not None else ck.meta.get("config", {}).get("num_refs", 4)
    ds = ManifestDataset(manifest, model.scale, k, refs, data_root, seed=seed, degradation=degradation)
    framings = [(f"{z:g}", {"zoom": z}) for z in zooms] + [(f"dy{d:+g}", {"offset": d}) for d in shifts]
    # built before any work, so a bad --zooms/--shifts value fails in one line, not after the main pass
    framed_sets = {name: ManifestDataset(manifest, model.scale, k, refs, data_root, seed=seed,
                                         degradation=degradation, **how) for name, how in framings}
    from .checks import check_manifest

    enlarged = check_manifest(Path(manifest), model.scale, f"the checkpoint ({ck.meta.get('model')})", data_root,
                              allow_enlarged)  # what `model train` refuses, refused here too
    if ds.split == "train":
        log.warning("%s: its metadata says split=train: these scores are on training faces", manifest)
    tag = "" if degradation == "bicubic" else f"-{degradation}"
    tag += ("-se" if self_ensemble else "") + ("" if gallery == "split" else f"-{gallery}") + (f"-s{seed}" if seed else "")
    out_dir = out_dir or Path(checkpoint).parent / f"eval-{Path(manifest).stem}-{refs}{k}{tag}"
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = None
    if report:
        from .report import EvalReport

        pages = EvalReport(out_dir / "report", ds)
    ident, ident_note = None, None
    if identity is not False:
        from refbuild.errors import RefbuildError

        from .identity_eval import IdentityEval

        try:
            ident = IdentityEval.load(ds, dev, data_root, gallery)
        except RefbuildError as e:
            if identity:
                raise
            ident_note = f"identity not measured: {e}"
    visits = [v for v in (pages.add if pages else None, ident.add if ident else None) if v is not None]
    visit = (lambda *a: [v(*a) for v in visits]) if visits else None
    rows, summary = evaluate_dataset(model, ds, dev, batch_size, visit=visit, self_ensemble=self_ensemble)
    if ident is not None:
        per_face, summary["identity"] = ident.finish()
        for r in rows:
            r.update(per_face[r["face_id"]])
    elif ident_note:
        summary["identity_note"] = ident_note
    from refbuild.io import provenance

    summary["degradation"] = degradation
    if degradation != "bicubic":
        summary["degradation_params"] = {r.face_id: ds.degradation_at(i).to_json() for i, r in enumerate(ds.rows)}
    if framed_sets:
        summary["framings"] = {}
        for name, zds in framed_sets.items():
            zs = evaluate_dataset(model, zds, dev, batch_size, self_ensemble=self_ensemble)[1]
            summary["framings"][name] = {"sr": zs["sr"], "bicubic": zs["bicubic"]}
    summary["hr_enlarged"] = enlarged.n if enlarged.known else None  # None: the library records no source sizes
    summary.update({"checkpoint": str(Path(checkpoint).resolve()), "manifest": str(Path(manifest).resolve()),
                    "model": ck.meta["model"], "use_ema": use_ema, "device": str(dev), "provenance": provenance()})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_bytes(out_dir / "per_image.csv", buf.getvalue().encode())
    write_json(out_dir / "summary.json", summary)
    write_bytes(out_dir / "summary.md", summary_markdown(summary, f"{ck.meta['model']} on {manifest}").encode())
    if pages is not None:
        pages.write(rows, summary, Path(checkpoint).parent)
    return out_dir, summary
