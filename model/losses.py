"""Training losses: pure functions of tensors (no module state, no config objects)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sr_loss(sr: torch.Tensor, hr: torch.Tensor, sr1: torch.Tensor | None = None,
            stage1_weight: float = 0.0) -> torch.Tensor:
    """The training loss: L1(I_SR, HR), plus `stage1_weight` x L1(I_SR^1, HR bicubic-downscaled
    to I_SR^1's side, antialiased) when the weight is positive and the model gave `sr1` (x16's stage 1).

    Args:
        sr: B, 3, S, S model output (any float dtype: the L1 is taken in float32).
        hr: B, 3, S, S target in [0, 1], float32.
        sr1: B, 3, T, T stage-1 output, or None.
    Returns:
        A scalar tensor (mean absolute error).
    """
    loss = F.l1_loss(sr.float(), hr)
    if stage1_weight > 0 and sr1 is not None:
        hr1 = F.interpolate(hr, size=sr1.shape[-1], mode="bicubic", align_corners=False, antialias=True)
        loss = loss + stage1_weight * F.l1_loss(sr1.float(), hr1)
    return loss


class IdentityLoss:
    """1 - cos between the frozen recogniser's embeddings of SR and HR (as GFPGAN trains with ArcFace).

    Both go through the same differentiable chip (the fixed template for aligned crops), the HR
    without gradient. A callable holding a frozen network, not a pure function: built once per run."""

    def __init__(self, device: torch.device):
        from refbuild.nets.chips import chips_from_aligned
        from refbuild.nets.dlib_resnet import load_recogniser

        self.net = load_recogniser(device)  # eval, frozen
        self.chips = chips_from_aligned

    def __call__(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """sr, hr: B, 3, S, S in [0, 1] -> scalar mean(1 - cos(e_sr, e_hr))."""
        with torch.no_grad():
            e_hr = self.net(self.chips(hr.float() * 255))  # B, 128
        e_sr = self.net(self.chips(sr.float().clamp(0, 1) * 255))  # B, 128
        return (1 - F.cosine_similarity(e_sr.float(), e_hr.float(), dim=1)).mean()
