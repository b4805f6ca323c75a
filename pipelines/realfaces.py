"""Recipe: `model infer --detect` on real photos shrunk by known factors (the originals as ground truth).

For each photo, the most confident face of at least `--min-gt` px (MTCNN on the original, its
crop box inside the photo) is the ground-truth face. For every face width W (`--widths`) the
photo is shrunk (PIL bicubic, antialiased: the model's own degradation) so that face is W px
wide, and `model infer --detect --all-faces` (its own code, `model.infer.infer`) runs on the
shrunk photos. Its restored photo and the bicubic enlargement of the shrunk photo to the same
size are both enlarged back to the original size (so the two differ only by the pastes; a photo
where nothing was restored scores 0); PSNR-Y inside the ground-truth face box, restored minus
bicubic, is averaged over the faces (a face the detector missed counts 0: the user gets the
photo as it was).

Arms: `rule` (infer's defaults: which faces are restored, back-projection, agreement guard) and
`plain` (every face found, its restoration pasted as the model made it, no size rule or guard:
what `--detect` did before the rule, with this detection), and `single_pass` (the rule without the
self-ensemble's mirrored pass, `--single-pass`).
Recall: the ground-truth face found (IoU >= 0.5 with the detector's box) with infer's
settings, with MTCNN's defaults (facenet-pytorch `MTCNN()`: min_face_size 20, thresholds
0.6/0.7/0.7, every box kept) and with infer's former settings (16 px, p >= 0.95, no enlarging).
With `--negatives DIR` (photos without a face) it also counts the false faces each setting finds there.

    python -m pipelines.realfaces --photos ../shared/faces/facenet_pytorch \\
        --photos ../shared/faces/face_recognition_examples --photos ../shared/faces/deepface_tests \\
        --negatives ../shared/faces/nonface_negatives --checkpoint weights/msrnet2_x8.safetensors --out /tmp/realfaces

Writes OUT/realfaces.json (per face, width and arm) and OUT/realfaces.md (the table). The
shrunk photos and outputs under OUT are cut from the photos: keep OUT out of the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

WIDTHS = (8, 12, 16, 24, 32, 48, 64, 96)
IOU_FOUND = 0.5
ARMS = {  # InferConfig changes per arm; the first is infer as shipped
    "rule": {},
    "plain": {"max_face": float("inf"), "min_agreement": float("-inf"), "back_project": 0},
    "single_pass": {"self_ensemble": False},  # the rule, one pass per face (no mirrored pass)
}


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def pick_photos(dirs: list[Path], limit: int, min_gt: int, margin: float, device: str) -> list[dict[str, Any]]:
    """Up to `limit` photos (spread evenly over the candidates, duplicates dropped) with a face of at least
    min_gt px whose crop box lies inside the photo: [{path, box, width}]."""
    from model.infer import load_input
    from model.inputs import IMAGE_EXTS
    from refbuild.detect import square_box
    from refbuild.detector import Detector

    files, seen = [], set()
    for d in dirs:
        for f in sorted(p for p in Path(d).rglob("*") if p.suffix.lower() in IMAGE_EXTS):
            h = hashlib.sha256(f.read_bytes()).hexdigest()
            if h not in seen:
                seen.add(h)
                files.append(f)
    det = Detector(device=device, min_face=int(min_gt * 0.8))  # no time on faces too small to be picked
    picked = []
    for f in files:
        im = load_input(f)
        if isinstance(im, str):
            continue
        res = det.detect([im])[0]
        if isinstance(res, Exception) or not len(res) or res.probs[0] < 0.95:
            continue
        box = [float(v) for v in res.boxes[0]]
        l, t, r, b = square_box(res.boxes[0], margin)
        if box[2] - box[0] >= min_gt and l >= 0 and t >= 0 and r <= im.width and b <= im.height:
            picked.append({"path": str(f), "box": box, "width": box[2] - box[0]})
    step = max(1.0, len(picked) / limit)
    return [picked[int(k * step)] for k in range(min(limit, len(picked)))]


def shrink(im: Image.Image, f: float) -> Image.Image:
    return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BICUBIC)


def psnr_y_in(a: Image.Image, ref: Image.Image, box) -> float:
    from model.metrics import psnr

    l, t, r, b = (int(round(v)) for v in box)
    return psnr(np.asarray(a.crop((l, t, r, b))), np.asarray(ref.crop((l, t, r, b))), test_y_channel=True)


def baseline_found(photos: list[Image.Image], device: str) -> dict[str, list[list[list[float]]]]:
    """Boxes per photo with MTCNN's defaults and with infer's former settings."""
    from refbuild.detector import Detector

    size = 1 << 30  # no shrinking: facenet's MTCNN sees the photo as it is
    setups = {"mtcnn_defaults": (Detector(device=device, min_face=20, detect_size=size), 0.0),
              "infer_before": (Detector(device=device, min_face=16), 0.95)}
    out = {}
    for name, (det, p_min) in setups.items():
        out[name] = [[] if isinstance(r, Exception) else [list(map(float, b)) for b, p in zip(r.boxes, r.probs) if p >= p_min]
                     for r in det.detect(photos)]
    return out


def false_faces(folder: Path, device: str) -> dict[str, Any]:
    """Faces found on photos without a face: infer's detection (at its --min-prob and at 0.9), MTCNN's defaults."""
    from model.infer import load_input
    from model.inputs import IMAGE_EXTS
    from model.paste import MIN_PROB, find_faces

    photos = [im for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_EXTS
              and not isinstance(im := load_input(f), str)]
    ours = [[] if isinstance(r, str) else r for r in find_faces(photos, 0.52, device, min_prob=0.0)]
    base = baseline_found(photos, device)
    return {"photos": len(photos), f"infer_p{MIN_PROB:g}": sum(f.prob >= MIN_PROB for r in ours for f in r),
            "infer_p0.9": sum(f.prob >= 0.9 for r in ours for f in r),
            "mtcnn_defaults": sum(map(len, base["mtcnn_defaults"])), "infer_before": sum(map(len, base["infer_before"]))}


def _detect_once() -> None:
    """The arms differ only after detection: `model.paste.find_faces` runs once per shrunk photo and setting."""
    import model.paste

    if getattr(model.paste.find_faces, "cached", False):
        return
    real, memo = model.paste.find_faces, {}

    def find_faces(photos, *args, **kw):
        key = (tuple(hashlib.sha256(p.tobytes()).hexdigest() for p in photos), args, tuple(sorted(kw.items())))
        if key not in memo:
            memo[key] = real(photos, *args, **kw)
        return memo[key]

    find_faces.cached = True
    model.paste.find_faces = find_faces


def run(a: argparse.Namespace) -> dict[str, Any]:
    from model.infer import InferConfig, infer, load_input

    t0 = time.perf_counter()
    _detect_once()
    photos = pick_photos(a.photos, a.limit, a.min_gt, a.margin, a.device)
    if not photos:
        raise SystemExit(f"no photo in {a.photos} holds a face of {a.min_gt} px or more inside it")
    originals = [load_input(Path(p["path"])) for p in photos]
    rows = []
    for W in a.widths:
        folder = a.out / "shrunk" / f"w{W}"
        folder.mkdir(parents=True, exist_ok=True)
        shrunk, names = [], []
        for k, (p, im) in enumerate(zip(photos, originals)):
            name = f"{k:02d}_{Path(p['path']).stem}.png"
            small = shrink(im, W / p["width"])
            small.save(folder / name)
            shrunk.append(small)
            names.append(name)
        base = baseline_found(shrunk, a.device)
        recs = {}
        for arm, change in ARMS.items():
            cfg = InferConfig(checkpoint=a.checkpoint, inputs=(str(folder),), out_dir=a.out / "infer" / arm / f"w{W}",
                              detect=True, all_faces=True, overwrite=True, device=a.device, margin=a.margin)
            recs[arm] = {Path(i["input"]).name: i for i in infer(replace(cfg, **change))["inputs"]}
        for k, (p, im, small, name) in enumerate(zip(photos, originals, shrunk, names)):
            f = W / p["width"]
            gt_small = [v * f for v in p["box"]]
            bic = small.resize(im.size, Image.BICUBIC)
            row = {"photo": p["path"], "width": W, "gt_width": round(p["width"], 1), "bicubic": psnr_y_in(bic, im, p["box"])}
            for arm in ARMS:
                rec = recs[arm][name]
                if rec.get("restored"):  # against bicubic to the same size, brought back the same way: only pastes differ
                    made = Image.open(rec["restored"]).convert("RGB")
                    ref = small.resize(made.size, Image.BICUBIC).resize(im.size, Image.BICUBIC)
                    row[arm] = psnr_y_in(made.resize(im.size, Image.BICUBIC), im, p["box"]) - psnr_y_in(ref, im, p["box"])
                else:
                    row[arm] = 0.0  # the photo as it was
                mine = [fc for fc in rec.get("faces", []) if iou(fc["detector_box"], gt_small) >= IOU_FOUND]
                row[f"{arm}_decision"] = mine[0]["decision"] if mine else "not found"
                if arm == next(iter(ARMS)):  # the first arm is infer as shipped
                    row["found"] = bool(mine)
                    row["reason"] = mine[0]["reason"] if mine else None
                    row["agreement_db"] = mine[0].get("agreement_db") if mine else None
            for name2, boxes in base.items():
                row[f"found_{name2}"] = any(iou(b, gt_small) >= IOU_FOUND for b in boxes[k])
            rows.append(row)
        print(f"w{W} ({time.perf_counter() - t0:.0f} s): " + ", ".join(f"{arm} {np.mean([r[arm] for r in rows if r['width'] == W]):+.2f} dB" for arm in ARMS)
              + f", found {sum(r['found'] for r in rows if r['width'] == W)}/{len(photos)}", flush=True)
    neg = false_faces(a.negatives, a.device) if a.negatives else None
    return {"checkpoint": str(a.checkpoint), "photos": photos, "rows": rows, "false_faces": neg,
            "seconds": round(time.perf_counter() - t0, 1)}


def table(res: dict[str, Any]) -> str:
    """The markdown table: per width, mean PSNR-Y gains over bicubic per arm, and recall."""
    from model.paste import MIN_FACE, MIN_PROB

    rows, n = res["rows"], len(res["photos"])
    widths = sorted({r["width"] for r in rows})
    by = {W: [r for r in rows if r["width"] == W] for W in widths}
    head = "| face width | " + " | ".join(f"{W} px" for W in widths) + " |"
    lines = [head, "|---|" + "---:|" * len(widths)]

    def line(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(by[W]) for W in widths) + " |")

    line("bicubic PSNR-Y in the face box (dB)", lambda rs: f"{np.mean([r['bicubic'] for r in rs]):.2f}")
    line("**the rule**: restored - bicubic (dB)", lambda rs: f"**{np.mean([r['rule'] for r in rs]):+.2f}**")
    line("the rule, one pass (`--single-pass`)", lambda rs: f"{np.mean([r['single_pass'] for r in rs]):+.2f}")
    line("every face pasted as the model made it (before the rule)", lambda rs: f"{np.mean([r['plain'] for r in rs]):+.2f}")
    line("faces the rule restored, and the worst face (dB)", lambda rs: f"{sum(r['rule_decision'] == 'restored' for r in rs)}, "
                                                              f"{min(r['rule'] for r in rs):+.2f}")
    line(f"found (of {n}): infer (--min-face {MIN_FACE}, --min-prob {MIN_PROB:g}, enlarged)",
         lambda rs: str(sum(r["found"] for r in rs)))
    line(f"found (of {n}): MTCNN defaults", lambda rs: str(sum(r["found_mtcnn_defaults"] for r in rs)))
    line(f"found (of {n}): infer before (16 px, p >= 0.95)", lambda rs: str(sum(r["found_infer_before"] for r in rs)))
    neg = res.get("false_faces")
    if neg:
        lines += ["", f"False faces on {neg['photos']} photos without a face: infer {neg[f'infer_p{MIN_PROB:g}']} "
                      f"(p >= {MIN_PROB:g}; {neg['infer_p0.9']} at p >= 0.9), MTCNN defaults {neg['mtcnn_defaults']}, "
                      f"infer before {neg['infer_before']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, action="append", required=True, help="folder of photos (recursive); repeatable")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="output folder (holds shrunk photos: keep it out of the repo)")
    ap.add_argument("--limit", type=int, default=20, help="photos used")
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="face widths in px")
    ap.add_argument("--min-gt", type=int, default=120, help="smallest ground-truth face width in the original, px")
    ap.add_argument("--margin", type=float, default=0.52)
    ap.add_argument("--negatives", type=Path, help="folder of photos without a face: false faces counted")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    a.widths = [int(w) for w in a.widths.split(",")]
    repo = Path(__file__).resolve().parents[1]
    if a.out.resolve().is_relative_to(repo):
        ap.error(f"--out {a.out}: inside the repository; OUT holds photos cut from real faces, give a folder outside it")
    from refbuild.io import write_json

    res = run(a)
    md = (f"`model infer --detect --all-faces` with {res['checkpoint']} on {len(res['photos'])} photos shrunk so their face "
          f"is W px wide; PSNR-Y in the ground-truth face box at the original size, mean over the faces "
          f"(a missed face counts 0). {res['seconds']:.0f} s.\n\n" + table(res) + "\n")
    write_json(a.out / "realfaces.json", res)
    (a.out / "realfaces.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
