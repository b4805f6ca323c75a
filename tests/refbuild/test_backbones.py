"""Every registered backbone, driven by the registry (a new backbone needs no new test here):
its declared channels and layer names are what its maps give, so `embed` can size the
features without running (or loading) the network."""
from __future__ import annotations

import pytest
import torch

from refbuild.backbones import BACKBONES, build_backbone
from refbuild.errors import RefbuildError


@pytest.mark.parametrize("name", list(BACKBONES))
def test_declared_channels_are_the_maps_channels(name):
    described = build_backbone(name, "random", load=False)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    maps = build_backbone(name, "random").maps(x)
    assert [m.shape[1] for m in maps] == described.channels
    assert len(described.layer_names) == len(maps) and all(m.dtype == torch.float32 for m in maps)
    assert all(torch.isfinite(m).all() for m in maps)
    assert described.weights_id and described.note and described.default_grid > 0


def test_unknown_backbone_names_the_registered_ones():
    with pytest.raises(RefbuildError, match=" or ".join([", ".join(list(BACKBONES)[:-1]), list(BACKBONES)[-1]])):
        build_backbone("nosuch")


def test_dlib_refuses_weights_that_are_not_its_own(tmp_path):
    """--weights reaches every backbone, MSRFACE_VGGFACE_WEIGHTS included: dlib's says what to do with a VGG file."""
    vgg = tmp_path / "vgg_face_dag.pth"
    vgg.write_bytes(b"PK\x03\x04 not a dlib file")
    with pytest.raises(RefbuildError, match="MSRFACE_VGGFACE_WEIGHTS") as e:
        build_backbone("dlib", str(vgg), load=False)
    assert "\n" not in str(e.value)
