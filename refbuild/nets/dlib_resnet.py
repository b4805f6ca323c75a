"""dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1) in torch.

Davis King's network (dlib's examples/dnn_face_recognition_ex.cpp, public domain): 29
convolutions over a 150x150 aligned RGB chip -> a 128-D descriptor; two faces whose descriptors
are closer than 0.6 (Euclidean) are the same person (LFW 99.38% with jittering, 99.13% without).
The weights ship in the PyPI package face_recognition_models (0.3.0) and are read by our reader
of dlib's serialisation (`refbuild.nets.dlib_serial`); dlib itself is never imported.

dlib's definition, innermost first, and how it maps here (forward order):

    input_rgb_image_sized<150>        (x - avg_rgb) / 256          `DlibFaceNet.forward`
    con<32,7,7,2,2> affine relu        stem: 7x7 stride 2, NO padding (150 -> 72)
    max_pool<3,3,2,2>                  3x3 stride 2, no padding (72 -> 35)
    alevel4: 3 x ares<32>              stage1  32 ch, 35x35
    alevel3: ares_down<64>,  3 x ares  stage2  64 ch, 17x17
    alevel2: ares_down<128>, 2 x ares  stage3 128 ch, 8x8
    alevel1: ares_down<256>, 2 x ares  stage4 256 ch, 4x4 (!)
    alevel0: ares_down<256>            stage5 256 ch, 2x2 (!)
    avg_pool_everything, fc_no_bias<128>

- `affine` is dlib's frozen batch norm: y = gamma[c] * x + beta[c] (`Affine`).
- dlib's `con_` pads k//2 only when its stride is 1: a stride-2 3x3 conv has no padding.
- `ares` is relu(x + block(x)), block = affine(con3x3(relu(affine(con3x3(x))))).
  `ares_down` is relu(avg_pool2x2(x) + block(x)) with the block's first conv at stride 2.
- `add_prev` adds tensors of different sizes: the output takes the larger of each dimension and
  each input counts as zero where it has no element (top-left aligned). So the 128-channel skip is
  zero-padded to 256 channels, and where the stride-2 conv and the 2x2 average pool disagree on the
  size (8 -> 3 vs 4; 4 -> 1 vs 2) the block output is zero-padded to the pool's size (`add_padded`).

Layout as timm's: blocks, the model, `state_from_dlib` (the checkpoint filter), `_cfg`, `load_recogniser`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from refbuild.errors import RefbuildError
from refbuild.nets.dlib_serial import DlibFormatError, DlibNet, read_dnn

__all__ = ["DlibFaceNet", "Affine", "ResBlock", "add_padded", "state_from_dlib", "load_recogniser",
           "recogniser_weights_path", "default_cfg", "FEATURE_NAMES"]

CHIP_SIZE = 150
DLIB_AVG_RGB = (122.782, 117.001, 104.298)  # input_rgb_image's defaults; the file's own values are loaded
# (channels, blocks, first block downsamples) per stage, forward order (dlib's alevel4 ... alevel0)
STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
EMBED_DIM = 128
FEATURE_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "embedding")
WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = "pip install face_recognition_models==0.3.0"


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's `add_prev`: a + b over the larger of each dimension, each zero where it has no element."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))  # right, bottom, channels

    return pad(a) + pad(b)


class Affine(nn.Module):
    """dlib's `affine_` (a batch norm frozen into a per-channel scale and shift): B, C, H, W -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))  # dlib's gamma
        self.bias = nn.Parameter(torch.zeros(channels))  # dlib's beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class ResBlock(nn.Module):
    """dlib's `ares` (down=False) or `ares_down` (down=True): B, C_in, H, W -> B, C_out, H', W'."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.down = down
        # dlib's con_ pads k//2 at stride 1 and not at all at stride 2
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 2 if down else 1, 0 if down else 1)
        self.aff1 = Affine(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.aff2 = Affine(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.aff2(self.conv2(F.relu(self.aff1(self.conv1(x)))))  # B, C_out, H', W'
        skip = F.avg_pool2d(x, 2, 2) if self.down else x  # B, C_in, H//2, W//2 (down)
        return F.relu(add_padded(y, skip))


class DlibFaceNet(nn.Module):
    """dlib's face-recognition ResNet: a 150x150 RGB face chip -> 128-D descriptor.

    Input convention (both methods): B, 3, 150, 150 float **RGB on 0..255** (a chip as dlib cuts it:
    `refbuild.nets.chips`), any device and dtype; the net subtracts dlib's mean colour and divides
    by 256 itself, as dlib's input layer does. Batched, differentiable (no in-place ops on its
    input), fine under `torch.autocast(dtype=torch.bfloat16)`.

    Args:
        stages: (channels, blocks, first block downsamples) per stage, forward order.
        embed_dim: descriptor size.
        avg_rgb: the mean colour dlib's input layer subtracts (the file's values replace it on loading).
    """

    def __init__(self, stages: tuple[tuple[int, int, bool], ...] = STAGES, embed_dim: int = EMBED_DIM,
                 avg_rgb: tuple[float, float, float] = DLIB_AVG_RGB):
        super().__init__()
        self.register_buffer("avg_rgb", torch.tensor(avg_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        c = stages[0][0]
        self.stem_conv = nn.Conv2d(3, c, 7, 2, 0)  # stride 2: no padding (dlib's con_ rule)
        self.stem_aff = Affine(c)
        blocks = []
        for width, n, down in stages:
            blocks.append(nn.Sequential(*[ResBlock(c if i == 0 else width, width, down and i == 0) for i in range(n)]))
            c = width
        self.stages = nn.ModuleList(blocks)
        self.fc = nn.Linear(c, embed_dim, bias=False)  # dlib's fc_no_bias

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """B, 3, 150, 150 RGB 0..255 -> every stage's output map and the descriptor:
        stem B,32,35,35; stage1 B,32,35,35; stage2 B,64,17,17; stage3 B,128,8,8; stage4 B,256,4,4;
        stage5 B,256,2,2; embedding B,128 (as `forward`)."""
        out: dict[str, torch.Tensor] = {}
        x = (x - self.avg_rgb.to(x.dtype)) / 256.0
        x = F.relu(self.stem_aff(self.stem_conv(x)))  # B, 32, 72, 72
        x = F.max_pool2d(x, 3, 2)  # B, 32, 35, 35 (no padding, floor)
        out["stem"] = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"stage{i + 1}"] = x
        out["embedding"] = self.fc(x.mean(dim=(2, 3)))  # dlib's avg_pool_everything: B, 256 -> B, 128
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B, 3, 150, 150 RGB 0..255 -> B, 128: dlib's `compute_face_descriptor` of the chips (not
        normalised; dlib's same-person threshold is Euclidean distance 0.6)."""
        return self.forward_features(x)["embedding"]


def _expected_kinds(model: DlibFaceNet) -> list[tuple[str, nn.Module | None]]:
    """The layers dlib's file holds for `model`, in forward order, each with the module it loads into."""
    seq: list[tuple[str, nn.Module | None]] = [("con", model.stem_conv), ("affine", model.stem_aff),
                                              ("relu", None), ("max_pool", None)]
    for stage in model.stages:
        for b in stage:
            seq += [("tag_or_skip", None), ("con", b.conv1), ("affine", b.aff1), ("relu", None),
                    ("con", b.conv2), ("affine", b.aff2)]
            seq += [("tag_or_skip", None), ("tag_or_skip", None), ("avg_pool", None)] if b.down else []
            seq += [("add_prev", None), ("relu", None)]
    return seq + [("avg_pool", None), ("fc", model.fc)]


def state_from_dlib(net: DlibNet, model: DlibFaceNet) -> dict[str, torch.Tensor]:
    """dlib's parsed layers -> `model`'s state_dict (timm's `checkpoint_filter_fn`).

    Checks that the file holds exactly this architecture: the kinds of every layer in order, the
    conv shapes, strides and paddings, the pool windows.

    Raises:
        DlibFormatError: the file is another network.
    """
    expected = _expected_kinds(model)
    kinds = [layer.kind for layer in net.layers]
    if kinds != [k for k, _ in expected]:
        raise DlibFormatError(f"dlib file: layers {kinds[:8]}... are not dlib_face_recognition_resnet_model_v1's")
    names = {m: n for n, m in model.named_modules()}
    state = {"avg_rgb": torch.tensor(net.input["avg_rgb"], dtype=torch.float32).view(1, 3, 1, 1)}
    for layer, (kind, module) in zip(net.layers, expected):
        p = layer.params
        if kind == "con":
            conv: nn.Conv2d = module  # type: ignore[assignment]
            if (tuple(p["weight"].shape) != tuple(conv.weight.shape) or p["stride"] != conv.stride
                    or p["padding"] != conv.padding or p["bias"] is None):
                raise DlibFormatError(f"dlib file: conv {p['weight'].shape} stride {p['stride']} padding "
                                      f"{p['padding']} does not fit {names[conv]} {conv}")
            state[f"{names[conv]}.weight"] = torch.from_numpy(p["weight"])
            state[f"{names[conv]}.bias"] = torch.from_numpy(p["bias"])
        elif kind == "affine":
            if p["gamma"] is None or p["mode"] != 0:
                raise DlibFormatError("dlib file: an affine layer that is disabled or per-element (FC_MODE)")
            state[f"{names[module]}.weight"] = torch.from_numpy(p["gamma"].reshape(-1))
            state[f"{names[module]}.bias"] = torch.from_numpy(p["beta"].reshape(-1))
        elif kind == "fc":
            if p["bias"] is not None:
                raise DlibFormatError("dlib file: the final fc layer has a bias; expected fc_no_bias")
            state[f"{names[module]}.weight"] = torch.from_numpy(np.ascontiguousarray(p["weight"].T))  # out, in
        elif kind in ("max_pool", "avg_pool"):
            want = {"max_pool": (3, 2), "avg_pool": (2, 2)}[kind]
            if p["window"] != (0, 0) and (p["window"] != (want[0],) * 2 or p["stride"] != (want[1],) * 2
                                          or p["padding"] != (0, 0)):
                raise DlibFormatError(f"dlib file: {kind} {p} is not this network's")
    return state


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Weight and preprocessing metadata, apart from the architecture (timm's `_cfg`)."""
    return {"file": WEIGHTS_FILE, "package": "face_recognition_models==0.3.0", "input_size": (3, CHIP_SIZE, CHIP_SIZE),
            "input_range": (0, 255), "chip_padding": 0.25, "same_person_distance": 0.6, "licence": "public domain",
            **kwargs}


default_cfg = _cfg()


def recogniser_weights_path() -> Path:
    """The .dat inside the installed face_recognition_models package, found without importing the
    package (its __init__ needs pkg_resources, which recent setuptools no longer ship).

    Raises:
        RefbuildError: the package or its file is absent, with the command that installs it.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "models" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise RefbuildError(f"dlib's face recogniser weights ({WEIGHTS_FILE}) not found: {INSTALL_HINT}")


def load_recogniser(device: str | torch.device = "cpu", path: Path | None = None) -> DlibFaceNet:
    """dlib's face recogniser with its weights, in eval mode, parameters frozen (requires_grad False;
    gradients still flow to the input, for a training loss), on `device`.

    Raises:
        RefbuildError: the weights are not installed (with the pip command), or the file is not the
            network's (DlibFormatError, a RefbuildError).
    """
    path = path or recogniser_weights_path()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RefbuildError(f"{path}: unreadable ({e.strerror}); reinstall: {INSTALL_HINT}") from None
    model = DlibFaceNet()
    try:
        model.load_state_dict(state_from_dlib(read_dnn(data), model))
    except DlibFormatError as e:
        raise DlibFormatError(f"{path}: {e}; reinstall: pip install --force-reinstall "
                              f"{INSTALL_HINT.split()[-1]}") from None
    return model.requires_grad_(False).eval().to(device)
