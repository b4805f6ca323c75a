"""Face chips (refbuild/nets/chips.py): the similarity fit, the warp, and dlib's own chips of a synthetic image."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from refbuild.nets import chips


def _similarity(scale: float, angle: float, tx: float, ty: float) -> torch.Tensor:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[c, -s, tx], [s, c, ty]], dtype=torch.float64)


def test_similarity_fit_recovers_a_similarity():
    m = _similarity(0.7, 0.3, 12.0, -4.0)
    src = torch.rand(2, 5, 2, dtype=torch.float64) * 100
    dst = src @ m[:, :2].T + m[:, 2]
    fit = chips.similarity_fit(src, dst)
    assert torch.allclose(fit, m.expand(2, 2, 3), atol=1e-9)


def test_warp_puts_each_image_pixel_where_the_mapping_says():
    """A shift by whole pixels moves pixels exactly (pixel centres at integers, edges kept)."""
    img = torch.rand(1, 3, 40, 50)
    out = chips.warp_to_chip(img, _similarity(1.0, 0.0, -5.0, -7.0)[None], size=20)
    assert torch.allclose(out[0], img[0, :, 7:27, 5:25], atol=1e-5)


def test_aligned_chips_are_differentiable_and_scale_free():
    crops = (torch.rand(2, 3, 128, 128) * 255).requires_grad_()
    out = chips.chips_from_aligned(crops)
    assert out.shape == (2, 3, 150, 150)
    out.sum().backward()
    assert crops.grad is not None and crops.grad.abs().sum() > 0
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8) * 255, size=256, mode="bilinear")
    small = torch.nn.functional.interpolate(smooth, size=128, mode="bilinear", antialias=True)
    a, b = chips.chips_from_aligned(smooth), chips.chips_from_aligned(small)  # same crop at 256 and at 128
    assert (a - b).abs().mean() < 2.0


def test_dlib_chip_mapping_matches_dlibs_get_face_chip():
    """On a synthetic image (no photo): dlib's own chip and ours through dlib's mapping agree."""
    dlib = pytest.importorskip("dlib", reason="dlib not installed (pip install dlib-bin==20.0.1.post1): not checked")
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.uniform(0, 255, (1, 3, 50, 60)).astype(np.float32))
    img = torch.nn.functional.interpolate(base, size=(400, 480), mode="bicubic").clamp(0, 255).round()
    arr = np.ascontiguousarray(img[0].permute(1, 2, 0).numpy().astype(np.uint8))
    pts = [dlib.point(x, y) for x, y in ((270, 200), (250, 201), (180, 205), (200, 204), (225, 260))]
    det = dlib.full_object_detection(dlib.rectangle(150, 150, 300, 300), pts)
    # 150: bilinear straight from the image (0.76 chip px per image px): the same up to dlib's truncation
    # to whole grey levels (0.5 on average); 80: dlib first halves the image with its pyramid, whose
    # 5-tap filter and coordinates (about a quarter chip pixel off) differ from our resize
    for size, bound in ((150, 0.6), (80, 10.0)):
        cd = dlib.get_face_chip_details(det, size, 0.25)
        r = cd.rect
        m = chips.dlib_chip_mapping((r.left(), r.top(), r.right(), r.bottom()), cd.angle, cd.rows, cd.cols)
        ref = np.asarray(dlib.get_face_chip(arr, det, size, 0.25)).astype(np.float32)
        ours = chips.warp_to_chip(img, torch.from_numpy(m)[None], size)[0].permute(1, 2, 0).numpy()
        inner = (slice(3, -3), slice(3, -3))  # dlib zeroes a border half a pixel earlier than grid_sample
        err = np.abs(ours[inner] - ref[inner]).mean()
        assert err < bound, (size, err)
