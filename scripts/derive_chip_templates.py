"""Measure the two chip templates of `refbuild/nets/chips.py` from dlib's own chips of real photos.

    python scripts/derive_chip_templates.py [--faces ../shared/faces] [--n 800] [--out chip_templates.json]

Needs dlib (`pip install dlib-bin==20.0.1.post1`, the dev extra) and face_recognition_models (its
5-point shape predictor). For `--n` celeba_facecrops photos of identities with an even number (the
odd ones stay held out for the embed AUC), each photo gets dlib's frontal detector (upsampled once),
`shape_predictor_5_face_landmarks` and `get_face_chip_details(150, 0.25)`: dlib's photo->chip
mapping (`chips.dlib_chip_mapping`). MTCNN (`refbuild.detector.Detector`) runs on the same photos;
the face it finds whose box overlaps dlib's most (IoU > 0.3) is kept.

- MTCNN template: the per-coordinate median of MTCNN's 5 points mapped into dlib's chips.
- aligned-crop template: each mapping re-expressed from photo pixels to fractions of the photo's
  aligned crop (the centred square, as `refbuild detect --aligned` cuts it), reduced to the
  similarity (a, b, tx, ty); the per-parameter median.

It prints both (paste them into chips.py) and how well they reproduce dlib's chips: the mean
distance, in chip pixels, between dlib's chip corners and the template's, per face; and the
cosine between the recogniser's descriptors of dlib's chip and of the template's chip.
No image or crop is written.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from refbuild.detect import crop_face  # noqa: E402
from refbuild.nets import chips  # noqa: E402
from refbuild.nets.dlib_resnet import load_recogniser, recogniser_weights_path  # noqa: E402


def photos(faces: Path, n: int, parity: int) -> list[tuple[Path, str]]:
    with open(faces / "celeba_facecrops" / "labels.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["celeba_identity"]) % 2 == parity]
    rows.sort(key=lambda r: r["path"])
    step = max(1, len(rows) // n)
    return [(faces / "celeba_facecrops" / r["path"], r["celeba_identity"]) for r in rows[::step][:n]]


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def measure(items: list[tuple[Path, str]]) -> list[dict]:
    import dlib

    from refbuild.detector import Detector

    sp_path = str(recogniser_weights_path().with_name("shape_predictor_5_face_landmarks.dat"))
    det, sp = dlib.get_frontal_face_detector(), dlib.shape_predictor(sp_path)
    mtcnn = Detector("cpu", min_face=20)
    out = []
    for path, ident in items:
        img = Image.open(path).convert("RGB")
        arr = np.array(img)
        found = det(arr, 1)
        if not found:
            continue
        d = max(found, key=lambda r: r.area())
        shape = sp(arr, d)
        cd = dlib.get_face_chip_details(shape, chips.CHIP_SIZE, chips.CHIP_PADDING)
        r = cd.rect
        m = chips.dlib_chip_mapping((r.left(), r.top(), r.right(), r.bottom()), cd.angle, cd.rows, cd.cols)
        faces = mtcnn.detect([img])[0]
        if isinstance(faces, Exception) or len(faces) == 0:
            continue
        box = (d.left(), d.top(), d.right(), d.bottom())
        best = max(range(len(faces)), key=lambda i: iou(faces.boxes[i], box))
        if iou(faces.boxes[best], box) < 0.3:
            continue
        lm = faces.landmarks[best].astype(np.float64)  # 5, 2 photo pixels
        lm_chip = (m[:, :2] @ lm.T).T + m[:, 2]
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # crop fraction u -> photo pixel x = left + u * side - 0.5 (edges kept by the resize)
        a_frac = m[:, :2] * side
        t_frac = m[:, :2] @ np.array([left - 0.5, top - 0.5]) + m[:, 2]
        out.append({"path": str(path), "identity": ident, "mapping": m, "lm": lm, "lm_chip": lm_chip,
                    "sim": (float((a_frac[0, 0] + a_frac[1, 1]) / 2), float((a_frac[1, 0] - a_frac[0, 1]) / 2),
                            float(t_frac[0]), float(t_frac[1])),
                    "crop": (left, top, side), "chip": np.asarray(dlib.get_face_chip(arr, shape, 150, 0.25))})
    return out


def corner_error(m_true: np.ndarray, m_est: np.ndarray) -> float:
    """Mean distance in chip pixels between where the two mappings put the chip's corners."""
    corners = np.array([[0, 0], [149, 0], [149, 149], [0, 149]], dtype=np.float64)
    inv_true = np.linalg.inv(np.r_[m_true, [[0, 0, 1]]])
    src = (inv_true[:2, :2] @ corners.T).T + inv_true[:2, 2]  # chip corners in photo pixels
    est = (m_est[:, :2] @ src.T).T + m_est[:, 2]
    return float(np.linalg.norm(est - corners, axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "faces")
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    a = ap.parse_args()
    torch.set_num_threads(1)
    fit = measure(photos(a.faces, a.n, parity=0))
    rows = measure(photos(a.faces, a.n // 4, parity=1))  # the templates are checked on other people
    mt = np.median(np.stack([r["lm_chip"] for r in fit]), axis=0)
    sim = np.median(np.array([r["sim"] for r in fit]), axis=0)
    print(f"faces found by dlib and MTCNN: {len(fit)} (fit), {len(rows)} (held out)")
    print("MTCNN_TEMPLATE =", tuple(tuple(round(float(v), 2) for v in p) for p in mt))
    print("ALIGNED_CROP_TEMPLATE =", tuple(round(float(v), 3) for v in sim))
    # how well each template reproduces dlib's own chips of these photos
    net = load_recogniser("cpu")
    err_m, err_a, cos_m, cos_a = [], [], [], []
    for r in rows:
        m_mt = chips.similarity_fit(torch.tensor(r["lm"][None]), torch.tensor(mt))[0].numpy()
        err_m.append(corner_error(r["mapping"], m_mt))
        a_, b_, tx, ty = sim
        left, top, side = r["crop"]
        rot = np.array([[a_, -b_], [b_, a_]]) / side
        m_al = np.c_[rot, rot @ np.array([0.5 - left, 0.5 - top]) + np.array([tx, ty])]
        err_a.append(corner_error(r["mapping"], m_al))
    for i in range(0, len(rows), 32):
        part = rows[i : i + 32]
        imgs = [torch.from_numpy(np.array(Image.open(r["path"]).convert("RGB"))).permute(2, 0, 1).float()
                for r in part]
        dchips = torch.from_numpy(np.stack([r["chip"] for r in part])).permute(0, 3, 1, 2).float()
        mchips = torch.cat([chips.chips_from_landmarks(im[None], torch.tensor(r["lm"][None]), template=mt)
                            for im, r in zip(imgs, part)])
        achips = []
        for im, r in zip(imgs, part):
            left, top, side = r["crop"]
            crop = crop_face(Image.open(r["path"]).convert("RGB"), (left, top, left + side, top + side), 128)
            crop = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float()  # as `detect --aligned --crop-size 128`
            achips.append(chips.chips_from_aligned(crop, template=tuple(sim)))
        with torch.no_grad():
            ed, em, ea = net(dchips), net(mchips), net(torch.cat(achips))
        cos_m += torch.nn.functional.cosine_similarity(ed, em).tolist()
        cos_a += torch.nn.functional.cosine_similarity(ed, ea).tolist()
    figs = {"faces_fit": len(fit), "faces_held_out": len(rows), "mtcnn_template": mt.tolist(),
            "aligned_crop_template": sim.tolist(),
            "mtcnn_corner_err_px_median": float(np.median(err_m)),
            "aligned_corner_err_px_median": float(np.median(err_a)),
            "mtcnn_cos_vs_dlib_chip_median": float(np.median(cos_m)),
            "mtcnn_cos_vs_dlib_chip_p10": float(np.percentile(cos_m, 10)),
            "aligned_cos_vs_dlib_chip_median": float(np.median(cos_a)),
            "aligned_cos_vs_dlib_chip_p10": float(np.percentile(cos_a, 10))}
    print(json.dumps(figs, indent=1))
    if a.out:
        a.out.write_text(json.dumps(figs, indent=1))


if __name__ == "__main__":
    main()
