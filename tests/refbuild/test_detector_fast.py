"""refbuild/nets/mtcnn.py (our MTCNN cascade) against facenet-pytorch's `detect_face`, same weights."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refbuild.nets import mtcnn

THRESHOLDS, FACTOR, MINSIZE = (0.6, 0.7, 0.7), 0.709, 40


@pytest.fixture(scope="module")
def nets():
    return mtcnn.load_nets("cpu")


@pytest.fixture(scope="module")
def facenet_nets():
    fm = pytest.importorskip("facenet_pytorch.models.mtcnn")
    return tuple(n().eval() for n in (fm.PNet, fm.RNet, fm.ONet))


def _facenet(arr: np.ndarray, nets) -> np.ndarray:
    from facenet_pytorch.models.utils.detect_face import detect_face

    with torch.no_grad():
        boxes, _ = detect_face(torch.from_numpy(arr[None].copy()), MINSIZE, *nets, list(THRESHOLDS), FACTOR, "cpu")
    return np.asarray(boxes[0], np.float32).reshape(-1, 5)


def _ours(arr: np.ndarray, nets) -> np.ndarray:
    boxes, points = mtcnn.detect_faces(torch.from_numpy(arr[None].copy()), MINSIZE, nets, THRESHOLDS, FACTOR)
    assert points[0].shape == (len(boxes[0]), 5, 2)
    return boxes[0]


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, (ours, ref)
    if len(ref):
        assert np.abs(ours[:, :4] - ref[:, :4]).max() <= 1.0
        assert np.abs(ours[:, 4] - ref[:, 4]).max() <= 1e-4


@pytest.mark.parametrize("k,s,n", [(2, 2, 9), (2, 2, 10), (3, 2, 22), (3, 2, 21), (3, 2, 10), (2, 2, 3)])
def test_max_pool_ceil_matches_torch(k, s, n):
    x = torch.randn(2, 5, n, n + 1)
    assert torch.equal(mtcnn.max_pool_ceil(x, k, s), F.max_pool2d(x, k, s, ceil_mode=True))


def test_nets_match_facenet(nets, facenet_nets):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        for ours, ref, inp in zip(nets, facenet_nets, (torch.randn(2, 3, 37, 53), torch.randn(4, 3, 24, 24), x)):
            out, want = ours(inp), ref(inp)
            probs = want[-1][:, 1] if want[-1].dim() == 2 else want[-1][:, 1]
            assert torch.allclose(out[-1], probs, atol=1e-6)
            assert torch.allclose(out[0], want[0], atol=1e-6)


def test_nms_matches_torchvision():
    tv = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=g) * 30], 1)
    scores = torch.rand(300, generator=g)
    scores[:40] = 1.0  # ties, as saturated PNet/ONet probabilities
    idxs = torch.randint(0, 3, (300,), generator=g)
    for t in (0.5, 0.7):
        assert torch.equal(mtcnn.nms(boxes, scores, t), tv.nms(boxes, scores, t))
        assert torch.equal(mtcnn.batched_nms(boxes, scores, idxs, t), tv.batched_nms(boxes, scores, idxs, t))
    big = boxes.repeat(5, 1) + torch.rand(1500, 4, generator=g)  # > 1,000 boxes: torchvision's per-index loop
    s2, i2 = torch.rand(1500, generator=g), torch.randint(0, 3, (1500,), generator=g)
    assert torch.equal(mtcnn.batched_nms(big, s2, i2, 0.7), tv.batched_nms(big, s2, i2, 0.7))


def test_synthetic_image_matches_facenet(nets, facenet_nets):
    """A drawn, face-like pattern plus noise: whatever the cascade finds, it must agree within 1 px."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:180, :240]
    face = ((yy - 90) / 60) ** 2 + ((xx - 120) / 45) ** 2 < 1
    img[face] = (220, 180, 150)
    for cy, cx in ((75, 100), (75, 140)):  # eyes
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (30, 30, 30)
    img[(abs(yy - 120) < 4) & (abs(xx - 120) < 18)] = (120, 40, 40)  # mouth
    _assert_close(_ours(img, nets), _facenet(img, facenet_nets))


@pytest.mark.realdata
def test_real_photos_match_facenet(real_faces, nets, facenet_nets):
    """Real in-the-wild photos (a spread of sizes): same face count, boxes within 1 px."""
    from PIL import Image, ImageOps

    root = real_faces / "celeba_wild_identity"
    with open(real_faces / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["set"] == "celeba_wild_identity" and max(int(r["width"]), int(r["height"])) <= 1024]
    rows.sort(key=lambda r: r["path"])
    picked = rows[:: max(1, len(rows) // 12)][:12]
    found = 0
    for r in picked:
        with Image.open(root / r["path"]) as im:
            arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        ref = _facenet(arr, facenet_nets)
        _assert_close(_ours(arr, nets), ref)
        found += len(ref)
    assert found > 0, "no face found on any real photo: the comparison proved nothing"
