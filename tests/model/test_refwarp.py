"""model.refwarp: references bent onto the LR face before the search (the same-person control's path)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import create_model
from model.refwarp import register_refs, warp


def _face_like(seed: int, n: int = 1) -> torch.Tensor:
    """n, 3, 128, 128: smooth structure a 16 px view can see, plus fine detail it cannot."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=128, mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(n, 3, 32, 32, generator=g), size=128, mode="bilinear", align_corners=False)
    return (0.8 * coarse + 0.2 * fine).clamp(0, 1)


def _lr(hr: torch.Tensor) -> torch.Tensor:
    return F.interpolate(hr, size=16, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("grid", [4, 6])  # 6: msrnet2_warp_x8's
def test_a_bent_reference_is_bent_back_onto_the_lr(grid):
    """The reference is the HR itself under a smooth, known deformation (up to ~1.5 LR px): fitted from
    the 16 px LR alone, the field brings it back to within a fraction of a pixel of the HR, fine detail
    included (21.6 -> 36 dB at g = 4). Without the fit the reference stays 21.6 dB from the HR."""
    hr = _face_like(0, 4)
    field = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1)).mul(0.08).clamp(-0.18, 0.18)
    bent = warp(hr, field, "bilinear").unsqueeze(1)  # 4, 1, 3, 128, 128
    back = register_refs(_lr(hr), bent, grid=grid)[:, 0]
    before, after = _psnr(bent[:, 0], hr), _psnr(back, hr)
    assert after > before + 10, (before, after)


def test_masked_and_unfitted_references_come_back_as_they_were():
    """A slot the mask marks absent is not touched, whatever it holds; with no fitting step, every field
    stays zero and the zero warp is the identity; the LR's own HR (nothing to fix) is barely moved."""
    hr, other = _face_like(2, 2), _face_like(5, 2)
    refs = torch.stack([hr, other], dim=1)  # 2, 2, 3, 128, 128
    mask = torch.tensor([[True, False], [True, False]])
    out = register_refs(_lr(hr), refs, mask, grid=4)
    assert torch.equal(out[:, 1], refs[:, 1]) and torch.isfinite(out).all()
    assert _psnr(out[:, 0], hr) > 40
    torch.testing.assert_close(register_refs(_lr(hr), refs, iters=0), refs, atol=1e-5, rtol=0)
    moved = register_refs(_lr(hr), refs)  # unmasked: the other face is bent toward this LR
    assert not torch.allclose(moved[:, 1], refs[:, 1], atol=1e-3)


def test_the_warp_variant_uses_the_same_weights_and_bends_its_references():
    """msrnet2_warp_x8 loads msrnet2_align4_x8's parameters as they are; its output differs only through
    the references (with none, both models agree)."""
    torch.manual_seed(0)
    a, w = create_model("msrnet2_align4_x8").eval(), create_model("msrnet2_warp_x8").eval()
    w.load_state_dict(a.state_dict())
    hr = _face_like(3, 1)
    field = torch.full((1, 2, 2, 2), 0.1)
    refs = warp(hr, field, "bilinear").unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(w(_lr(hr)), a(_lr(hr)))
        assert not torch.allclose(w(_lr(hr), refs), a(_lr(hr), refs), atol=1e-4)
