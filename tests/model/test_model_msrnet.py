"""Registry-driven tests of every MSRNet variant, plus block unit tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import MsrError, create_model, list_models
from model.msrnet import CDFM, CrossScaleAttention, resize

TINY = list_models("msrnet_tiny_*")


def _inputs(model, b: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(b, 3, 16, 16, generator=g)
    refs = torch.rand(b, m, 3, model.out_size, model.out_size, generator=g)
    return lr, refs


def test_registry_lists_the_variants():
    names = list_models()
    for s in (4, 8, 16):
        assert f"msrnet_tiny_x{s}" in names and f"msrnet_x{s}" in names
    with pytest.raises(MsrError, match="unknown model"):
        create_model("msrnet_x3")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_refs", range(6))
def test_output_shape_every_ref_count(name, num_refs):
    torch.manual_seed(0)
    model = create_model(name).eval()
    lr, refs = _inputs(model, 1, num_refs)
    with torch.no_grad():
        out = model(lr, refs)
    assert out.shape == (1, 3, 16 * model.scale, 16 * model.scale)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name)
    lr, refs = _inputs(model, 1, 2)
    model(lr, refs).abs().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero


@pytest.mark.parametrize("name", TINY)
def test_no_refs_equals_all_masked(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    lr, refs = _inputs(model, 2, 3)
    with torch.no_grad():
        none = model(lr, None)
        masked = model(lr, refs, torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(none, masked)


def test_partial_mask_ignores_absent_reference():
    torch.manual_seed(0)
    model = create_model("msrnet_tiny_x4").eval()
    lr, refs = _inputs(model, 1, 3)
    mask = torch.tensor([[True, True, False]])
    other = refs.clone()
    other[:, 2] = torch.rand_like(other[:, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(lr, refs, mask), model(lr, other, mask))
        torch.testing.assert_close(model(lr, refs, mask), model(lr, refs[:, :2]))


def test_refs_of_other_size_are_resized():
    model = create_model("msrnet_tiny_x4").eval()
    lr = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert model(lr, torch.rand(1, 2, 3, 256, 256)).shape == (1, 3, 64, 64)


def test_no_swin_ablation_replaces_gfe_by_one_conv():
    swin = create_model("msrnet_tiny_x16")
    conv = create_model("msrnet_tiny_x16", use_swin=False)
    assert conv.gfe.swin is None and swin.gfe.swin is not None
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(conv) < n(swin)
    with torch.no_grad():
        assert conv.eval()(torch.rand(1, 3, 16, 16)).shape == (1, 3, 256, 256)


@pytest.mark.parametrize("name", list_models("msrnet_x*"))
def test_paper_variants_build_with_c64(name):
    model = create_model(name)
    assert model.lfe.stem.out_channels == 64
    assert model.default_cfg["output_size"][-1] == 16 * model.scale


def test_cdfm_matches_equations_5_to_7():
    torch.manual_seed(0)
    m = CDFM(4)
    lr_hi, ref_hi, lr_low = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 12, 12)
    ref_res = m.ref_up_conv(F.interpolate(ref_hi, size=12, mode="bicubic", align_corners=False)) - lr_low
    ref_p = ref_hi + m.ref_back(ref_res)
    lr_p = m.lr_conv(lr_hi - m.lr_down_conv(resize(lr_low, 6)) + ref_hi)
    want = m.fuse(torch.cat([ref_p, lr_p], 1))
    got = m(lr_hi, ref_hi, lr_low)
    assert got.shape == (2, 4, 6, 6)
    torch.testing.assert_close(got, want)


def test_cross_scale_attention_equals_naive_softmax():
    torch.manual_seed(0)
    att = CrossScaleAttention(4, attn_dim=3)
    x, y, v = torch.randn(1, 4, 4, 6), torch.randn(1, 4, 2, 3), torch.randn(1, 4, 4, 6)
    got = att(x, y, v)
    assert got.shape == (1, 4, 8, 12)
    q = att.q(x).flatten(2)[0].T  # 24, 3
    k = att.k(y).flatten(2)[0].T  # 6, 3
    w = torch.softmax(q @ k.T / 3**0.5, dim=-1)  # Eq. 8: softmax over key positions
    vals = F.pixel_unshuffle(att.v(v), 2).flatten(2)[0].T  # 6, 16
    naive = F.pixel_shuffle((w @ vals).T.reshape(1, 16, 4, 6), 2)
    torch.testing.assert_close(got, att.proj(naive), atol=1e-5, rtol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(24))
