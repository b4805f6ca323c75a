"""Patch matching (Eq. 4) and cross-scale transfer."""
from __future__ import annotations

import pytest
import torch

from model.matching import match_patches, normalized_patches, transfer


def _planted(seed=0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.randn(2, 8, 16, 16, generator=g)
    ref = torch.randn(2, 3, 8, 16, 16, generator=g)
    # LR patch centred at (3, 4) of sample 1 planted in ref 2 at centre (6, 10), scaled (cosine ignores scale)
    ref[1, 2, :, 5:8, 9:12] = 3.0 * lr[1, :, 2:5, 3:6]
    return lr, ref


@pytest.mark.parametrize("max_exact", [2**24, 0], ids=["exact", "coarse_to_fine"])
def test_matcher_finds_planted_patch(max_exact):
    lr, ref = _planted()
    idx, score = match_patches(lr, ref, max_exact=max_exact, block=4, radius=2)
    assert idx[1, 3, 4].item() == 2 * 256 + 6 * 16 + 10
    assert score[1, 0, 3, 4].item() == pytest.approx(1.0, abs=1e-5)


def test_exact_match_is_argmax_of_cosine():
    lr, ref = _planted(1)
    idx, score = match_patches(lr, ref)
    q = normalized_patches(lr)
    k = normalized_patches(ref.flatten(0, 1)).reshape(2, 3 * 256, -1)
    corr = q @ k.transpose(1, 2)
    torch.testing.assert_close(score.flatten(1), corr.max(-1).values)
    assert torch.equal(idx.flatten(1), corr.argmax(-1))


def test_mask_excludes_reference():
    lr, ref = _planted()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    idx, _ = match_patches(lr, ref, mask)
    assert (idx[1] // 256 != 2).all()


def test_transfer_maps_blocks_across_scales():
    B, M, C = 1, 2, 3
    idx = torch.zeros(B, 2, 2, dtype=torch.long)
    idx[0, 0, 1] = 1 * 4 + 3  # ref 0 at s=4 grid 2x2 -> position (1, 1) of ref 1
    fine = torch.arange(B * M * C * 8 * 8, dtype=torch.float32).reshape(B, M, C, 8, 8)
    out = transfer(fine, idx, 4)
    assert out.shape == (B, C, 8, 8)
    torch.testing.assert_close(out[0, :, 0:4, 4:8], fine[0, 1, :, 4:8, 4:8])
    torch.testing.assert_close(out[0, :, 4:8, 0:4], fine[0, 0, :, 0:4, 0:4])
    torch.testing.assert_close(transfer(fine[..., ::4, ::4].contiguous(), idx, 1), out[..., ::4, ::4])


def test_score_is_differentiable():
    lr, ref = _planted()
    lr.requires_grad_(True)
    _, score = match_patches(lr, ref)
    score.sum().backward()
    assert lr.grad is not None and lr.grad.abs().sum() > 0
