"""Image-quality metrics: pure numpy functions, no model imports.

Conventions (BasicSR's): images are HWC, RGB, float or uint8 in [0, 255];
`crop_border` pixels are removed from every side before measuring;
`test_y_channel=True` measures the BT.601 luma Y = 16 + (65.481 R + 128.553 G +
24.966 B) / 255 (range [16, 235]) instead of the three RGB channels.
The face-SR papers report Y with crop_border = scale; we also report RGB, no crop.

`y_uint8=True` is the face-SR literature's protocol (SPARNet, CTCNet, DIC: MATLAB's
`rgb2ycbcr` on uint8 images, which rounds Y to uint8), measured on the whole image.
"""
from __future__ import annotations

import numpy as np


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """HWC RGB in [0, 255] -> HW BT.601 luma in [16, 235], float64."""
    img = np.asarray(img, dtype=np.float64) / 255.0
    return img @ np.array([65.481, 128.553, 24.966]) + 16.0


def _prepare(img: np.ndarray, crop_border: int, test_y_channel: bool, y_uint8: bool = False) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {img.shape}")
    if test_y_channel:
        y = rgb_to_y(img)
        img = (np.round(y) if y_uint8 else y)[..., None]
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
    return img


def psnr(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, test_y_channel: bool = False,
         y_uint8: bool = False) -> float:
    """Peak signal-to-noise ratio in dB, peak 255.

    Args:
        img, ref: HWC RGB, [0, 255], same shape.
        crop_border: pixels cut from each side.
        test_y_channel: measure on BT.601 Y.
        y_uint8: round Y to integers first (MATLAB `rgb2ycbcr` on uint8).
    Returns:
        10 log10(255^2 / MSE); inf when the images are equal.
    """
    if img.shape != ref.shape:
        raise ValueError(f"shape mismatch {img.shape} vs {ref.shape}")
    a, b = _prepare(img, crop_border, test_y_channel, y_uint8), _prepare(ref, crop_border, test_y_channel, y_uint8)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D normalised Gaussian of odd `size`."""
    x = np.arange(size, dtype=np.float64) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of an HW array with the 1-D kernel k (both axes)."""
    n = k.size
    h, w = img.shape
    rows = sum(k[i] * img[i : h - n + 1 + i, :] for i in range(n))
    return sum(k[j] * rows[:, j : w - n + 1 + j] for j in range(n))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = gaussian_kernel(11, 1.5)
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    s_aa = _filter_valid(a * a, k) - mu_a**2
    s_bb = _filter_valid(b * b, k) - mu_b**2
    s_ab = _filter_valid(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2)
    return float(np.mean(num / den))


def ssim(img: np.ndarray, ref: np.ndarray, crop_border: int = 0, test_y_channel: bool = False,
         y_uint8: bool = False) -> float:
    """Structural similarity (Wang et al. 2004), mean over channels.

    11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, 'valid'
    filtering (no padding), as BasicSR's `calculate_ssim`.

    Args:
        img, ref: HWC RGB, [0, 255], same shape, at least 11x11 after cropping.
        crop_border: pixels cut from each side.
        test_y_channel: measure on BT.601 Y.
        y_uint8: round Y to integers first (MATLAB `rgb2ycbcr` on uint8).
    Returns:
        SSIM in [-1, 1]; 1 for equal images.
    """
    if img.shape != ref.shape:
        raise ValueError(f"shape mismatch {img.shape} vs {ref.shape}")
    a, b = _prepare(img, crop_border, test_y_channel, y_uint8), _prepare(ref, crop_border, test_y_channel, y_uint8)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[2])]))


def tensor_to_uint8(x) -> np.ndarray:
    """3, H, W torch tensor in [0, 1] -> HWC uint8 (rounded, clipped)."""
    return (x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def bicubic_upsample(lr: np.ndarray, size: int) -> np.ndarray:
    """HWC uint8 LR -> size x size uint8, MATLAB-style bicubic (PIL: a = -0.5, antialiased),
    the face-SR literature's bicubic row (torch's `F.interpolate` uses a = -0.75)."""
    from PIL import Image

    return np.array(Image.fromarray(np.asarray(lr, dtype=np.uint8)).resize((size, size), Image.BICUBIC))
