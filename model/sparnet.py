"""SPARNet: face super-resolution with spatial attention, a reference-free baseline.

Chen, Gong, Wang, Li, Wong, "Learning Spatial Attention for Face Super-Resolution",
IEEE TIP 2020 (arXiv 2012.01211). Our implementation from the paper, for Table 1 of
the MSRNet comparison (docs/DESIGN.md, "Baselines").

  input    the 16x16 LR, bicubic-upsampled to the output size (the paper's setting:
           16 -> 128 upsampled first, then a 128 -> 128 network)
  encoder  conv, then FAUs that halve the size down to 16x16 (channels doubled,
           clipped to [min_ch, max_ch])
  body     FAUs at 16x16 (res_depth + 3 - down_steps of them: 10 for x8)
  decoder  FAUs that double the size back up (nearest x2 + conv), channels halved
  tail     conv to RGB (no global residual, as in the paper)

A Face Attention Unit (FAU) is a pre-activation residual block (BN -> LeakyReLU -> conv
-> BN -> LeakyReLU -> conv) whose branch is multiplied by a spatial attention map
(one channel, sigmoid) predicted from the branch by a small hourglass; the shortcut
is identity, or a conv where size or channels change. Each hourglass reaches the
same `bottleneck_size` (4x4) whatever the size of its unit.

It takes the same forward signature as the reference models (lr, refs, ref_mask)
and ignores the references. Shapes: B batch, C channels, S = 16 * scale.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .msrnet import LR_SIZE
from .msrnet import checkpoint_filter_fn as _strip_prefixes
from .registry import register_model

__all__ = ["SPARNet", "FAU", "HourGlass", "ConvUnit"]


class ConvUnit(nn.Module):
    """[nearest x2] -> reflect-padded 3x3 conv (stride 2 for 'down') -> [BN] -> [LeakyReLU 0.2].

    B, cin, H, W -> B, cout, H', W' (H' = H/2 'down', 2H 'up', H 'none').
    """

    def __init__(self, cin: int, cout: int, scale: str = "none", norm: bool = True, act: bool = True):
        super().__init__()
        if scale not in ("none", "down", "up"):
            raise ValueError(f"scale must be none, down or up, got {scale!r}")
        self.up = scale == "up"
        self.conv = nn.Conv2d(cin, cout, 3, 2 if scale == "down" else 1, 1, bias=not norm, padding_mode="reflect")
        self.norm = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.act = nn.LeakyReLU(0.2) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.act(self.norm(self.conv(x)))


class HourGlass(nn.Module):
    """Spatial attention map of a feature map: a `depth`-level hourglass, then conv + sigmoid.

    Level d: skip = conv(x) at the input size; low = conv-down(x), the level d-1 hourglass
    (or one conv at the bottom), conv-up; out = skip + low. depth 0: no attention (map = 1).
    B, cin, H, W -> B, 1, H, W in (0, 1).
    """

    def __init__(self, depth: int, cin: int, mid: int):
        super().__init__()
        self.depth = depth
        self.skips = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level in range(depth):  # level 0 is the outermost
            c = cin if level == 0 else mid
            self.skips.append(ConvUnit(c, mid))
            self.downs.append(ConvUnit(c, mid, "down"))
            self.ups.append(ConvUnit(mid, mid, "up"))
        self.bottom = ConvUnit(mid, mid) if depth else None
        self.out = ConvUnit(mid, 1, norm=False, act=False) if depth else None

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        skip = self.skips[level](x)  # B, mid, H, W
        low = self.downs[level](x)  # B, mid, H/2, W/2
        low = self._level(level + 1, low) if level + 1 < self.depth else self.bottom(low)
        up = self.ups[level](low)  # B, mid, H, W (odd sizes: resized to fit)
        if up.shape[-2:] != skip.shape[-2:]:
            up = F.interpolate(up, size=skip.shape[-2:], mode="nearest")
        return skip + up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return x.new_ones(x.shape[0], 1, *x.shape[-2:])
        return torch.sigmoid(self.out(self._level(0, x)))  # B, 1, H, W


class FAU(nn.Module):
    """Face Attention Unit: shortcut(x) + attention(branch) * branch, branch pre-activation.

    Args:
        cin, cout: channels in and out.
        scale: 'none', 'down' (stride 2 in the second conv) or 'up' (nearest x2 before the first).
        hg_depth: hourglass levels of the attention (0: a plain pre-activation residual block).
        hg_dim: hourglass channels.
    """

    def __init__(self, cin: int, cout: int, scale: str = "none", hg_depth: int = 2, hg_dim: int = 64):
        super().__init__()
        self.shortcut = nn.Identity() if scale == "none" and cin == cout else ConvUnit(cin, cout, scale, False, False)
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.LeakyReLU(0.2))
        first, second = {"none": ("none", "none"), "down": ("none", "down"), "up": ("up", "none")}[scale]
        self.conv1 = ConvUnit(cin, cout, first)
        self.conv2 = ConvUnit(cout, cout, second, act=False)
        self.attn = HourGlass(hg_depth, cout, hg_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B, cin, H, W -> B, cout, H', W'."""
        y = self.conv2(self.conv1(self.pre(x)))  # B, cout, H', W'
        return self.shortcut(x) + self.attn(y) * y  # attention map B, 1, H', W' broadcast over channels


class SPARNet(nn.Module):
    """SPARNet for 16x16 LR faces: bicubic-upsampled input, FAU encoder / body / decoder.

    Args:
        scale: 4 (16 -> 64), 8 (16 -> 128) or 16 (16 -> 256).
        in_chans: image channels.
        min_ch, max_ch: channel clip of every unit (the paper: 32, 128).
        res_depth: body depth parameter; the body has res_depth + 3 - down_steps FAUs at 16x16
            (the paper: 10, i.e. 10 body units for x8).
        bottleneck_size: side at the bottom of every hourglass (the paper: 4).
        hg_dim: hourglass channels (the paper: 64).
        attention: False drops every attention map (plain pre-activation residual blocks).
    """

    use_refs = False  # takes references for a uniform signature and ignores them

    def __init__(
        self,
        scale: int = 8,
        in_chans: int = 3,
        min_ch: int = 32,
        max_ch: int = 128,
        res_depth: int = 10,
        bottleneck_size: int = 4,
        hg_dim: int = 64,
        attention: bool = True,
    ):
        super().__init__()
        if scale not in (4, 8, 16):
            raise ValueError(f"scale must be 4, 8 or 16, got {scale}")
        self.scale, self.in_chans = scale, in_chans
        self.out_size = LR_SIZE * scale
        steps = int(math.log2(scale))  # down steps out_size -> 16 = up steps 16 -> out_size
        clip = lambda c: max(min_ch, min(c, max_ch))  # noqa: E731
        depth = lambda size: int(math.log2(size // bottleneck_size)) if attention else 0  # noqa: E731

        n = clip(max_ch // (steps + 1))
        self.stem = ConvUnit(in_chans, n, norm=False, act=False)
        size, enc = self.out_size, []
        for _ in range(steps):
            size //= 2
            enc.append(FAU(clip(n), clip(2 * n), "down", depth(size), hg_dim))
            n *= 2
        self.encoder = nn.Sequential(*enc)
        self.body = nn.Sequential(*[FAU(clip(n), clip(n), "none", depth(size), hg_dim)
                                    for _ in range(res_depth + 3 - steps)])
        dec = []
        for _ in range(steps):
            size *= 2
            dec.append(FAU(clip(n), clip(n // 2), "up", depth(size), hg_dim))
            n //= 2
        self.decoder = nn.Sequential(*dec)
        self.tail = ConvUnit(clip(n), in_chans, norm=False, act=False)

    def forward_features(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """lr: B, 3, 16, 16 (refs, ref_mask ignored) -> dict feat: B, C, S, S."""
        x = F.interpolate(lr, size=self.out_size, mode="bicubic", align_corners=False)  # B, 3, S, S
        x = self.stem(x)  # B, C0, S, S
        x = self.encoder(x)  # B, C, 16, 16
        x = self.body(x)  # B, C, 16, 16
        return {"feat": self.decoder(x)}  # B, C_out, S, S

    def forward_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tail(feats["feat"])

    def forward(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B, 3, 16, 16 -> B, 3, 16*scale, 16*scale (not clamped)."""
        return self.forward_head(self.forward_features(lr, refs, ref_mask))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SPARNet) -> dict[str, torch.Tensor]:
    """Strip DataParallel / compile prefixes (the authors' weights use other names and do not load)."""
    return _strip_prefixes(state_dict, model)


def _cfg(scale: int, **kwargs: Any) -> dict[str, Any]:
    return {"input_size": (3, LR_SIZE, LR_SIZE), "output_size": (3, LR_SIZE * scale, LR_SIZE * scale),
            "num_refs": 0, "value_range": (0.0, 1.0), "degradation": "bicubic",
            "paper": "Chen et al., Learning Spatial Attention for Face Super-Resolution, TIP 2020", **kwargs}


_PAPER: dict[str, Any] = dict(min_ch=32, max_ch=128, res_depth=10, bottleneck_size=4, hg_dim=64)
_TINY: dict[str, Any] = dict(min_ch=8, max_ch=16, res_depth=1, bottleneck_size=4, hg_dim=8)

default_cfgs: dict[str, dict[str, Any]] = {}


def _create(name: str, scale: int, base: dict[str, Any], **kwargs: Any) -> SPARNet:
    default_cfgs.setdefault(name, _cfg(scale))
    model = SPARNet(scale=scale, **{**base, **kwargs})
    model.default_cfg = default_cfgs[name]
    return model


@register_model
def sparnet_x4(**kwargs: Any) -> SPARNet:
    """The paper's width (channels 32..128, 10-unit body depth, 4x4 hourglass bottleneck). 16 -> 64."""
    return _create("sparnet_x4", 4, _PAPER, **kwargs)


@register_model
def sparnet_x8(**kwargs: Any) -> SPARNet:
    """The paper's setting: 16 -> 128, channels 32..128, 10 FAUs at 16x16."""
    return _create("sparnet_x8", 8, _PAPER, **kwargs)


@register_model
def sparnet_x16(**kwargs: Any) -> SPARNet:
    """The paper's width, one more down/up step. 16 -> 256."""
    return _create("sparnet_x16", 16, _PAPER, **kwargs)


@register_model
def sparnet_tiny_x4(**kwargs: Any) -> SPARNet:
    """Channels 8..16, hourglass 8 wide: for tests and CPU smoke runs. 16 -> 64."""
    return _create("sparnet_tiny_x4", 4, _TINY, **kwargs)


@register_model
def sparnet_tiny_x8(**kwargs: Any) -> SPARNet:
    """Channels 8..16, hourglass 8 wide: for tests and CPU smoke runs. 16 -> 128."""
    return _create("sparnet_tiny_x8", 8, _TINY, **kwargs)


@register_model
def sparnet_tiny_x16(**kwargs: Any) -> SPARNet:
    """Channels 8..16, hourglass 8 wide: for tests and CPU smoke runs. 16 -> 256."""
    return _create("sparnet_tiny_x16", 16, _TINY, **kwargs)
