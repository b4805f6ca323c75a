"""MSRNet: face super-resolution from multi-source references.

Wang, Yu, Jian, Smith, "Face Super-resolution Based on Multi-source References".
A 16x16 LR face and m HR references of other identities -> SR face.

  LFE  shared residual CNN encoder -> features at s = 1, 2, 4 (LR bicubic-upsampled
       to the stage-1 size T, and every reference resized to T)
  EM   stage 1: patch matching at s=4 (Eq. 4) across all references, transfer of the
       matched features to s=2, 1, CDFM fusion (Eqs. 5-7) -> I_SR^1 at T (x4: 64, x8: 128)
  GFE  Swin transformer encoder over I_SR^1 (or one 3x3 conv, `use_swin=False`)
  SSM  stage 2 (x16 only): LG-CS2 cross-scale attention (Eq. 8) between global and
       local features, CDFM, x2 -> I_SR at 256

Readings of the paper's vague passages are in docs/DESIGN.md ("MSRNet (`model/`)"). Layout follows
timm: blocks, model, `checkpoint_filter_fn`, `_cfg`, registered variants.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerStage

from .matching import match_patches, transfer
from .registry import register_model

__all__ = ["MSRNet", "CDFM", "CrossScaleAttention", "LocalFeatureExtractor"]

LR_SIZE = 16  # the side of every LR face, for every model family; the one definition (data, infer, inputs import it)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1)


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of B, C, H, W (the paper's Up/Down)."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


class ResBlock(nn.Module):
    """EDSR residual block: conv-ReLU-conv + identity, no normalisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = conv3x3(dim, dim)
        self.conv2 = conv3x3(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def res_group(dim: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(dim) for _ in range(n)])


class Upsample2x(nn.Module):
    """conv to 4C + pixel shuffle: B, C, H, W -> B, C, 2H, 2W."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = conv3x3(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(F.pixel_shuffle(self.conv(x), 2), 0.1)  # B, C, 2H, 2W


class LocalFeatureExtractor(nn.Module):
    """LFE: three groups of residual blocks at s = 1, 2, 4 (strided conv between).

    Args:
        in_chans: image channels.
        dim: feature channels C.
        blocks: residual blocks per group (s=1, s=2, s=4).
    """

    def __init__(self, in_chans: int = 3, dim: int = 64, blocks: tuple[int, int, int] = (2, 2, 2)):
        super().__init__()
        self.stem = conv3x3(in_chans, dim)
        self.group1 = res_group(dim, blocks[0])
        self.down2 = conv3x3(dim, dim, stride=2)
        self.group2 = res_group(dim, blocks[1])
        self.down4 = conv3x3(dim, dim, stride=2)
        self.group4 = res_group(dim, blocks[2])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """B, 3, T, T -> [B, C, T, T; B, C, T/2, T/2; B, C, T/4, T/4]."""
        f1 = self.group1(F.leaky_relu(self.stem(x), 0.1))
        f2 = self.group2(F.leaky_relu(self.down2(f1), 0.1))
        f4 = self.group4(F.leaky_relu(self.down4(f2), 0.1))
        return [f1, f2, f4]


class CDFM(nn.Module):
    """Cross-scale dual-residual fusion (Eqs. 5-7).

    `hi` is the high-level (coarse, h x w) level and `low` the low-level (fine,
    2h x 2w) level; the output lives on the coarse grid:

        Eq. 5  ref_res = Conv(Up(ref_hi)) - lr_low            # B, C, 2h, 2w
               ref'    = ref_hi + Deconv(ref_res)             # B, C, h, w
        Eq. 6  lr_res  = lr_hi - Conv(Down(lr_low))           # B, C, h, w
               lr'     = Conv(lr_res + ref_hi)                # B, C, h, w
        Eq. 7  enh     = Conv(cat(ref', lr'))                 # B, C, h, w

    "Deconv" is read as the back-projection from the fine to the coarse grid
    (a learned stride-2 conv); Up/Down are bicubic.

    Args:
        dim: channels C of all inputs.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.ref_up_conv = conv3x3(dim, dim)
        self.ref_back = conv3x3(dim, dim, stride=2)
        self.lr_down_conv = conv3x3(dim, dim)
        self.lr_conv = conv3x3(dim, dim)
        self.fuse = conv3x3(2 * dim, dim)

    def forward(self, lr_hi: torch.Tensor, ref_hi: torch.Tensor, lr_low: torch.Tensor) -> torch.Tensor:
        """lr_hi, ref_hi: B, C, h, w; lr_low: B, C, 2h, 2w -> B, C, h, w."""
        h, w = lr_hi.shape[-2:]
        ref_res = self.ref_up_conv(resize(ref_hi, lr_low.shape[-2:])) - lr_low  # B, C, 2h, 2w
        ref_p = ref_hi + self.ref_back(ref_res)  # B, C, h, w
        lr_res = lr_hi - self.lr_down_conv(resize(lr_low, (h, w)))  # B, C, h, w
        lr_p = self.lr_conv(lr_res + ref_hi)  # B, C, h, w
        return self.fuse(torch.cat([ref_p, lr_p], dim=1))  # B, C, h, w


class CrossScaleAttention(nn.Module):
    """LG-CS2 attention (Eq. 8): queries on one scale, keys on the half scale.

    Query pixel (i, j) of X (h x w) attends over all key positions (u, v) of Y
    (h/2 x w/2), w = softmax_uv(phi(X_ij, Y_uv)), phi = scaled dot product of
    1x1-conv embeddings. Each key position carries the 2x2 block of the value map
    V (h x w) above it, so the output is a 2h x 2w map (cross-scale transfer).

    Args:
        dim: channels C of X, Y, V and the output.
        attn_dim: embedding channels of phi.
    """

    def __init__(self, dim: int, attn_dim: int = 32):
        super().__init__()
        self.q = nn.Conv2d(dim, attn_dim, 1)
        self.k = nn.Conv2d(dim, attn_dim, 1)
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = conv3x3(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x: B, C, h, w; y: B, C, h/2, w/2; v: B, C, h, w -> B, C, 2h, 2w."""
        B, C, h, w = x.shape
        q = self.q(x).flatten(2).transpose(1, 2)[:, None]  # B, 1, h*w, A
        k = self.k(y).flatten(2).transpose(1, 2)[:, None]  # B, 1, h*w/4, A
        val = F.pixel_unshuffle(self.v(v), 2)  # B, 4C, h/2, w/2
        val = val.flatten(2).transpose(1, 2)[:, None]  # B, 1, h*w/4, 4C
        out = F.scaled_dot_product_attention(q, k, val)  # B, 1, h*w, 4C
        out = out[:, 0].transpose(1, 2).reshape(B, 4 * C, h, w)  # B, 4C, h, w
        return self.proj(F.pixel_shuffle(out, 2))  # B, C, 2h, 2w


class GlobalFeatureExtractor(nn.Module):
    """GFE: conv embedding + a timm Swin stage over I_SR^1 (NHWC inside).

    Args:
        in_chans: image channels.
        dim: channels C.
        depth: Swin blocks (alternating regular / shifted windows).
        num_heads: attention heads.
        window_size: Swin window side.
        use_swin: False -> a single 3x3 conv (the paper's "no_sw" ablation).
    """

    def __init__(
        self, in_chans: int = 3, dim: int = 64, depth: int = 2, num_heads: int = 4, window_size: int = 8,
        use_swin: bool = True,
    ):
        super().__init__()
        self.embed = conv3x3(in_chans, dim)
        self.swin = (
            SwinTransformerStage(
                dim=dim, out_dim=dim, input_resolution=(128, 128), depth=depth, downsample=False,
                num_heads=num_heads, window_size=window_size, dynamic_mask=True,
            )
            if use_swin
            else None
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """B, 3, W, H -> B, C, W, H."""
        x = self.embed(img)  # B, C, H, W
        if self.swin is None:
            return x
        x = self.swin(x.permute(0, 2, 3, 1))  # B, H, W, C
        return x.permute(0, 3, 1, 2).contiguous()  # B, C, H, W


class MSRNet(nn.Module):
    """MSRNet for 16x16 LR faces.

    Args:
        scale: 4 (16->64), 8 (16->128) or 16 (16->256, stage 1 at x8 + stage 2).
        in_chans: image channels.
        embed_dim: feature channels C (paper: 64).
        lfe_blocks: residual blocks per LFE group (s=1, 2, 4).
        dec_blocks: residual blocks after each fusion in the decoders.
        swin_depth: Swin blocks in the GFE (x16 only).
        swin_heads: Swin attention heads.
        window_size: Swin window side.
        use_swin: False replaces the GFE by one 3x3 conv (Table 3 "no_sw").
        attn_dim: embedding channels of phi in Eq. 8.
        max_exact_match: reference-map positions (Hr*Wr) up to which the s=4
            matching is an exact full search; above it, coarse-to-fine.
        match_block: LR block side of the coarse-to-fine search.
        match_radius: search margin of the coarse-to-fine search.
    """

    def __init__(
        self,
        scale: int = 8,
        in_chans: int = 3,
        embed_dim: int = 64,
        lfe_blocks: tuple[int, int, int] = (2, 2, 2),
        dec_blocks: int = 2,
        swin_depth: int = 4,
        swin_heads: int = 4,
        window_size: int = 8,
        use_swin: bool = True,
        attn_dim: int = 32,
        max_exact_match: int = 32 * 32,
        match_block: int = 8,
        match_radius: int = 4,
    ):
        super().__init__()
        if scale not in (4, 8, 16):
            raise ValueError(f"scale must be 4, 8 or 16, got {scale}")
        C = embed_dim
        self.scale = scale
        self.in_chans = in_chans
        self.stage1_size = LR_SIZE * min(scale, 8)  # T
        self.out_size = LR_SIZE * scale
        self.match_kw = dict(max_exact=max_exact_match, block=match_block, radius=match_radius)
        self.lfe = LocalFeatureExtractor(in_chans, C, tuple(lfe_blocks))
        # stage 1: external mining
        self.em_head = conv3x3(2 * C, C)
        self.em_cdfm4 = CDFM(C)
        self.em_body4 = res_group(C, dec_blocks)
        self.em_up4 = Upsample2x(C)
        self.em_cdfm2 = CDFM(C)
        self.em_body2 = res_group(C, dec_blocks)
        self.em_up2 = Upsample2x(C)
        self.em_fuse1 = conv3x3(2 * C, C)
        self.em_body1 = res_group(C, dec_blocks)
        self.em_tail = conv3x3(C, in_chans)
        # stage 2: intra mining, only for x16
        self.two_stage = scale == 16
        if self.two_stage:
            self.gfe = GlobalFeatureExtractor(in_chans, C, swin_depth, swin_heads, window_size, use_swin)
            self.ssm_attn_hi = CrossScaleAttention(C, attn_dim)  # F_g (W) vs F_LR^2 -> 2W
            self.ssm_attn_lo = CrossScaleAttention(C, attn_dim)  # F_g down (W/2) vs F_LR^4 -> W
            self.ssm_cdfm = CDFM(C)
            self.ssm_body = res_group(C, dec_blocks)
            self.ssm_up = Upsample2x(C)
            self.ssm_body2 = res_group(C, dec_blocks)
            self.ssm_tail = conv3x3(C, in_chans)
        self._init_tails()

    @torch.no_grad()
    def _init_tails(self) -> None:
        # Small RGB tails: an untrained model starts near its bicubic base (faster, stabler start).
        for tail in (self.em_tail, getattr(self, "ssm_tail", None)):
            if tail is not None:
                tail.weight.mul_(0.1)
                tail.bias.zero_()

    def _encode_refs(self, refs: torch.Tensor) -> list[torch.Tensor]:
        """B, M, 3, R, R -> per scale B, M, C, T/s, T/s."""
        B, M = refs.shape[:2]
        x = refs.flatten(0, 1)  # B*M, 3, R, R
        if x.shape[-1] != self.stage1_size or x.shape[-2] != self.stage1_size:
            x = F.interpolate(x, size=self.stage1_size, mode="bicubic", align_corners=False, antialias=True)
        return [f.reshape(B, M, *f.shape[1:]) for f in self.lfe(x)]  # B, M, C, h, w

    def external_mining(
        self, lr_feats: list[torch.Tensor], refs: torch.Tensor | None, ref_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1 features. Returns (B, C, T, T decoder state, B, 1, T/4, T/4 confidence)."""
        f1, f2, f4 = lr_feats
        B, C, h, w = f4.shape
        if refs is None or refs.shape[1] == 0 or (ref_mask is not None and not bool(ref_mask.any())):
            # no reference: the transferred features are zero, confidence 0
            t1, t2, t4 = torch.zeros_like(f1), torch.zeros_like(f2), torch.zeros_like(f4)
            conf = f4.new_zeros(B, 1, h, w)
        else:
            r1, r2, r4 = self._encode_refs(refs)
            idx, conf = match_patches(f4, r4, ref_mask, **self.match_kw)  # B, h, w; B, 1, h, w
            # spatial adaptation: weight transferred features by match confidence
            t4 = transfer(r4, idx, 1) * conf  # B, C, h, w
            t2 = transfer(r2, idx, 2) * F.interpolate(conf, scale_factor=2.0, mode="nearest")  # B, C, 2h, 2w
            t1 = transfer(r1, idx, 4) * F.interpolate(conf, scale_factor=4.0, mode="nearest")  # B, C, 4h, 4w
        x = f4 + self.em_head(torch.cat([f4, t4], dim=1))  # B, C, h, w
        x = self.em_up4(self.em_body4(self.em_cdfm4(x, t4, f2)))  # B, C, 2h, 2w
        x = self.em_up2(self.em_body2(self.em_cdfm2(x, t2, f1)))  # B, C, 4h, 4w
        x = self.em_body1(x + self.em_fuse1(torch.cat([x, t1], dim=1)))  # B, C, 4h, 4w
        return x, conf

    def intra_mining(self, sr1: torch.Tensor, lr_feats: list[torch.Tensor]) -> torch.Tensor:
        """Stage 2 (LG-CS2): I_SR^1 (B, 3, W, W) -> features B, C, 2W, 2W."""
        f1, f2, f4 = lr_feats
        g = self.gfe(sr1)  # B, C, W, W
        g_down = resize(g, g.shape[-1] // 2)  # B, C, W/2, W/2
        a_hi = self.ssm_attn_hi(g, f2, f1)  # B, C, 2W, 2W
        a_lo = self.ssm_attn_lo(g_down, f4, f2)  # B, C, W, W
        x = self.ssm_body(self.ssm_cdfm(g, a_lo, a_hi))  # B, C, W, W
        return self.ssm_body2(self.ssm_up(x) + a_hi)  # B, C, 2W, 2W

    def forward_features(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Features before the last tail conv.

        Args:
            lr: B, 3, 16, 16 in [0, 1].
            refs: B, M, 3, R, R in [0, 1] (any R; resized to the stage-1 size), M in 0..5, or None.
            ref_mask: B, M bool, False marks a padded (absent) reference; None = all present.
        Returns:
            dict with `feat` (B, C, out, out), `base` (B, 3, out, out, bicubic base the
            head adds to), `sr1` (B, 3, T, T, I_SR^1) and `conf` (B, 1, T/4, T/4).
        """
        T = self.stage1_size
        lr_up = resize(lr, T)  # B, 3, T, T
        lr_feats = self.lfe(lr_up)
        x, conf = self.external_mining(lr_feats, refs, ref_mask)
        if not self.two_stage:
            return {"feat": x, "base": lr_up, "conf": conf}
        sr1 = self.em_tail(x) + lr_up  # B, 3, T, T
        feat = self.intra_mining(sr1, lr_feats)
        return {"feat": feat, "base": resize(sr1, self.out_size), "sr1": sr1, "conf": conf}

    def forward_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        tail = self.ssm_tail if self.two_stage else self.em_tail
        return tail(feats["feat"]) + feats["base"]

    def forward(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B, 3, 16, 16 (+ B, M, 3, R, R refs) -> B, 3, 16*scale, 16*scale (not clamped)."""
        return self.forward_head(self.forward_features(lr, refs, ref_mask))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: MSRNet) -> dict[str, torch.Tensor]:
    """Strip DataParallel / compile prefixes so any saved MSRNet state loads."""
    out = {}
    for k, v in state_dict.items():
        for p in ("module.", "_orig_mod."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _cfg(scale: int, **kwargs: Any) -> dict[str, Any]:
    """Preprocessing metadata, kept apart from the architecture."""
    return {
        "input_size": (3, LR_SIZE, LR_SIZE),
        "output_size": (3, LR_SIZE * scale, LR_SIZE * scale),
        "num_refs": 4,
        "value_range": (0.0, 1.0),
        "degradation": "bicubic",
        **kwargs,
    }


default_cfgs = {
    **{f"msrnet_tiny_x{s}": _cfg(s) for s in (4, 8, 16)},
    **{f"msrnet_x{s}": _cfg(s) for s in (4, 8, 16)},
}

_TINY = dict(embed_dim=16, lfe_blocks=(1, 1, 1), dec_blocks=1, swin_depth=2, swin_heads=2, attn_dim=8)
_PAPER = dict(embed_dim=64, lfe_blocks=(2, 2, 2), dec_blocks=2, swin_depth=4, swin_heads=4, attn_dim=32)


def _create(name: str, scale: int, base: dict[str, Any], **kwargs: Any) -> MSRNet:
    model = MSRNet(scale=scale, **{**base, **kwargs})
    model.default_cfg = default_cfgs[name]
    return model


@register_model
def msrnet_tiny_x4(**kwargs: Any) -> MSRNet:
    """C=16, one block per group: for tests. 16 -> 64."""
    return _create("msrnet_tiny_x4", 4, _TINY, **kwargs)


@register_model
def msrnet_tiny_x8(**kwargs: Any) -> MSRNet:
    """C=16, one block per group: for tests. 16 -> 128."""
    return _create("msrnet_tiny_x8", 8, _TINY, **kwargs)


@register_model
def msrnet_tiny_x16(**kwargs: Any) -> MSRNet:
    """C=16, one block per group: for tests. 16 -> 256 (two stages)."""
    return _create("msrnet_tiny_x16", 16, _TINY, **kwargs)


@register_model
def msrnet_x4(**kwargs: Any) -> MSRNet:
    """Paper width C=64. 16 -> 64."""
    return _create("msrnet_x4", 4, _PAPER, **kwargs)


@register_model
def msrnet_x8(**kwargs: Any) -> MSRNet:
    """Paper width C=64. 16 -> 128."""
    return _create("msrnet_x8", 8, _PAPER, **kwargs)


@register_model
def msrnet_x16(**kwargs: Any) -> MSRNet:
    """Paper width C=64. 16 -> 256: stage 1 at x8, GFE + SSM, x2."""
    return _create("msrnet_x16", 16, _PAPER, **kwargs)
