"""SwinIR (lightweight), a reference-free baseline built from timm's Swin blocks.

Liang, Cao, Sun, Zhang, Van Gool, Timofte, "SwinIR: Image Restoration Using Swin
Transformer", ICCV workshops 2021: the lightweight SR setting (embed dim 60, four
residual Swin transformer blocks (RSTB) of depth 6, 6 heads, window 8, MLP ratio 2,
one-step pixel-shuffle upsampler). Each RSTB is a timm `SwinTransformerStage` (alternating
regular / shifted windows, relative position bias) followed by a 3x3 conv, with a
residual around it.

  shallow  conv 3 -> C on the (mean-subtracted) 16x16 LR
  deep     LayerNorm, RSTBs, LayerNorm, conv; + shallow (long skip)
  up       conv C -> 3 * scale^2, pixel shuffle (SwinIR's 'pixelshuffledirect'), + mean

It takes (lr, refs, ref_mask) like every registered model and ignores the references.
Shapes: B batch, C channels, h = w = 16.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerStage

from .msrnet import LR_SIZE, conv3x3
from .msrnet import checkpoint_filter_fn as _strip_prefixes
from .registry import register_model

__all__ = ["SwinIR", "RSTB"]

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean, as SwinIR subtracts it


class RSTB(nn.Module):
    """Residual Swin transformer block: x + conv(SwinStage(x)); B, H, W, C -> B, H, W, C."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float):
        super().__init__()
        self.swin = SwinTransformerStage(dim=dim, out_dim=dim, input_resolution=(LR_SIZE, LR_SIZE), depth=depth,
                                         downsample=False, num_heads=num_heads, window_size=window_size,
                                         mlp_ratio=mlp_ratio, dynamic_mask=True)
        self.conv = conv3x3(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.swin(x).permute(0, 3, 1, 2)  # B, C, H, W
        return x + self.conv(y).permute(0, 2, 3, 1)  # B, H, W, C


class SwinIR(nn.Module):
    """Lightweight SwinIR for 16x16 LR faces.

    Args:
        scale: 4, 8 or 16 (16 -> 16 * scale).
        in_chans: image channels.
        embed_dim: channels C.
        depths: Swin blocks per RSTB (one entry per RSTB).
        num_heads: attention heads (every RSTB).
        window_size: Swin window side (8 on the 16x16 LR: 2x2 windows).
        mlp_ratio: MLP hidden width / C.
    """

    use_refs = False  # takes references for a uniform signature and ignores them

    def __init__(self, scale: int = 8, in_chans: int = 3, embed_dim: int = 60, depths: tuple[int, ...] = (6, 6, 6, 6),
                 num_heads: int = 6, window_size: int = 8, mlp_ratio: float = 2.0):
        super().__init__()
        if scale not in (4, 8, 16):
            raise ValueError(f"scale must be 4, 8 or 16, got {scale}")
        self.scale, self.in_chans = scale, in_chans
        self.out_size = LR_SIZE * scale
        self.register_buffer("mean", torch.tensor(RGB_MEAN[:in_chans]).reshape(1, -1, 1, 1), persistent=False)
        self.conv_first = conv3x3(in_chans, embed_dim)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.layers = nn.Sequential(*[RSTB(embed_dim, d, num_heads, window_size, mlp_ratio) for d in depths])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = conv3x3(embed_dim, embed_dim)
        self.upsample = conv3x3(embed_dim, in_chans * scale * scale)

    def forward_features(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """lr: B, 3, 16, 16 (refs, ref_mask ignored) -> dict feat: B, C, 16, 16."""
        x = self.conv_first(lr - self.mean)  # B, C, h, w
        y = self.patch_norm(x.permute(0, 2, 3, 1))  # B, h, w, C
        y = self.norm(self.layers(y)).permute(0, 3, 1, 2)  # B, C, h, w
        return {"feat": self.conv_after_body(y) + x}

    def forward_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.pixel_shuffle(self.upsample(feats["feat"]), self.scale) + self.mean  # B, 3, S, S

    def forward(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B, 3, 16, 16 -> B, 3, 16*scale, 16*scale (not clamped)."""
        return self.forward_head(self.forward_features(lr, refs, ref_mask))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SwinIR) -> dict[str, torch.Tensor]:
    """Strip DataParallel / compile prefixes (the authors' weights use other names and do not load)."""
    return _strip_prefixes(state_dict, model)


def _cfg(scale: int, **kwargs: Any) -> dict[str, Any]:
    return {"input_size": (3, LR_SIZE, LR_SIZE), "output_size": (3, LR_SIZE * scale, LR_SIZE * scale),
            "num_refs": 0, "value_range": (0.0, 1.0), "degradation": "bicubic",
            "paper": "Liang et al., SwinIR: Image Restoration Using Swin Transformer, ICCVW 2021 (lightweight)",
            **kwargs}


_LIGHT: dict[str, Any] = dict(embed_dim=60, depths=(6, 6, 6, 6), num_heads=6, window_size=8, mlp_ratio=2.0)
_TINY: dict[str, Any] = dict(embed_dim=16, depths=(2,), num_heads=2, window_size=8, mlp_ratio=2.0)

default_cfgs: dict[str, dict[str, Any]] = {}


def _create(name: str, scale: int, base: dict[str, Any], **kwargs: Any) -> SwinIR:
    default_cfgs.setdefault(name, _cfg(scale))
    model = SwinIR(scale=scale, **{**base, **kwargs})
    model.default_cfg = default_cfgs[name]
    return model


@register_model
def swinir_light_x4(**kwargs: Any) -> SwinIR:
    """Lightweight SwinIR (C=60, 4 RSTBs of 6, window 8). 16 -> 64."""
    return _create("swinir_light_x4", 4, _LIGHT, **kwargs)


@register_model
def swinir_light_x8(**kwargs: Any) -> SwinIR:
    """Lightweight SwinIR (C=60, 4 RSTBs of 6, window 8). 16 -> 128."""
    return _create("swinir_light_x8", 8, _LIGHT, **kwargs)


@register_model
def swinir_light_x16(**kwargs: Any) -> SwinIR:
    """Lightweight SwinIR (C=60, 4 RSTBs of 6, window 8). 16 -> 256."""
    return _create("swinir_light_x16", 16, _LIGHT, **kwargs)


@register_model
def swinir_tiny_x8(**kwargs: Any) -> SwinIR:
    """C=16, one RSTB of 2 blocks: for tests and CPU smoke runs. 16 -> 128."""
    return _create("swinir_tiny_x8", 8, _TINY, **kwargs)
