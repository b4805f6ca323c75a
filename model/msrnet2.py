"""MSRNet2: MSRNet with a reference path that carries detail (see docs/DESIGN.md, "MSRNet2").

The paper's MSRNet (model/msrnet.py) matches LFE features of the bicubic-upsampled
LR against LFE features of the sharp references, over the whole face, and copies
the arg-max cell. Measured, that path adds ~0.2 dB and a perfect reference barely
more. MSRNet2 keeps the paper's idea (external mining over m references of other
identities, fused coarse to fine) and changes how it is done:

  match    like with like: queries are features of the 16x16 LR, keys the same
           features of each reference degraded the same way (Ref -> 16x16), as
           TTSR matches LR-up against Ref-down-up; a key encoder of its own.
  search   local: aligned faces, so each LR cell searches a `window` x `window`
           neighbourhood around its own position in every reference; with
           `phases` p > 1 also in copies of each reference moved by a fraction
           1/p of a cell (sub-cell alignment: `msrnet2_align_x8`).
  transfer soft attention over all m references' candidates plus a learned
           "null" slot (attend to nothing), so no reference, a padded reference
           and a useless one are the same, in-distribution case.
  values   from the sharp reference, by a value encoder of its own, at four
           scales (16, 32, 64, 128 for x8); cell (i, j) of the 16x16 grid carries
           the f x f block above it at scale f.
  fuse     after each decoder level: x + g * conv([x, t]), g = sigmoid(conv([x, t, conf]))
           (a spatial gate, as MASA's spatial adaptation).
  decode   the LR itself at 16x16 (not a 128x128 bicubic image) through residual
           groups and x2 pixel-shuffle steps; output = tail + bicubic(LR).

Shapes: B batch, M references, h = w = 16 the LR grid, K = window^2 candidates.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .msrnet import LR_SIZE, ResBlock, conv3x3, res_group
from .refwarp import register_refs
from .registry import register_model

__all__ = ["MSRNet2", "RefAttention", "GatedFusion", "local_attention_weights", "local_aggregate", "subcell_copies"]


class Up2(nn.Module):
    """conv to 4*cout + pixel shuffle: B, cin, H, W -> B, cout, 2H, 2W."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv3x3(cin, 4 * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(F.pixel_shuffle(self.conv(x), 2), 0.1)


def _window_cells(h: int, w: int, window: int, device: torch.device) -> torch.Tensor:
    """h*w, K index of each cell's window neighbours on the h x w grid; -1 outside it."""
    r = window // 2
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    d = torch.arange(-r, r + 1, device=device)
    ny = y.reshape(-1, 1, 1) + d.reshape(1, -1, 1)  # h*w, window, 1
    nx = x.reshape(-1, 1, 1) + d.reshape(1, 1, -1)  # h*w, 1, window
    cell = ny * w + nx
    inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    return torch.where(inside, cell, torch.full_like(cell, -1)).reshape(h * w, window * window)


def local_attention_weights(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, window: int, topk: int, scale: torch.Tensor,
    null_logit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k soft attention of each query cell over a window in every reference, plus a null slot.

    Args:
        q: B, D, h, w unit-norm query descriptors.
        k: B, M, D, h, w unit-norm key descriptors (same grid as q).
        mask: B, M bool (False: absent reference) or None.
        window: odd side of the search window around each cell's own position.
        topk: candidates kept per cell, over all M * window^2.
        scale: scalar logit scale (a learned temperature).
        null_logit: scalar logit of the "attend to nothing" slot.
    Returns:
        weights: B, h*w, topk + 1 softmax weights (last column: the null slot), rows sum to 1.
        index: B, h*w, topk cell index into the M*h*w reference cells (m * h*w + cell).
    """
    B, M, D, h, w = k.shape
    K = window * window
    cells = _window_cells(h, w, window, q.device)  # h*w, K
    ku = F.unfold(k.reshape(B * M, D, h, w), window, padding=window // 2)  # B*M, D*K, h*w
    ku = ku.reshape(B, M, D, K, h * w)
    logits = torch.einsum("bdn,bmdkn->bnmk", q.flatten(2), ku).float() * scale  # B, h*w, M, K
    invalid = (cells < 0)[None, :, None, :]  # 1, h*w, 1, K: outside the map (zero padding)
    if mask is not None:
        invalid = invalid | ~mask[:, None, :, None]  # B, h*w, M, K
    logits = logits.masked_fill(invalid, float("-inf")).reshape(B, h * w, M * K)
    top, pick = logits.topk(min(topk, M * K), dim=-1)  # B, h*w, k
    m, kk = pick // K, pick % K
    cell = torch.gather(cells[None].expand(B, -1, -1), 2, kk).clamp(min=0)  # B, h*w, k (-1 only where weight is 0)
    null = null_logit.float().expand(B, h * w, 1)
    weights = torch.softmax(torch.cat([top, null], dim=-1), dim=-1)  # B, h*w, k + 1
    return weights, m * (h * w) + cell


def local_aggregate(weights: torch.Tensor, index: torch.Tensor, v: torch.Tensor, factor: int) -> torch.Tensor:
    """Weighted sum of the chosen reference value blocks.

    Args:
        weights, index: from `local_attention_weights` (B, h*w, k + 1; B, h*w, k).
        v: B, M, C, h*f, w*f value features at `factor` f times the grid.
    Returns:
        B, C, h*f, w*f: each cell's f x f block = sum of its candidates' blocks, weighted
        (the null slot contributes zeros).
    """
    B, M, C, H, W = v.shape
    f = factor
    h, w = H // f, W // f
    n, k = index.shape[1:]
    cells = F.pixel_unshuffle(v.reshape(B * M, C, H, W), f) if f > 1 else v.reshape(B * M, C, H, W)  # B*M, C*f*f, h, w
    cells = cells.reshape(B, M, C * f * f, h * w).permute(0, 1, 3, 2).reshape(B, M * h * w, C * f * f)
    picked = torch.gather(cells, 1, index.reshape(B, n * k, 1).expand(-1, -1, C * f * f))  # B, n*k, C*f*f
    picked = picked.reshape(B, n, k, C * f * f)
    out = torch.einsum("bnk,bnkc->bcn", weights[..., :k].to(picked.dtype), picked).reshape(B, C * f * f, h, w)
    return F.pixel_shuffle(out, f) if f > 1 else out  # B, C, h*f, w*f


def subcell_copies(refs: torch.Tensor, phases: int, cell: int) -> torch.Tensor:
    """Each reference and its copies moved by fractions of a cell, so that whole-cell transfer can
    still land within cell / (2 * phases) px of where a misaligned reference's detail belongs.

    Args:
        refs: B, M, C, S, S references.
        phases: p; copies at offsets (i, j) * cell / p px, i, j in 0..p-1 (p = 1: refs as they are).
        cell: the grid's cell side in reference pixels (S / 16); cell / p must be whole pixels.
    Returns:
        B, M * p * p, C, S, S: copy (m, i, j) at index m * p * p + i * p + j shows reference m
        at x + (j, i) * cell / p (edges repeated).
    """
    if phases == 1:
        return refs
    step = cell // phases
    if step * phases != cell:
        raise ValueError(f"a cell of {cell} px cannot be cut into {phases} whole-pixel phases")
    B, M, C, S, _ = refs.shape
    flat = refs.reshape(B * M, C, S, S)
    pad = F.pad(flat, (0, cell, 0, cell), mode="replicate")  # B*M, C, S + cell, S + cell
    copies = [pad[..., i * step : i * step + S, j * step : j * step + S] for i in range(phases) for j in range(phases)]
    return torch.stack(copies, dim=1).reshape(B, M * phases * phases, C, S, S)


class KeyEncoder(nn.Module):
    """Matching descriptors of a 16x16 image (the LR, or a reference degraded to 16x16)."""

    def __init__(self, in_chans: int, dim: int, blocks: int):
        super().__init__()
        self.stem = conv3x3(in_chans, dim)
        self.body = res_group(dim, blocks)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B, 3, 16, 16 -> B, D, 16, 16, unit norm over D."""
        return F.normalize(self.proj(self.body(F.leaky_relu(self.stem(x), 0.1))), dim=1)


class ValueEncoder(nn.Module):
    """Texture features of a sharp reference at the grid and every x2 above it.

    Args:
        in_chans: image channels.
        dims: channels per level, coarsest (the 16x16 grid) first; len = log2(scale) + 1.
    """

    def __init__(self, in_chans: int, dims: tuple[int, ...]):
        super().__init__()
        fine = dims[::-1]  # finest first
        self.stem = conv3x3(in_chans, fine[0])
        self.blocks = nn.ModuleList([ResBlock(fine[0])])
        self.downs = nn.ModuleList()
        for cin, cout in zip(fine[:-1], fine[1:]):
            self.downs.append(conv3x3(cin, cout, stride=2))
            self.blocks.append(ResBlock(cout))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """N, 3, S, S -> [N, dims[0], 16, 16; N, dims[1], 32, 32; ...; N, dims[-1], S, S]."""
        f = self.blocks[0](F.leaky_relu(self.stem(x), 0.1))
        feats = [f]
        for down, block in zip(self.downs, self.blocks[1:]):
            f = block(F.leaky_relu(down(f), 0.1))
            feats.append(f)
        return feats[::-1]


class RefAttention(nn.Module):
    """Soft local attention of the LR grid over m references (the external mining).

    Args:
        in_chans: image channels.
        key_dim: descriptor channels D.
        key_blocks: residual blocks of the key encoder.
        value_dims: value channels per level, coarsest first.
        window: search window side on the 16x16 grid (5: +-2 cells = +-16 px at 128).
        topk: candidates kept per cell over all references' windows (soft top-k attention).
        phases: sub-cell alignment: every reference is also searched moved by 1/phases of a cell
            along each axis (`subcell_copies`; phases^2 times the reference work). 1: whole cells.
        logit_scale: initial attention temperature (higher: sharper attention).
    """

    def __init__(self, in_chans: int, key_dim: int, key_blocks: int, value_dims: tuple[int, ...], window: int,
                 topk: int, phases: int = 1, logit_scale: float = 10.0):
        super().__init__()
        self.window, self.topk, self.phases = window, topk, phases
        self.keys = KeyEncoder(in_chans, key_dim, key_blocks)
        self.values = ValueEncoder(in_chans, value_dims)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.null_logit = nn.Parameter(torch.tensor(5.0))

    def forward(
        self, lr: torch.Tensor, refs: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """lr: B, 3, 16, 16; refs: B, M, 3, S, S -> ([B, V_l, 16*2^l, 16*2^l per level], conf B, 1, 16, 16).

        conf = 1 - weight of the null slot: how much of each cell comes from references.
        """
        h, w = lr.shape[-2:]
        if self.phases > 1:  # B, M*p*p, 3, S, S: each reference and its sub-cell moved copies
            refs = subcell_copies(refs, self.phases, refs.shape[-1] // w)
            mask = mask.repeat_interleave(self.phases**2, dim=1) if mask is not None else None
        B, M = refs.shape[:2]
        flat = refs.flatten(0, 1)  # B*M, 3, S, S
        ref_lr = F.interpolate(flat, size=(h, w), mode="bicubic", align_corners=False, antialias=True)  # B*M, 3, h, w
        q = self.keys(lr)  # B, D, h, w
        k = self.keys(ref_lr).reshape(B, M, -1, h, w)  # B, M, D, h, w
        att, index = local_attention_weights(q, k, mask, self.window, self.topk, self.logit_scale,
                                             self.null_logit)  # B, hw, k+1; B, hw, k
        out = []
        for level, v in enumerate(self.values(flat)):  # level l: B*M, V_l, h*2^l, w*2^l
            v = v.reshape(B, M, *v.shape[1:])
            out.append(local_aggregate(att, index, v, 2**level))
        conf = (1 - att[..., -1]).reshape(B, 1, h, w)
        return out, conf


class GatedFusion(nn.Module):
    """x + g * conv([x, t]), g = sigmoid(conv([x, t, conf])): B, C, H, W (+ B, V, H, W) -> B, C, H, W."""

    def __init__(self, dim: int, ref_dim: int):
        super().__init__()
        self.fuse = conv3x3(dim + ref_dim, dim)
        self.gate = conv3x3(dim + ref_dim + 1, dim)
        nn.init.constant_(self.gate.bias, -1.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        xt = torch.cat([x, t], dim=1)
        conf = F.interpolate(conf, size=x.shape[-2:], mode="nearest").to(x.dtype)
        g = torch.sigmoid(self.gate(torch.cat([xt, conf], dim=1)))
        return x + g * self.fuse(xt)


class MSRNet2(nn.Module):
    """MSRNet2 for 16x16 LR faces, x4 / x8 / x16 in one decoder.

    Args:
        scale: 4 (16 -> 64), 8 (16 -> 128) or 16 (16 -> 256).
        in_chans: image channels.
        dims: decoder channels per level, the 16x16 grid first; len = log2(scale) + 1.
        blocks: residual blocks per decoder level (same length).
        value_dims: reference value channels per level (same length).
        key_dim: matching descriptor channels.
        key_blocks: residual blocks of the key encoder.
        window: attention window side on the 16x16 grid.
        topk: attention candidates per cell.
        phases: sub-cell alignment of the references (`RefAttention`); 1: whole cells, as shipped.
        logit_scale: initial attention temperature.
        ref_warp: g > 0 warps each reference onto the LR before the search (`model.refwarp`: a g x g
            control-point field fitted per reference; no parameters); 0: references as given.
        use_refs: False builds the reference-free twin (same decoder, no attention, no fusion).
    """

    def __init__(
        self,
        scale: int = 8,
        in_chans: int = 3,
        dims: tuple[int, ...] = (64, 64, 32, 16),
        blocks: tuple[int, ...] = (6, 3, 2, 1),
        value_dims: tuple[int, ...] = (64, 32, 16, 8),
        key_dim: int = 32,
        key_blocks: int = 2,
        window: int = 5,
        topk: int = 8,
        phases: int = 1,
        logit_scale: float = 10.0,
        ref_warp: int = 0,
        use_refs: bool = True,
    ):
        super().__init__()
        levels = {4: 3, 8: 4, 16: 5}.get(scale)
        if levels is None:
            raise ValueError(f"scale must be 4, 8 or 16, got {scale}")
        if not (len(dims) == len(blocks) == len(value_dims) == levels):
            raise ValueError(f"x{scale} needs {levels} levels in dims, blocks and value_dims")
        if window % 2 != 1:
            raise ValueError(f"window must be odd, got {window}")
        self.scale, self.in_chans, self.use_refs, self.ref_warp = scale, in_chans, use_refs, ref_warp
        self.out_size = LR_SIZE * scale
        self.head = conv3x3(in_chans, dims[0])
        self.bodies = nn.ModuleList([res_group(d, n) for d, n in zip(dims, blocks)])
        self.ups = nn.ModuleList([Up2(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.attn = (RefAttention(in_chans, key_dim, key_blocks, tuple(value_dims), window, topk, phases, logit_scale)
                     if use_refs else None)
        self.fusions = nn.ModuleList([GatedFusion(d, v) for d, v in zip(dims, value_dims)]) if use_refs else None
        self.tail = conv3x3(dims[-1], in_chans)
        with torch.no_grad():  # an untrained model starts near its bicubic base
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()

    def forward_features(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """lr: B, 3, 16, 16; refs: B, M, 3, S, S (any S) or None; ref_mask: B, M bool.

        Returns dict: feat (B, dims[-1], out, out), base (B, 3, out, out bicubic LR), conf (B, 1, 16, 16).
        """
        B, _, h, w = lr.shape
        have = (self.use_refs and refs is not None and refs.shape[1] > 0
                and (ref_mask is None or bool(ref_mask.any())))
        if have:
            if refs.shape[-1] != self.out_size or refs.shape[-2] != self.out_size:
                flat = F.interpolate(refs.flatten(0, 1), size=self.out_size, mode="bicubic", align_corners=False,
                                     antialias=True)
                refs = flat.reshape(*refs.shape[:2], *flat.shape[1:])
            if self.ref_warp:
                refs = register_refs(lr, refs, ref_mask, grid=self.ref_warp)  # B, M, 3, out, out: bent onto the LR
            ts, conf = self.attn(lr, refs, ref_mask)  # per level B, V_l, 16*2^l, 16*2^l; B, 1, 16, 16
        else:
            ts, conf = None, lr.new_zeros(B, 1, h, w)
        x = F.leaky_relu(self.head(lr), 0.1)  # B, dims[0], 16, 16
        for level, body in enumerate(self.bodies):
            if level > 0:
                x = self.ups[level - 1](x)  # B, dims[l], 16*2^l, 16*2^l
            if self.fusions is not None:
                t = ts[level] if ts is not None else x.new_zeros(B, self.fusions[level].fuse.in_channels - x.shape[1],
                                                                *x.shape[-2:])
                x = self.fusions[level](x, t.to(x.dtype), conf)
            x = body(x)
        base = F.interpolate(lr, size=self.out_size, mode="bicubic", align_corners=False)  # B, 3, out, out
        return {"feat": x, "base": base, "conf": conf}

    def forward_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tail(feats["feat"]) + feats["base"]

    def forward(
        self, lr: torch.Tensor, refs: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B, 3, 16, 16 (+ B, M, 3, S, S refs) -> B, 3, 16*scale, 16*scale (not clamped)."""
        return self.forward_head(self.forward_features(lr, refs, ref_mask))


def _cfg(scale: int, **kwargs: Any) -> dict[str, Any]:
    return {"input_size": (3, LR_SIZE, LR_SIZE), "output_size": (3, LR_SIZE * scale, LR_SIZE * scale),
            "num_refs": 4, "value_range": (0.0, 1.0), "degradation": "bicubic", **kwargs}


_LEVELS = {  # dims, blocks, value_dims per scale: the shipped CPU width
    4: dict(dims=(64, 64, 32), blocks=(6, 3, 2), value_dims=(64, 32, 16)),
    8: dict(dims=(64, 64, 32, 16), blocks=(6, 3, 2, 1), value_dims=(64, 32, 16, 8)),
    16: dict(dims=(64, 64, 32, 16, 16), blocks=(6, 3, 2, 1, 1), value_dims=(64, 32, 16, 8, 8)),
}
_TINY = {s: dict(dims=(16,) * (n + 1), blocks=(1,) * (n + 1), value_dims=(8,) * (n + 1), key_dim=8, key_blocks=1)
         for s, n in ((4, 2), (8, 3), (16, 4))}

_ALIGN4 = {**_LEVELS[8], "phases": 4, "logit_scale": 30.0}  # quarter-cell copies: msrnet2_align4_x8 and its warp twin

default_cfgs: dict[str, dict[str, Any]] = {}


def _create(name: str, scale: int, base: dict[str, Any], **kwargs: Any) -> MSRNet2:
    default_cfgs.setdefault(name, _cfg(scale))
    model = MSRNet2(scale=scale, **{**base, **kwargs})
    model.default_cfg = default_cfgs[name]
    return model


@register_model
def msrnet2_x4(**kwargs: Any) -> MSRNet2:
    """Reworked reference path, CPU width. 16 -> 64."""
    return _create("msrnet2_x4", 4, _LEVELS[4], **kwargs)


@register_model
def msrnet2_x8(**kwargs: Any) -> MSRNet2:
    """Reworked reference path, CPU width (the shipped recipe). 16 -> 128."""
    return _create("msrnet2_x8", 8, _LEVELS[8], **kwargs)


@register_model
def msrnet2_x16(**kwargs: Any) -> MSRNet2:
    """Reworked reference path, CPU width, one decoder. 16 -> 256."""
    return _create("msrnet2_x16", 16, _LEVELS[16], **kwargs)


@register_model
def msrnet2_align_x8(**kwargs: Any) -> MSRNet2:
    """msrnet2_x8 with sub-cell alignment (references also searched moved by half a cell, 4 px) and a
    sharper initial attention (logit scale 30): for references that hold real but misaligned detail."""
    return _create("msrnet2_align_x8", 8, {**_LEVELS[8], "phases": 2, "logit_scale": 30.0}, **kwargs)


@register_model
def msrnet2_align4_x8(**kwargs: Any) -> MSRNet2:
    """msrnet2_align_x8 at quarter cells (references also moved by 2, 4 and 6 px: 16 copies each)."""
    return _create("msrnet2_align4_x8", 8, _ALIGN4, **kwargs)


@register_model
def msrnet2_warp_x8(**kwargs: Any) -> MSRNet2:
    """msrnet2_align4_x8 with each reference first warped onto the LR (`model.refwarp`, 6 x 6 control points):
    for references of the same person in another pose or expression (the positive control)."""
    return _create("msrnet2_warp_x8", 8, {**_ALIGN4, "ref_warp": 6}, **kwargs)


@register_model
def msrnet2_tiny_align_x8(**kwargs: Any) -> MSRNet2:
    """msrnet2_tiny_x8 with sub-cell alignment: for tests."""
    return _create("msrnet2_tiny_align_x8", 8, {**_TINY[8], "phases": 2, "logit_scale": 30.0}, **kwargs)


@register_model
def msrnet2_noref_x8(**kwargs: Any) -> MSRNet2:
    """msrnet2_x8 without the reference path: the twin that measures what references add."""
    return _create("msrnet2_noref_x8", 8, {**_LEVELS[8], "use_refs": False}, **kwargs)


@register_model
def msrnet2_tiny_x4(**kwargs: Any) -> MSRNet2:
    """C=16, one block per level: for tests. 16 -> 64."""
    return _create("msrnet2_tiny_x4", 4, _TINY[4], **kwargs)


@register_model
def msrnet2_tiny_x8(**kwargs: Any) -> MSRNet2:
    """C=16, one block per level: for tests. 16 -> 128."""
    return _create("msrnet2_tiny_x8", 8, _TINY[8], **kwargs)


@register_model
def msrnet2_tiny_x16(**kwargs: Any) -> MSRNet2:
    """C=16, one block per level: for tests. 16 -> 256."""
    return _create("msrnet2_tiny_x16", 16, _TINY[16], **kwargs)


@register_model
def msrnet2_noref_tiny_x8(**kwargs: Any) -> MSRNet2:
    """msrnet2_tiny_x8 without the reference path: the tiny twin, for tests and CPU smoke runs of Table 1."""
    return _create("msrnet2_noref_tiny_x8", 8, {**_TINY[8], "use_refs": False}, **kwargs)
