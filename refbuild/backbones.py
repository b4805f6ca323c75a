"""Feature extractors for `refbuild embed`: VGGFace (VGG-16), a gradient-orientation
descriptor (`hog`, offline) and a pixel baseline.

One input type: a uint8 batch `B, 3, S, S` of RGB face crops. One output type:
a list of feature maps `B, C_l, H_l, W_l`, one per layer. One class per backbone,
registered by name (`BACKBONES`, like timm's models); torch is imported only when a
backbone is built or run, so the command line can list the names without it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

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
# The paper's layers l = 5, 17, 29: 0-based indices into the VGG-16 `features`
# sequence, output taken after that module: conv2_1, conv4_1, relu5_3 (docs/DESIGN.md).
PAPER_LAYERS = (5, 17, 29)
LAYER_NAMES = {i: n for i, n in enumerate(
    ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
     "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "pool3", "conv4_1", "relu4_1", "conv4_2",
     "relu4_2", "conv4_3", "relu4_3", "pool4", "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3",
     "pool5"])}


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


HOG_SIZE, HOG_BINS = 64, 9


def hog_maps(x: torch.Tensor) -> list[torch.Tensor]:
    """B, 3, S, S float 0..255 -> [B, 9, 64, 64 gradient-orientation map; B, 3, 16, 16 colour].

    HOG (Dalal & Triggs) without blocks: the grey image at 64x64, central-difference
    gradients, unsigned orientation soft-binned into 9 bins weighted by magnitude; the
    square root (Hellinger) tames strong edges. `describe` pools both to the grid and
    L2-normalises each, so shape (orientation layout) and colour count alike in Eq. 2.
    """
    import torch
    import torch.nn.functional as F

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


class Backbone:
    """A feature extractor: `maps(batch_uint8) -> [B, C_l, H_l, W_l]` per layer.

    One subclass per backbone, registered by name (`@register_backbone`): that class is all
    a new backbone needs (`build_backbone`, `refbuild embed --backbone` and the registry-driven
    test find it). The constructor only says what the features are (`layer_names`, `channels`,
    `weights_id`, `note`): cheap, so the driver learns the feature size without a network;
    `load()` builds the network, once per worker.
    """

    name: ClassVar[str]
    help: ClassVar[str]  # for `refbuild embed --help`
    default_grid: ClassVar[int]
    needs_model: ClassVar[bool] = False  # a network: worth one worker per CPU core

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None,
                 layers: tuple[int, ...] = PAPER_LAYERS):
        self.layer_names: list[str] = []
        self.channels: list[int] = []  # C_l of each map
        self.weights_id = "none"  # sha256 of the weights file, "random-seed<N>", or "none"
        self.note = ""  # said in every output: what these features are

    def load(self) -> "Backbone":
        return self

    def to(self, device: torch.device) -> "Backbone":
        return self

    def maps(self, batch: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        """B, 3, S, S uint8 -> one float32 map per layer."""
        raise NotImplementedError


BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: `cls` becomes buildable by its `name`."""
    BACKBONES[cls.name] = cls
    return cls


def _one_of(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def backbones_help() -> str:
    """`--backbone` help, from the registry: 'a (what a is), b (...) or c (...).'"""
    return _one_of([f"{n} ({c.help})" for n, c in BACKBONES.items()]) + "."


@register_backbone
class VggFace(Backbone):
    """VGG-16 with the VGGFace weights (vgg_face_dag.pth), maps tapped after `layers`."""

    name = "vggface"
    help = "VGG-16, the paper's"
    default_grid = 2
    needs_model = True

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None,
                 layers: tuple[int, ...] = PAPER_LAYERS):
        super().__init__()
        if not layers or any(i not in LAYER_NAMES for i in layers):
            raise RefbuildError(f"layers {layers}: VGG-16 feature indices run from 0 to 30")
        if weights in (None, ""):
            raise RefbuildError("--weights is required for --backbone vggface: a path to vgg_face_dag.pth; "
                                "without it use --backbone hog or --backbone pixels (offline)")
        self.weights, self.weights_sha256, self.taps = weights, weights_sha256, tuple(layers)
        self.layer_names = [f"{i}:{LAYER_NAMES[i]}" for i in layers]
        self.channels = [vgg16_channels(i) for i in layers]
        self.module: nn.Module | None = None
        if weights == "random":
            self.weights_id = "random-seed0"
            self.note = "RANDOM WEIGHTS, NOT VGGFace: for tests only; these features do not measure face similarity"
        else:  # hashed and checked here (streamed; the tensors memory-mapped), loaded by `load()`
            _, self.weights_id = load_vggface_state(Path(weights), weights_sha256, mmap=True)
            self.note = f"VGGFace (vgg_face_dag.pth sha256 {self.weights_id[:12]})"

    def load(self) -> "VggFace":
        import torch

        if self.module is None:
            if self.weights == "random":
                with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
                    torch.manual_seed(0)
                    self.module = vgg16_features().eval()
            else:
                feats = vgg16_features().eval()
                state, _ = load_vggface_state(Path(self.weights), self.weights_sha256)
                feats.load_state_dict(state)
                self.module = feats
        return self

    def to(self, device: torch.device) -> "VggFace":
        import torch

        if self.module is not None:
            self.module.to(device, memory_format=torch.channels_last)
        return self

    def maps(self, batch: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        """precision: "fp32", or "bf16" (autocast; ~2x on GPUs and on CPUs with AVX512-BF16 or AMX,
        features within ~1% of fp32). The maps come back float32 either way."""
        import torch
        import torch.nn.functional as F

        self.load()
        out = []
        with torch.inference_mode():
            x = batch.float()  # B, 3, S, S in 0..255
            x = F.interpolate(x, size=(VGGFACE_SIZE, VGGFACE_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
            x = x - torch.tensor(VGGFACE_MEAN_RGB, device=x.device).view(1, 3, 1, 1)
            x = x.contiguous(memory_format=torch.channels_last)  # oneDNN/cuDNN's fast layout: ~1.3x on CPU too
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                for i, layer in enumerate(self.module):
                    x = layer(x)
                    if i in self.taps:
                        out.append(x.float())
                    if i >= max(self.taps):
                        break
        return out


@register_backbone
class Hog(Backbone):
    """Gradient orientations + colour (`hog_maps`): offline, no weights."""

    name = "hog"
    help = "gradient orientations + colour, offline"
    default_grid = 8

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None,
                 layers: tuple[int, ...] = PAPER_LAYERS):
        super().__init__()
        self.layer_names, self.channels = ["hog9", "colour16"], [HOG_BINS, 3]
        self.note = "hog: 9-bin gradient orientations + mean-removed colour (offline, no network)"

    def maps(self, batch: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        import torch

        with torch.inference_mode():
            return hog_maps(batch.float())


@register_backbone
class Pixels(Backbone):
    """The baseline: a 16x16 thumbnail."""

    name = "pixels"
    help = "baseline, no weights"
    default_grid = 16

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None,
                 layers: tuple[int, ...] = PAPER_LAYERS):
        super().__init__()
        self.layer_names, self.channels = ["pixels16"], [3]
        self.note = "pixels: 16x16 RGB, mean-removed (baseline, no network)"

    def maps(self, batch: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            x = F.interpolate(batch.float() / 255.0, size=(16, 16), mode="area")  # B, 3, 16, 16
            return [x - x.mean(dim=(1, 2, 3), keepdim=True)]


def build_backbone(name: str, weights: str | None = None, weights_sha256: str | None = None,
                   layers: tuple[int, ...] = PAPER_LAYERS, load: bool = True) -> Backbone:
    """The registered backbone `name` (a key of BACKBONES).

    Args:
        weights: for vggface, a path to vgg_face_dag.pth, or "random" (tests only).
        load: False: only describe the features (names, channels, weights_id), build no network.
    """
    if name not in BACKBONES:
        raise RefbuildError(f"unknown backbone {name!r}; use {_one_of(list(BACKBONES))}")
    backbone = BACKBONES[name](weights, weights_sha256, tuple(layers))
    return backbone.load() if load else backbone
