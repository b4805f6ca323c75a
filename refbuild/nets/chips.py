"""Face chips for the recogniser: 150x150 crops laid out as dlib's `get_face_chip(img, shape, 150, 0.25)`.

dlib cuts a chip with a similarity transform from its 5-point landmarks (eye corners, base of the
nose) onto a mean-face layout with 25% padding, bilinear, zero outside the image. We have other
landmarks or none, so two templates stand in for dlib's landmarks:

- `MTCNN_TEMPLATE`: where MTCNN's 5 points (eye centres, nose tip, mouth corners, as
  `refbuild.detector.Detector` gives them) land in dlib's chip. A photo's chip is the least-squares
  similarity from its MTCNN points onto these (`chips_from_landmarks`).
- `ALIGNED_CROP_TEMPLATE`: one fixed similarity from an aligned square crop (the library's
  `refbuild detect --aligned` crops, and the model's SR outputs, which share their framing) onto the
  chip, in crop fractions so any crop side works (`chips_from_aligned`).

Both were measured, not guessed (`scripts/derive_chip_templates.py`, which needs dlib): on 800
celeba_facecrops photos (identities whose number is even; the odd ones are held out for the
embed AUC) dlib's frontal detector + `shape_predictor_5_face_landmarks` + `get_face_chip_details(150,
0.25)` gave each photo's photo->chip mapping (`dlib_chip_mapping`, dlib's `get_mapping_to_chip`);
MTCNN ran on the same photos. `MTCNN_TEMPLATE` is the per-coordinate median of MTCNN's points
mapped into the chips (798 faces found by both); `ALIGNED_CROP_TEMPLATE` is the per-parameter
median of the mappings re-expressed from the photo to its aligned crop (the centred square,
`refbuild.detect`). Their fit is stated in docs/DESIGN.md ("The recogniser").

Coordinates: pixel centres at integers (dlib's); crop fractions run 0..1 over pixel edges. The
warps use `affine_grid`/`grid_sample`, so a loss can backpropagate through a chip to the image.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150
CHIP_PADDING = 0.25

# MTCNN's points in dlib's 150x150 chip (x, y pixels): left eye, right eye (as seen), nose tip,
# mouth left, mouth right. Per-coordinate median over 798 celeba_facecrops faces (even identities)
# of MTCNN's points mapped through dlib's own chip mapping (scripts/derive_chip_templates.py, --n 800).
# On 199 faces of held-out identities, chips cut through it give descriptors at cosine 0.9963 (median;
# 10th percentile 0.9908) to those of dlib's chips of the same photos.
MTCNN_TEMPLATE = (
    (47.76, 45.64), (101.86, 45.61), (74.52, 79.25), (50.59, 102.19), (99.28, 102.02),
)
# Aligned crop -> chip: chip_xy = [[a, -b], [b, a]] @ (u, v) + (tx, ty), (u, v) the crop fraction 0..1
# (pixel edges). Per-parameter median over the same 798 faces' dlib mappings, re-expressed from the
# photo to its `detect --aligned` crop (the centred square). Held out (199 faces, 128 px crops):
# descriptors at cosine 0.9940 (median; 10th percentile 0.9869) to those of dlib's chips of the photos.
ALIGNED_CROP_TEMPLATE = (237.241, -1.457, -45.345, -58.481)  # a, b, tx, ty


def _rotate(center: tuple[float, float], p: tuple[float, float], angle: float) -> tuple[float, float]:
    x, y = p[0] - center[0], p[1] - center[1]
    c, s = math.cos(angle), math.sin(angle)
    return c * x - s * y + center[0], s * x + c * y + center[1]


def dlib_chip_mapping(rect: tuple[float, float, float, float], angle: float, rows: int = CHIP_SIZE,
                      cols: int = CHIP_SIZE) -> np.ndarray:
    """dlib's `get_mapping_to_chip(chip_details)`: 2, 3 from image pixels to chip pixels.

    rect: the chip_details' (left, top, right, bottom); angle: its rotation (radians). The rect's
    top-left, top-right and bottom-right corners, rotated by `angle` about its centre, go to the
    chip's corners (0, 0), (cols-1, 0), (cols-1, rows-1).
    """
    left, top, right, bottom = rect
    center = ((left + right) / 2, (top + bottom) / 2)
    src = np.array([_rotate(center, p, angle) for p in ((left, top), (right, top), (right, bottom))])
    dst = np.array([[0, 0], [cols - 1, 0], [cols - 1, rows - 1]], dtype=np.float64)
    return np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # chip = M @ [x, y, 1]


def similarity_fit(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) taking `src` onto `dst`.

    src: B, N, 2 points; dst: N, 2 or B, N, 2. Returns B, 2, 3 with dst ~ M @ [x, y, 1]. Closed form:
    with centred points, [a, b] = sum(x*x' + y*y', x*y' - y*x') / sum(x^2 + y^2) and the matrix
    [[a, -b], [b, a]]; differentiable in both arguments.
    """
    dst = dst.to(src).expand_as(src)
    ms, md = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - ms, dst - md  # B, N, 2
    norm = (s * s).sum((1, 2))  # B
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(1) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # B, 2, 2
    shift = md.squeeze(1) - (rot @ ms.squeeze(1).unsqueeze(-1)).squeeze(-1)  # B, 2
    return torch.cat([rot, shift.unsqueeze(-1)], -1)


def _homog(m: torch.Tensor) -> torch.Tensor:
    """B, 2, 3 -> B, 3, 3."""
    last = torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype, device=m.device).expand(m.shape[0], 1, 3)
    return torch.cat([m, last], 1)


def warp_to_chip(images: torch.Tensor, to_chip: torch.Tensor, size: int = CHIP_SIZE) -> torch.Tensor:
    """Cut chips: images B, C, H, W (float) and to_chip B, 2, 3 (image pixels -> chip pixels) ->
    B, C, size, size. Bilinear, zero outside the image, as dlib's `extract_image_chip`. Like dlib, which
    bilinearly samples from the level of an image pyramid (halvings) where the chip shrinks the image
    by less than 2, an image the chip shrinks more than 2x is first halved as often (one antialiased
    resize here, dlib's 5-tap pyramid filter there; for the batch's largest face).
    Differentiable in `images` and `to_chip`.
    """
    B, C, H, W = images.shape
    m = _homog(to_chip.to(torch.float64))  # B, 3, 3
    scale = torch.sqrt(torch.abs(torch.linalg.det(m[:, :2, :2]))).max().item()  # chip px per image px (largest)
    halvings = 0
    while scale * 2**halvings < 0.5:  # dlib: the pyramid level after which bilinear shrinks by less than 2
        halvings += 1
    if halvings:  # shrink the whole batch by 2**halvings, antialiased (dlib: pyramid_down<2> per level)
        h, w = max(1, round(H / 2**halvings)), max(1, round(W / 2**halvings))
        images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        # a resize that keeps pixel edges: x' = (x + 0.5) * w / W - 0.5
        sx, sy = w / W, h / H
        back = torch.tensor([[1 / sx, 0, 0.5 / sx - 0.5], [0, 1 / sy, 0.5 / sy - 0.5], [0, 0, 1]],
                            dtype=m.dtype, device=m.device)
        m = m @ back
        H, W = h, w
    inv = torch.linalg.inv(m)  # chip pixels -> image pixels
    # affine_grid (align_corners=False) speaks in normalised coordinates: n = (2x + 1) / W - 1
    out_to_pix = torch.tensor([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]],
                              dtype=m.dtype, device=m.device)
    pix_to_in = torch.tensor([[2 / W, 0, 1 / W - 1], [0, 2 / H, 1 / H - 1], [0, 0, 1]], dtype=m.dtype, device=m.device)
    theta = (pix_to_in @ inv @ out_to_pix)[:, :2].to(images.dtype if images.is_floating_point() else torch.float32)
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)  # B, size, size, 2
    return F.grid_sample(images.float() if not images.is_floating_point() else images, grid.to(images.dtype),
                         mode="bilinear", padding_mode="zeros", align_corners=False)


def chips_from_landmarks(images: torch.Tensor, landmarks: torch.Tensor, size: int = CHIP_SIZE,
                         template: tuple | np.ndarray = MTCNN_TEMPLATE) -> torch.Tensor:
    """Photos B, 3, H, W (RGB 0..255 float) and their MTCNN points B, 5, 2 (pixels) -> B, 3, size, size
    chips: the similarity from each face's 5 points onto `template` (5, 2 chip pixels at 150). For
    several faces of one photo, repeat (expand) the photo along B."""
    template = torch.as_tensor(np.asarray(template, np.float64), device=images.device) * (size / CHIP_SIZE)
    return warp_to_chip(images, similarity_fit(landmarks.to(torch.float64), template), size)


def aligned_crop_mapping(side: int, size: int = CHIP_SIZE,
                         template: tuple = ALIGNED_CROP_TEMPLATE) -> torch.Tensor:
    """`template` (a, b, tx, ty) for a side x side crop: 2, 3 from crop pixels to chip pixels."""
    a, b, tx, ty = (float(v) for v in template)
    k = size / CHIP_SIZE
    rot = torch.tensor([[a, -b], [b, a]], dtype=torch.float64) * k / side  # per crop pixel
    shift = torch.tensor([tx, ty], dtype=torch.float64) * k + rot @ torch.tensor([0.5, 0.5], dtype=torch.float64)
    return torch.cat([rot, shift.view(2, 1)], 1)  # chip = rot @ (x, y) + shift, x = u * side - 0.5


def chips_from_aligned(crops: torch.Tensor, size: int = CHIP_SIZE,
                       template: tuple = ALIGNED_CROP_TEMPLATE) -> torch.Tensor:
    """Aligned square crops B, 3, S, S (RGB 0..255 float) -> B, 3, size, size chips through the fixed
    `ALIGNED_CROP_TEMPLATE`. Differentiable: a training loss can backpropagate through it."""
    B, _, H, W = crops.shape
    if H != W:
        raise ValueError(f"aligned crops are square; got {H}x{W}")
    m = aligned_crop_mapping(W, size, template).to(crops.device).expand(B, 2, 3)
    return warp_to_chip(crops, m, size)
