"""MSRNet2: registry-driven shape/gradient/mask tests, attention units, and a live reference path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import create_model, list_models
from model import msrnet2
from model.msrnet2 import local_aggregate, local_attention_weights

TINY = list_models("msrnet2_tiny_*")  # the tiny alignment variant included


def _inputs(model, b: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 16, 16, generator=g), torch.rand(b, m, 3, model.out_size, model.out_size, generator=g)


def test_variants_registered():
    names = list_models("msrnet2_*")
    for n in ("msrnet2_x4", "msrnet2_x8", "msrnet2_x16", "msrnet2_noref_x8", "msrnet2_tiny_x8", "msrnet2_align_x8",
              "msrnet2_align4_x8", "msrnet2_tiny_align_x8"):
        assert n in names
    a2, a4 = create_model("msrnet2_align_x8"), create_model("msrnet2_align4_x8")
    assert (a2.attn.phases, a4.attn.phases) == (2, 4)  # the same parameters: --init-from moves between them
    assert {k: v.shape for k, v in a2.state_dict().items()} == {k: v.shape for k, v in a4.state_dict().items()}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_refs", [0, 1, 5])
def test_output_shape(name, num_refs):
    model = create_model(name).eval()
    lr, refs = _inputs(model, 2, num_refs)
    with torch.no_grad():
        out = model(lr, refs)
    assert out.shape == (2, 3, 16 * model.scale, 16 * model.scale) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name)
    lr, refs = _inputs(model, 1, 2)
    model(lr, refs).abs().mean().backward()
    zero = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero, zero


@pytest.mark.parametrize("name", TINY)
def test_no_refs_equals_all_masked_and_partial_mask_ignores_absent(name):
    torch.manual_seed(0)
    # float64: in float32 fewer slots change the order of sums (and near-tie picks of the search) by up to
    # 3.4e-4 on one thread, while a used slot of this untrained net moves the output by only ~1e-3
    model = create_model(name).eval().double()
    lr, refs = (t.double() for t in _inputs(model, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(model(lr, None), model(lr, refs, torch.zeros(2, 3, dtype=torch.bool)))
        mask = torch.tensor([[True, True, False]] * 2)
        other = refs.clone()
        other[:, 2] = torch.rand_like(other[:, 2])
        torch.testing.assert_close(model(lr, refs, mask), model(lr, other, mask))
        torch.testing.assert_close(model(lr, refs, mask), model(lr, refs[:, :2]))
        assert not torch.allclose(model(lr, refs), model(lr, refs[:, :2]))  # the third slot, when used, shows


def test_noref_twin_has_no_reference_path():
    twin, full = create_model("msrnet2_noref_x8"), create_model("msrnet2_x8")
    assert twin.attn is None and full.attn is not None
    assert sum(p.numel() for p in twin.parameters()) < sum(p.numel() for p in full.parameters())


def test_attention_equals_naive_softmax_when_window_covers_the_grid():
    g = torch.Generator().manual_seed(0)
    B, M, D, h, w = 2, 3, 4, 5, 5
    q = F.normalize(torch.randn(B, D, h, w, generator=g), dim=1)
    k = F.normalize(torch.randn(B, M, D, h, w, generator=g), dim=1)
    window, scale, null = 2 * h - 1, torch.tensor(3.0), torch.tensor(0.5)
    weights, index = local_attention_weights(q, k, None, window, M * h * w, scale, null)
    # naive: every cell of every reference is a candidate
    logits = torch.einsum("bdn,bmdj->bnmj", q.flatten(2), k.flatten(3)).reshape(B, h * w, M * h * w) * scale
    naive = torch.softmax(torch.cat([logits, null.expand(B, h * w, 1)], -1), -1)
    got = torch.zeros_like(naive)
    got[..., -1] = weights[..., -1]
    got[..., :-1].scatter_add_(2, index, weights[..., :-1])
    torch.testing.assert_close(got, naive)


def test_aggregate_with_one_hot_weight_copies_the_block():
    B, M, C, h, f = 1, 2, 3, 4, 2
    v = torch.arange(B * M * C * (h * f) ** 2, dtype=torch.float32).reshape(B, M, C, h * f, h * f)
    weights = torch.zeros(B, h * h, 2)
    weights[..., 0] = 1.0
    index = torch.full((B, h * h, 1), 1 * h * h + 5)  # reference 1, cell (1, 1), for every query cell
    out = local_aggregate(weights, index, v, f)
    block = v[0, 1, :, 2:4, 2:4]
    for y in range(h):
        for x in range(h):
            torch.testing.assert_close(out[0, :, y * f:(y + 1) * f, x * f:(x + 1) * f], block)


def _oracle_gain(steps: int = 60) -> float:
    """Train msrnet2_tiny_x8 briefly with the HR itself as reference on random-texture faces whose
    detail the LR cannot predict; return PSNR(oracle refs) - PSNR(no refs) in dB."""
    torch.manual_seed(0)
    model = create_model("msrnet2_tiny_x8")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)

    def batch(n: int):
        hr = torch.rand(n, 3, 32, 32, generator=g)
        hr = F.interpolate(hr, size=128, mode="bilinear", align_corners=False)  # 4 px texture, lost at 16x16
        lr = F.interpolate(hr, size=16, mode="bicubic", antialias=True, align_corners=False)
        return lr, hr

    for _ in range(steps):
        lr, hr = batch(4)
        loss = F.l1_loss(model(lr, hr[:, None].expand(-1, 2, -1, -1, -1)), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    lr, hr = batch(8)
    with torch.no_grad():
        mse_o = F.mse_loss(model(lr, hr[:, None].expand(-1, 2, -1, -1, -1)).clamp(0, 1), hr)
        mse_n = F.mse_loss(model(lr, None).clamp(0, 1), hr)
    return float(10 * torch.log10(mse_n / mse_o))


def test_reference_path_carries_detail():
    """The oracle reference must be worth several dB after a short training: a dead transfer fails this."""
    assert _oracle_gain() > 2.0


def test_dead_transfer_fails_the_detail_check(monkeypatch):
    """The check above can fail: with a transfer returning zeros the gain vanishes."""
    monkeypatch.setattr(msrnet2, "local_aggregate", lambda w, i, v, f: torch.zeros(
        v.shape[0], v.shape[2], v.shape[3], v.shape[4], dtype=v.dtype))
    assert _oracle_gain() < 1.0


class _PatchKeys(torch.nn.Module):
    """Keys that tell every texture patch apart (an untrained key encoder's are all nearly parallel)."""

    def forward(self, x):
        p = F.unfold(x, 3, padding=1)  # B, 27, 256
        return F.normalize(p - p.mean(1, keepdim=True), dim=1).reshape(x.shape[0], 27, *x.shape[-2:])


def _hard_transfer(model, lr, ref):
    """The reference path's transferred features with (near) hard attention and no null slot."""
    model.attn.keys = _PatchKeys()
    with torch.no_grad():
        model.attn.logit_scale.fill_(1e4)
        model.attn.null_logit.fill_(-1e4)
        return model.attn(lr, ref[:, None], None)[0]


@pytest.mark.parametrize("direction", [1, -1])
@pytest.mark.parametrize("phases, px, aligned", [(2, 4, True), (1, 4, False), (4, 2, True), (2, 2, False)])
def test_subcell_alignment_recovers_a_sub_cell_shift(phases, px, aligned, direction):
    """A reference that is the HR moved by a fraction of a cell (4 px = 1/2, 2 px = 1/4 at x8), either
    way: with copies at that fraction (phases 2, resp. 4) the transfer finds the HR's own blocks again
    (the same features as from the unmoved HR, inside the face; moved up-left, a copy plus a whole-cell
    step); coarser copies (the alignment removed, or too coarse) cannot, and this test then fails."""
    torch.manual_seed(0)
    model = create_model("msrnet2_tiny_align_x8").eval()
    model.attn.phases = phases
    g = torch.Generator().manual_seed(3)
    hr = F.interpolate(torch.rand(1, 3, 32, 32, generator=g), size=128, mode="bilinear", align_corners=False)
    lr = F.interpolate(hr, size=16, mode="bicubic", antialias=True, align_corners=False)
    if direction > 0:
        moved = F.pad(hr, (px, 0, px, 0), mode="replicate")[..., :128, :128]  # content px right and down
    else:
        moved = F.pad(hr, (0, px, 0, px), mode="replicate")[..., px:, px:]  # content px left and up
    same, off = _hard_transfer(model, lr, hr), _hard_transfer(model, lr, moved)
    for level, (a, b) in enumerate(zip(same, off)):
        f = 2**level
        inner = (..., slice(6 * f, 10 * f), slice(6 * f, 10 * f))  # cells 6..9: away from every edge effect
        assert torch.allclose(a[inner], b[inner], atol=1e-4) is aligned, level


def test_subcell_copies_move_by_fractions_of_a_cell():
    refs = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(1, 2, 1, 16, 16)
    out = msrnet2.subcell_copies(refs, 2, 8)
    assert out.shape == (1, 8, 1, 16, 16)
    torch.testing.assert_close(out[:, 0], refs[:, 0])
    torch.testing.assert_close(out[0, 3, 0, :12, :12], refs[0, 0, 0, 4:, 4:])  # copy (1, 1): 4 px on
    torch.testing.assert_close(out[0, 5, 0, :, :12], refs[0, 1, 0, :, 4:])  # reference 1, copy (0, 1)
    with pytest.raises(ValueError, match="whole-pixel"):
        msrnet2.subcell_copies(refs, 3, 8)
