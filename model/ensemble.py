"""Self-ensemble at test time (EDSR+, Lim et al. 2017): the mean of the model's output on a face and on
its mirror image, mirrored back. Faces are mirror-symmetric in distribution (training flips them), so
the two passes are equally good guesses whose errors partly cancel; rotations are not used (the
model never sees upside-down faces). Twice the compute; docs/DESIGN.md "Self-ensemble" has the figures."""
from __future__ import annotations

import torch
import torch.nn as nn


def super_resolve(model: nn.Module, lr: torch.Tensor, refs: torch.Tensor, mask: torch.Tensor,
                  self_ensemble: bool = False) -> torch.Tensor:
    """SR of a batch: lr (B, 3, h, w), refs (B, M, 3, H, W), mask (B, M) -> (B, 3, H, W) float.

    self_ensemble: also run the mirrored LR with mirrored references and average (x2 flip)."""
    sr = model(lr, refs, mask).float()
    if not self_ensemble:
        return sr
    mirrored = model(lr.flip(-1), refs.flip(-1), mask).float().flip(-1)  # B, 3, H, W, back the right way
    return (sr + mirrored) / 2
