"""Feature extractors for `refbuild embed`: VGGFace (VGG-16), a gradient-orientation
descriptor (`hog`, offline) and a pixel baseline.

One input type: a uint8 batch `B, 3, S, S` of RGB face crops. One output type:
a list of feature maps `B, C_l, H_l, W_l`, one per layer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from refbuild.errors import RefbuildError

# VGG-16 "D" configuration; "M" is a 2x2 max-pool.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Names the published MatConvNet->PyTorch conversion (vgg_face_dag.pth) uses, in module order.
DAG_CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
VGGFACE_MEAN_RGB = (129.186279296875, 104.76238250732422, 93.59396362304688)  # on 0-255 pixels
VGGFACE_SIZE = 224
# The paper's layers l = 5, 17, 29: 0-based indices into the VGG-16 `features`
# sequence, output taken after that module: conv2_1, conv4_1, relu5_3 (docs/DESIGN.md).
PAPER_LAYERS = (5, 17, 29)
LAYER_NAMES = {i: n for i, n in enumerate(
    ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
     "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "pool3", "conv4_1", "relu4_1", "conv4_2",
     "relu4_2", "conv4_3", "relu4_3", "pool4", "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3",
     "pool5"])}


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]  # not inplace: we tap conv outputs
            c_in = v
    return nn.Sequential(*layers)


def load_vggface_state(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Read vgg_face_dag.pth and map its conv weights onto `vgg16_features()` keys.

    Returns (state_dict, sha256 of the file). Loads with weights_only=True: a
    checkpoint never runs code.
    """
    if not path.is_file():
        raise RefbuildError(
            f"{path}: VGGFace weights not found; download vgg_face_dag.pth (the MatConvNet conversion "
            "published with the VGG-Face model) and pass --weights PATH, or use --backbone pixels"
        )
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected_sha256 and sha != expected_sha256.lower():
        raise RefbuildError(f"{path}: sha256 {sha} does not match --weights-sha256 {expected_sha256}; re-download it")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
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


HOG_SIZE, HOG_BINS = 64, 9


def hog_maps(x: torch.Tensor) -> list[torch.Tensor]:
    """B, 3, S, S float 0..255 -> [B, 9, 64, 64 gradient-orientation map; B, 3, 16, 16 colour].

    HOG (Dalal & Triggs) without blocks: the grey image at 64x64, central-difference
    gradients, unsigned orientation soft-binned into 9 bins weighted by magnitude; the
    square root (Hellinger) tames strong edges. `describe` pools both to the grid and
    L2-normalises each, so shape (orientation layout) and colour count alike in Eq. 2.
    """
    x = F.interpolate(x / 255.0, size=(HOG_SIZE, HOG_SIZE), mode="area")  # B, 3, 64, 64
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    g = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx = g[..., 1:-1, 2:] - g[..., 1:-1, :-2]  # B, 1, 64, 64
    gy = g[..., 2:, 1:-1] - g[..., :-2, 1:-1]
    mag = torch.sqrt(gx * gx + gy * gy)
    pos = torch.remainder(torch.atan2(gy, gx), torch.pi) / torch.pi * HOG_BINS  # 0..9
    lo = pos.floor()
    frac = pos - lo
    bins = torch.arange(HOG_BINS, device=x.device).view(1, -1, 1, 1)
    hist = mag * ((1 - frac) * (bins == lo.remainder(HOG_BINS)) + frac * (bins == (lo + 1).remainder(HOG_BINS)))
    colour = F.interpolate(x, size=(16, 16), mode="area")
    return [hist.sqrt(), colour - colour.mean(dim=(1, 2, 3), keepdim=True)]


@dataclass
class Backbone:
    """A feature extractor: `maps(batch_uint8) -> [B, C_l, H_l, W_l]` per layer."""

    name: str
    layer_names: list[str]
    weights_id: str  # sha256 of the weights file, "random-seed<N>", or "none"
    note: str  # said in every output: what these features are
    default_grid: int
    module: nn.Module | None = None
    taps: tuple[int, ...] = ()

    def to(self, device: torch.device) -> "Backbone":
        if self.module is not None:
            self.module.to(device, memory_format=torch.channels_last)
        return self

    @torch.inference_mode()
    def maps(self, batch: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        """precision: "fp32", or "bf16" (autocast; ~2x on GPUs and on CPUs with AVX512-BF16 or AMX,
        features within ~1% of fp32). The maps come back float32 either way."""
        x = batch.float()  # B, 3, S, S in 0..255
        if self.name == "pixels":
            x = F.interpolate(x / 255.0, size=(16, 16), mode="area")  # B, 3, 16, 16
            return [x - x.mean(dim=(1, 2, 3), keepdim=True)]
        if self.name == "hog":
            return hog_maps(x)
        x = F.interpolate(x, size=(VGGFACE_SIZE, VGGFACE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = x - torch.tensor(VGGFACE_MEAN_RGB, device=x.device).view(1, 3, 1, 1)
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN/cuDNN's fast layout: ~1.3x on CPU too
        out = []
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for i, layer in enumerate(self.module):
                x = layer(x)
                if i in self.taps:
                    out.append(x.float())
                if i >= max(self.taps):
                    break
        return out


def build_backbone(name: str, weights: str | None = None, weights_sha256: str | None = None,
                   layers: tuple[int, ...] = PAPER_LAYERS) -> Backbone:
    """Args:
        name: "vggface", "hog" or "pixels".
        weights: for vggface, a path to vgg_face_dag.pth, or "random" (tests only).
    """
    if name == "pixels":
        return Backbone("pixels", ["pixels16"], "none", "pixels: 16x16 RGB, mean-removed (baseline, no network)", 16)
    if name == "hog":
        return Backbone("hog", ["hog9", "colour16"], "none",
                        "hog: 9-bin gradient orientations + mean-removed colour (offline, no network)", 8)
    if name != "vggface":
        raise RefbuildError(f"unknown backbone {name!r}; use vggface, hog or pixels")
    if not layers or any(i not in LAYER_NAMES for i in layers):
        raise RefbuildError(f"layers {layers}: VGG-16 feature indices run from 0 to 30")
    feats = vgg16_features().eval()
    names = [f"{i}:{LAYER_NAMES[i]}" for i in layers]
    if weights in (None, ""):
        raise RefbuildError("--weights is required for --backbone vggface: a path to vgg_face_dag.pth; without it use --backbone hog or --backbone pixels (offline)")
    if weights == "random":
        torch.manual_seed(0)
        feats = vgg16_features().eval()
        return Backbone("vggface", names, "random-seed0",
                        "RANDOM WEIGHTS, NOT VGGFace: for tests only; these features do not measure face similarity",
                        2, feats, tuple(layers))
    state, sha = load_vggface_state(Path(weights), weights_sha256)
    feats.load_state_dict(state)
    return Backbone("vggface", names, sha, f"VGGFace (vgg_face_dag.pth sha256 {sha[:12]})", 2, feats, tuple(layers))
