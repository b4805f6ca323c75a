"""VGG-16 with the VGGFace weights (`vgg_face_dag.pth`, the MatConvNet conversion published with
VGG-Face): the network, its input convention and the weight reader. `refbuild.backbones.VggFace`
taps its maps for `refbuild embed --backbone vggface`.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from refbuild.errors import RefbuildError
from refbuild.io import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

# VGG-16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Names the published MatConvNet->PyTorch conversion (vgg_face_dag.pth) uses, in module order.
DAG_CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
VGGFACE_MEAN_RGB = (129.186279296875, 104.76238250732422, 93.59396362304688)  # on 0-255 pixels
VGGFACE_SIZE = 224


def vgg16_features() -> nn.Sequential:
    from torch import nn

    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]  # not inplace: we tap conv outputs
            c_in = v
    return nn.Sequential(*layers)


def vgg16_channels(index: int) -> int:
    """Channels of the map after module `index` of `vgg16_features()`, without building it."""
    c, i = 3, -1
    for v in VGG16_CFG:
        i += 1 if v == "M" else 2  # a pool; or a conv and its ReLU
        c = c if v == "M" else v
        if i >= index:
            return c
    raise ValueError(f"VGG-16 has no feature index {index}")


def load_vggface_state(path: Path, expected_sha256: str | None = None,
                       mmap: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Read vgg_face_dag.pth and map its conv weights onto `vgg16_features()` keys.

    Returns (state_dict, sha256 of the file). Loads with weights_only=True: a
    checkpoint never runs code. The file is hashed streaming (it is ~580 MB); mmap=True
    memory-maps the tensors of a zip-format file instead of reading them (to check the
    keys only; the old, non-zip torch format is read whole either way).
    """
    if not path.is_file():
        raise RefbuildError(
            f"{path}: VGGFace weights not found; download vgg_face_dag.pth (the MatConvNet conversion "
            "published with the VGG-Face model) and pass --weights PATH, or use --backbone pixels"
        )
    import torch
    from torch import nn

    sha = sha256_file(path)
    if expected_sha256 and sha != expected_sha256.lower():
        raise RefbuildError(f"{path}: sha256 {sha} does not match --weights-sha256 {expected_sha256}; re-download it")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:
        # torch's own message advises weights_only=False, which would run the file's code: never pass it on
        raise RefbuildError(f"{path}: not a loadable weights file ({type(e).__name__}); give vgg_face_dag.pth "
                            "(a plain dict of tensors), or use --backbone pixels") from None
    if isinstance(raw, dict) and "state_dict" in raw:
        raw = raw["state_dict"]
    conv_idx = [i for i, m in enumerate(vgg16_features()) if isinstance(m, nn.Conv2d)]
    state = {}
    for name, idx in zip(DAG_CONVS, conv_idx):
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            if key not in raw:
                raise RefbuildError(f"{path}: key {key!r} missing; this is not the vgg_face_dag.pth conversion")
            state[f"{idx}.{part}"] = raw[key]
    return state, sha
