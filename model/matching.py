"""Stage-1 patch matching for MSRNet (Eq. 4) and index transfer across scales.

All functions are pure tensor functions. Matching runs on the s=4 feature maps:
every 3x3 patch of the LR map is compared, by cosine similarity of the
L2-normalised (C*9)-vector, with every 3x3 patch of every reference map. The
best match across all m references is kept per position (the "multi-source"
choice) with its similarity as a confidence.

Two search modes, same output:
  * `exact_match`: full search, chunked over queries. Exact, and cheapest while
    N_lr * m * N_ref is small (all default sizes: s=4 maps are 16x16 or 32x32).
  * `coarse_to_fine_match`: MASA-SR style. The LR map is cut into k
    non-overlapping blocks; the block's centre patch p_c^k is searched over each
    whole reference, then every patch of the block searches only a window around
    the centre's match (shifted by its offset in the block). Approximate, for
    large maps.
`match_patches` picks one by the size of the correlation volume.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalized_patches(x: torch.Tensor, patch: int = 3) -> torch.Tensor:
    """Unit-norm `patch`x`patch` patches around every position (zero padded).

    Args:
        x: features, B, C, H, W.
        patch: odd patch size.
    Returns:
        B, H*W, C*patch*patch, each row L2-normalised.
    """
    cols = F.unfold(x, kernel_size=patch, padding=patch // 2)  # B, C*p*p, H*W
    return F.normalize(cols.transpose(1, 2), dim=-1)  # B, H*W, C*p*p


def _mask_scores(corr: torch.Tensor, ref_mask: torch.Tensor | None, n_ref: int) -> torch.Tensor:
    """Set scores of absent references to -inf. corr: B, Nq, M*Nr; ref_mask: B, M."""
    if ref_mask is None:
        return corr
    keep = ref_mask.repeat_interleave(n_ref, dim=1)[:, None, :]  # B, 1, M*Nr
    return corr.masked_fill(~keep, float("-inf"))


@torch.no_grad()
def exact_match(
    q: torch.Tensor, keys: torch.Tensor, ref_mask: torch.Tensor | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Full search. q: B, N, D (unit rows); keys: B, M, Nr, D (unit rows).

    Returns:
        B, N int64 index into the M*Nr concatenated reference positions
        (m * Nr + j).
    """
    B, M, Nr, D = keys.shape
    k = keys.reshape(B, M * Nr, D).transpose(1, 2)  # B, D, M*Nr
    out = []
    for s in range(0, q.shape[1], chunk):
        corr = torch.bmm(q[:, s : s + chunk], k)  # B, n, M*Nr
        out.append(_mask_scores(corr, ref_mask, Nr).argmax(dim=-1))
    return torch.cat(out, dim=1)


@torch.no_grad()
def coarse_to_fine_match(
    q: torch.Tensor,
    keys: torch.Tensor,
    lr_hw: tuple[int, int],
    ref_hw: tuple[int, int],
    ref_mask: torch.Tensor | None = None,
    block: int = 8,
    radius: int = 4,
) -> torch.Tensor:
    """MASA-style coarse-to-fine search; same output layout as `exact_match`.

    Args:
        q: B, N, D unit LR patches on an h x w grid (`lr_hw`).
        keys: B, M, Nr, D unit reference patches on an Hr x Wr grid (`ref_hw`).
        block: side of the non-overlapping LR blocks.
        radius: extra search margin around the centre's match.
    """
    B, M, Nr, D = keys.shape
    h, w = lr_hw
    Hr, Wr = ref_hw
    dev = q.device
    nby, nbx = math.ceil(h / block), math.ceil(w / block)
    by = torch.arange(nby, device=dev) * block
    bx = torch.arange(nbx, device=dev) * block
    # block-local offsets, clamped at the map edge (duplicates are harmless)
    oy = torch.arange(block, device=dev)
    ys = (by[:, None] + oy[None]).clamp(max=h - 1)  # nby, b
    xs = (bx[:, None] + oy[None]).clamp(max=w - 1)  # nbx, b
    cy = (by + block // 2).clamp(max=h - 1)  # nby
    cx = (bx + block // 2).clamp(max=w - 1)  # nbx
    centers = (cy[:, None] * w + cx[None, :]).reshape(-1)  # K
    K = centers.numel()
    # coarse: the centre patch of each block against every position of each reference
    corr_c = torch.einsum("bkd,bmnd->bkmn", q[:, centers], keys)  # B, K, M, Nr
    best = corr_c.argmax(dim=-1)  # B, K, M
    best_y, best_x = best // Wr, best % Wr
    # fine: a window that covers the block's offsets plus `radius`
    wy, wx = min(block + 2 * radius, Hr), min(block + 2 * radius, Wr)
    off_y = (cy - by).repeat_interleave(nbx)  # K: centre offset inside its block
    off_x = (cx - bx).repeat(nby)
    ty = (best_y - off_y[None, :, None] - radius).clamp(0, Hr - wy)  # B, K, M
    tx = (best_x - off_x[None, :, None] - radius).clamp(0, Wr - wx)
    cand = (ty[..., None, None] + torch.arange(wy, device=dev)[:, None]) * Wr + (
        tx[..., None, None] + torch.arange(wx, device=dev)[None, :]
    )  # B, K, M, wy, wx
    cand = cand.reshape(B, K, M, wy * wx)  # B, K, M, Wn
    kidx = cand.permute(0, 2, 1, 3).reshape(B, M, K * wy * wx)  # B, M, K*Wn
    kc = torch.gather(keys, 2, kidx[..., None].expand(-1, -1, -1, D))  # B, M, K*Wn, D
    kc = kc.reshape(B, M, K, wy * wx, D).permute(0, 2, 1, 3, 4)  # B, K, M, Wn, D
    qpos = (ys[:, None, :, None] * w + xs[None, :, None, :]).reshape(K, block * block)  # K, b*b
    qb = q[:, qpos]  # B, K, b*b, D
    corr = torch.einsum("bkqd,bkmwd->bkqmw", qb, kc)  # B, K, b*b, M, Wn
    if ref_mask is not None:
        corr = corr.masked_fill(~ref_mask[:, None, None, :, None], float("-inf"))
    flat = corr.reshape(B, K, block * block, M * wy * wx).argmax(dim=-1)  # B, K, b*b
    m_sel = flat // (wy * wx)
    glob = torch.gather(cand.reshape(B, K, M * wy * wx), 2, flat) + m_sel * Nr  # B, K, b*b
    out = torch.empty(B, h * w, dtype=torch.long, device=dev)
    out[:, qpos.reshape(-1)] = glob.reshape(B, -1)  # B, K*b*b scattered onto B, h*w
    return out


def match_patches(
    lr_feat: torch.Tensor,
    ref_feat: torch.Tensor,
    ref_mask: torch.Tensor | None = None,
    patch: int = 3,
    max_exact: int = 32 * 32,
    block: int = 8,
    radius: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best reference patch per LR position across all m references (Eq. 4).

    Args:
        lr_feat: B, C, h, w (s=4 LR features).
        ref_feat: B, M, C, Hr, Wr (s=4 reference features), M >= 1.
        ref_mask: B, M bool, False for padded (absent) references; None = all present.
        max_exact: full search while a reference map has at most this many positions (Hr*Wr),
            else coarse-to-fine. Per LR position exact scores M*Hr*Wr pairs and coarse-to-fine about
            M*(Hr*Wr/block^2 + (block+2*radius)^2) at a higher cost per pair (gathers), so which is
            faster depends on Hr*Wr alone (measured crossover between 32x32 and 48x48, BENCHMARKS.md).
    Returns:
        index: B, h, w int64 into the M*Hr*Wr concatenated positions (m*Hr*Wr + j).
        score: B, 1, h, w cosine similarity of the chosen match (differentiable;
            0 where a sample has no reference at all).
    """
    B, M, C, Hr, Wr = ref_feat.shape
    h, w = lr_feat.shape[-2:]
    q = normalized_patches(lr_feat, patch)  # B, h*w, D
    keys = normalized_patches(ref_feat.reshape(B * M, C, Hr, Wr), patch)  # B*M, Hr*Wr, D
    keys = keys.reshape(B, M, Hr * Wr, -1)  # B, M, Nr, D
    if Hr * Wr <= max_exact:
        idx = exact_match(q, keys, ref_mask)
    else:
        idx = coarse_to_fine_match(q, keys, (h, w), (Hr, Wr), ref_mask, block, radius)
    # recompute the winning similarity with gradients (cheap: one gather)
    flat_keys = keys.reshape(B, M * Hr * Wr, -1)  # B, M*Nr, D
    chosen = torch.gather(flat_keys, 1, idx[..., None].expand(-1, -1, q.shape[-1]))  # B, h*w, D
    score = (q * chosen).sum(-1)  # B, h*w
    if ref_mask is not None:
        score = score * ref_mask.any(dim=1, keepdim=True).to(score.dtype)
    return idx.reshape(B, h, w), score.reshape(B, 1, h, w)  # B, h, w; B, 1, h, w


def transfer(ref_feat: torch.Tensor, index: torch.Tensor, factor: int) -> torch.Tensor:
    """Copy matched reference features at a finer scale.

    A match at s=4 cell (y, x) -> reference cell (ry, rx) of reference m maps,
    at a map `factor` times finer, the block (y*f+dy, x*f+dx) to
    (ry*f+dy, rx*f+dx) of reference m, for 0 <= dy, dx < f.

    Args:
        ref_feat: B, M, C, Hr*f, Wr*f reference features at the finer scale.
        index: B, h, w from `match_patches` (positions on the Hr x Wr grid).
        factor: f (1 for s=4 itself, 2 for s=2, 4 for s=1).
    Returns:
        B, C, h*f, w*f.
    """
    B, M, C, Hs, Ws = ref_feat.shape
    _, h, w = index.shape
    f = factor
    Hr, Wr = Hs // f, Ws // f
    m, j = index // (Hr * Wr), index % (Hr * Wr)
    ry, rx = j // Wr, j % Wr  # B, h, w
    d = torch.arange(f, device=index.device)
    sy = ry[:, :, None, :, None] * f + d[None, None, :, None, None]  # B, h, f, w, 1
    sx = rx[:, :, None, :, None] * f + d[None, None, None, None, :]  # B, h, 1, w, f
    src = m[:, :, None, :, None] * (Hs * Ws) + sy * Ws + sx  # B, h, f, w, f
    src = src.reshape(B, 1, h * f * w * f).expand(-1, C, -1)  # B, C, h*f*w*f
    flat = ref_feat.permute(0, 2, 1, 3, 4).reshape(B, C, M * Hs * Ws)  # B, C, M*Hs*Ws
    return torch.gather(flat, 2, src).reshape(B, C, h * f, w * f)  # B, C, h*f, w*f
