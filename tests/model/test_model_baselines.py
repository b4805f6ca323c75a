"""Reference-free baselines (SPARNet, SwinIR, MSRNet2's twin): registry-driven build, forward/backward at every
scale, references ignored, checkpoint round trip through the code MSRNet uses; SPARNet's units."""
from __future__ import annotations

import pytest
import torch

from model import create_model, list_models
from model.checkpoint import load_checkpoint, model_from_checkpoint, restore_optimizer, save_checkpoint
from model.sparnet import FAU, HourGlass

TINY = list_models("sparnet_tiny_*")
BASELINES = TINY + list_models("swinir_tiny_*") + ["msrnet2_noref_tiny_x8"]


def test_variants_registered():
    names = list_models("sparnet_*")
    for s in (4, 8, 16):
        assert f"sparnet_x{s}" in names and f"sparnet_tiny_x{s}" in names


def test_swinir_variants_registered_and_light_width():
    for n in ("swinir_light_x4", "swinir_light_x8", "swinir_light_x16", "swinir_tiny_x8"):
        assert n in list_models("swinir_*")
    m = create_model("swinir_light_x8")
    assert len(m.layers) == 4 and m.conv_first.out_channels == 60 and m.upsample.out_channels == 3 * 64
    assert m.use_refs is False


def test_paper_width_x8_layout():
    """The paper's x8: 128 -> 16 in three down FAUs, 10 FAUs at 16x16, three up FAUs, channels 32..128."""
    m = create_model("sparnet_x8")
    assert len(m.encoder) == 3 and len(m.body) == 10 and len(m.decoder) == 3
    assert m.stem.conv.out_channels == 32 and m.body[0].conv1.conv.out_channels == 128
    assert m.decoder[-1].conv2.conv.out_channels == 32
    assert [u.attn.depth for u in m.encoder] == [4, 3, 2] and m.body[0].attn.depth == 2
    assert [u.attn.depth for u in m.decoder] == [3, 4, 5]  # every hourglass bottoms out at 4x4
    assert m.use_refs is False


@pytest.mark.parametrize("name", BASELINES)
def test_forward_backward_and_refs_ignored(name):
    torch.manual_seed(0)
    model = create_model(name)
    S = model.out_size
    assert S == 16 * model.scale
    lr, refs = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 3, S, S)
    out = model(lr, refs, torch.ones(2, 3, dtype=torch.bool))
    assert out.shape == (2, 3, S, S) and torch.isfinite(out).all()
    out.abs().mean().backward()
    zero = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not zero, zero
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(lr, None), model(lr, refs, torch.zeros(2, 3, dtype=torch.bool)))
        torch.testing.assert_close(model(lr, torch.rand_like(refs)), model(lr, refs))


@pytest.mark.parametrize("name", BASELINES)
def test_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 16, 16), None).mean().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, {"model": name, "model_kwargs": {}, "step": 1, "best": 0.0}, opt)
    ck = load_checkpoint(tmp_path / "c.safetensors")
    again = model_from_checkpoint(ck)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n  # BatchNorm running statistics included
    restore_optimizer(torch.optim.Adam(again.parameters(), lr=1e-3), ck)
    lr = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(lr), again.eval()(lr))


def test_attention_map_modulates_the_branch():
    torch.manual_seed(0)
    hg = HourGlass(2, 8, 8)
    a = hg(torch.rand(2, 8, 16, 16))
    assert a.shape == (2, 1, 16, 16) and (a > 0).all() and (a < 1).all()
    assert torch.equal(HourGlass(0, 8, 8)(torch.rand(1, 8, 5, 5)), torch.ones(1, 1, 5, 5))
    unit = FAU(8, 16, "down", 2, 8).eval()
    assert unit(torch.rand(1, 8, 32, 32)).shape == (1, 16, 16, 16)
    assert FAU(16, 8, "up", 2, 8).eval()(torch.rand(1, 16, 8, 8)).shape == (1, 8, 16, 16)


def test_plain_variant_has_no_attention():
    m = create_model("sparnet_tiny_x8", attention=False)
    assert all(u.attn.depth == 0 for u in [*m.encoder, *m.body, *m.decoder])
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in create_model("sparnet_tiny_x8").parameters())
