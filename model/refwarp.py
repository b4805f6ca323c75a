"""Reference registration: warp each reference onto the LR face before matching.

docs/DESIGN.md "MSRNet2" (warped references).

Aligned crops put the eyes of every face at the same place, but another photo of a face still
differs from it by pose and expression: the mouth opens, the head turns, the chin moves. The
attention (msrnet2.py) searches whole cells, and copies moved by fractions of a cell; it cannot
bend a reference. This module does, before the search: for each reference, a smooth displacement
field (`grid` x `grid` control points, interpolated bicubically over the face) is fitted so that
the warped reference, seen as the LR is (shrunk to 16 x 16), looks like the LR, then the field is
applied to the sharp reference. Only the LR is used (what inference has), in luma with each image's
mean and contrast removed (other photos differ in light), by a few Adam steps on the field.

Why our own: the flow networks of reference-based SR (C2-Matching's, DATSR's) are trained on
natural images at far larger sizes; at 16 px a learned flow has nothing to learn from, and a field of g x g
control points per axis (6 x 6 in `msrnet2_warp_x8`) fitted per pair is cheap (every reference of a
batch at once), deterministic on CPU and has no weights to ship.

Measured (RESULTS.md 0.5): the warped references hold more of the HR's detail, but the model
takes less from them; `msrnet2_warp_x8` stays an experiment variant and no shipped model warps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fit_fields", "register_refs", "warp"]

_LUMA = (0.299, 0.587, 0.114)


def _normalised_luma(x: torch.Tensor) -> torch.Tensor:
    """N, 3, h, w in [0, 1] -> N, 1, h, w luma with zero mean and unit std per image."""
    y = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (y - y.mean((2, 3), keepdim=True)) / (y.std((2, 3), keepdim=True) + 1e-3)


def warp(images: torch.Tensor, field: torch.Tensor, mode: str = "bicubic") -> torch.Tensor:
    """Sample `images` (N, C, S, S) at identity + `field` (N, 2, g, g control displacements, x then y,
    in normalised coordinates: 2 = the image side), interpolated over the image; edges repeated."""
    N, _, S, _ = images.shape
    flow = F.interpolate(field, size=(S, S), mode="bicubic", align_corners=True)  # N, 2, S, S
    axis = (torch.arange(S, device=images.device, dtype=images.dtype) * 2 + 1) / S - 1  # pixel centres
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack((gx, gy), dim=-1).unsqueeze(0) + flow.permute(0, 2, 3, 1)  # N, S, S, 2
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def fit_fields(
    lr: torch.Tensor, refs: torch.Tensor, grid: int = 4, iters: int = 40, step: float = 0.01,
    max_shift: float = 0.25, size: int = 32,
) -> torch.Tensor:
    """Displacement fields that bend each reference onto its LR face (the fit; `register_refs` applies it).

    lr: N, 3, h, h in [0, 1]; refs: N, 3, S, S in [0, 1] (reference n belongs to LR n).
    Returns N, 2, grid, grid: the field (in `warp`'s units) whose warped reference, seen at h x h,
    is closest to the LR among the Adam iterates, the zero field (the reference as it came) included.
    """
    h = lr.shape[-1]
    small = F.interpolate(refs, size=(size, size), mode="bilinear", align_corners=False, antialias=True)  # N, 3, size, size
    target = _normalised_luma(lr)  # N, 1, h, h

    def loss_of(field: torch.Tensor) -> torch.Tensor:  # N
        seen = F.adaptive_avg_pool2d(warp(small, field, "bilinear"), h)  # N, 3, h, h: the reference as the LR sees it
        return (_normalised_luma(seen) - target).abs().mean((1, 2, 3))

    field = torch.zeros(refs.shape[0], 2, grid, grid, device=refs.device, requires_grad=True)
    opt = torch.optim.Adam([field], lr=step)
    best = torch.zeros_like(field, requires_grad=False)
    best_loss = torch.full((refs.shape[0],), float("inf"), device=refs.device)
    def keep_best(loss: torch.Tensor) -> None:
        better = loss < best_loss
        best[better], best_loss[better] = field.detach()[better], loss.detach()[better]

    for _ in range(iters):  # iterate 0 scores the unwarped reference: a fit must beat it
        loss = loss_of(field)
        keep_best(loss)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            field.clamp_(-max_shift, max_shift)
    with torch.no_grad():  # the last iterate, scored without a graph
        keep_best(loss_of(field))
    return best


def register_refs(
    lr: torch.Tensor, refs: torch.Tensor, ref_mask: torch.Tensor | None = None, grid: int = 4, iters: int = 40,
    step: float = 0.01, max_shift: float = 0.25, size: int = 32,
) -> torch.Tensor:
    """Warp every reference onto its LR face.

    Args:
        lr: B, 3, h, w LR faces in [0, 1] (h = w = 16).
        refs: B, M, 3, S, S references in [0, 1] (any S >= size).
        ref_mask: B, M bool, the references that are real (others are returned as they came, unfitted).
        grid: control points per side of each displacement field (2 * grid^2 parameters).
        iters: Adam steps per field.
        step: Adam learning rate, in normalised coordinates (0.125 = one LR pixel).
        max_shift: the largest displacement at a control point, normalised (0.25 = two LR pixels).
        size: the side at which a reference is warped while fitting (then shrunk to h by area).
    Returns:
        B, M, 3, S, S in [0, 1]: each reference resampled by its field; a reference the fit does
        not bring closer to the LR is returned as it came (its field stays zero).
    """
    B, M, C, S, _ = refs.shape
    keep = torch.ones(B, M, dtype=torch.bool, device=refs.device) if ref_mask is None else ref_mask.bool()
    out = refs.clone()
    if not keep.any():
        return out
    b_idx, m_idx = keep.nonzero(as_tuple=True)  # the real references, K of them
    with torch.enable_grad(), torch.autocast(lr.device.type, enabled=False):
        picked = refs.detach().float()[b_idx, m_idx]  # K, 3, S, S
        field = fit_fields(lr.detach().float()[b_idx], picked, grid, iters, step, max_shift, size)  # K, 2, g, g
        with torch.no_grad():
            out[b_idx, m_idx] = warp(picked, field).clamp(0, 1).to(refs.dtype)  # K, 3, S, S
    return out
