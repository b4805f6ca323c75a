"""Metrics against known values and an independent float64 SSIM."""
from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import psnr, rgb_to_y, ssim


def test_psnr_of_known_mse():
    a = np.zeros((8, 8, 3))
    b = np.full((8, 8, 3), 10.0)  # MSE = 100
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr(a, a) == math.inf


def test_psnr_crop_border_ignores_border():
    a = np.zeros((10, 10, 3))
    b = a.copy()
    b[0] = 255
    assert psnr(a, b, crop_border=1) == math.inf
    assert psnr(a, b) < 20


def test_y_channel_bt601():
    assert rgb_to_y(np.array([[[0, 0, 0]]]))[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(np.array([[[255, 255, 255]]]))[0, 0] == pytest.approx(235.0)
    grey = np.full((6, 6, 3), 100.0)
    assert psnr(grey, grey + 10, test_y_channel=True) == pytest.approx(10 * math.log10(255**2 / (10 * 219 / 255) ** 2))


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct float64 SSIM: explicit 11x11 Gaussian window at every valid position."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_against_direct_implementation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    want = np.mean([_ssim_reference(a[..., c], b[..., c]) for c in range(3)])
    assert ssim(a, b) == pytest.approx(want, abs=1e-10)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    assert ssim(a, b, crop_border=2, test_y_channel=True) == pytest.approx(
        _ssim_reference(ya[2:-2, 2:-2], yb[2:-2, 2:-2]), abs=1e-10
    )
    assert ssim(a, a) == pytest.approx(1.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4, 3)), np.zeros((5, 4, 3)))


def test_literature_y_is_rounded_to_uint8():
    """MATLAB's rgb2ycbcr on uint8 rounds Y before the PSNR."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (12, 12, 3)).astype(np.float64)
    b = np.clip(a + rng.integers(-3, 4, a.shape), 0, 255)
    ya, yb = np.round(rgb_to_y(a)), np.round(rgb_to_y(b))
    expected = 10 * math.log10(255**2 / np.mean((ya - yb) ** 2))
    assert psnr(a, b, test_y_channel=True, y_uint8=True) == pytest.approx(expected)
    assert psnr(a, b, test_y_channel=True) != pytest.approx(expected)


def test_bicubic_row_is_matlab_style_not_torch():
    import torch
    import torch.nn.functional as F

    from model.metrics import bicubic_upsample

    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pil = bicubic_upsample(lr, 128)
    assert pil.shape == (128, 128, 3) and pil.dtype == np.uint8
    t = F.interpolate(torch.from_numpy(lr).permute(2, 0, 1)[None].float(), size=128, mode="bicubic",
                      align_corners=False)[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(pil.astype(int) - t.astype(int)).max() > 2  # a = -0.5 vs a = -0.75: different images
