"""Feature extractors for `refbuild embed`: VGGFace (VGG-16), a gradient-orientation
descriptor (`hog`, offline) and a pixel baseline.

One input type: a uint8 batch `B, 3, S, S` of RGB face crops. One output type:
a list of feature maps `B, C_l, H_l, W_l`, one per layer. One class per backbone,
registered by name (`BACKBONES`, like timm's models); torch is imported only when a
backbone is built or run, so the command line can list the names without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from refbuild.errors import RefbuildError
from refbuild.nets.vggface import (  # noqa: F401  (the VGGFace network; its names stay importable from here)
    DAG_CONVS, VGG16_CFG, VGGFACE_MEAN_RGB, VGGFACE_SIZE, load_vggface_state, vgg16_channels, vgg16_features)

if TYPE_CHECKING:
    import torch
    from torch import nn

# The paper's layers l = 5, 17, 29: 0-based indices into the VGG-16 `features`
# sequence, output taken after that module: conv2_1, conv4_1, relu5_3 (docs/DESIGN.md).
PAPER_LAYERS = (5, 17, 29)
LAYER_NAMES = {i: n for i, n in enumerate(
    ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1", "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
     "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "pool3", "conv4_1", "relu4_1", "conv4_2",
     "relu4_2", "conv4_3", "relu4_3", "pool4", "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3",
     "pool5"])}


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


DLIB_HEADER = b"\x01\x01\x01\x0dloss_metric_2"  # add_loss_layer version 1, then its loss's name (dlib_serial)


@register_backbone
class DlibFace(Backbone):
    """dlib's face-recognition ResNet (`refbuild.nets.dlib_resnet`) on each crop's 150x150 chip, cut
    through the fixed aligned-crop template (`refbuild.nets.chips.chips_from_aligned`): an early and a
    middle stage map and the 128-D identity descriptor (a 1x1 map), the last slice."""

    name = "dlib"
    help = "dlib's face recogniser, offline; the last slice is its 128-D identity embedding"
    default_grid = 1  # the last slice is then the 128-D descriptor itself (grid 2 repeats it 4 times)
    needs_model = True
    TAPS = ("stage1", "stage3", "embedding")  # 32 ch 35x35 (7 convs), 128 ch 8x8 (21 convs), 128-D (29 convs)

    def __init__(self, weights: str | None = None, weights_sha256: str | None = None,
                 layers: tuple[int, ...] = PAPER_LAYERS):
        super().__init__()
        from refbuild.io import sha256_file
        from refbuild.nets.dlib_resnet import recogniser_weights_path

        self.layer_names, self.channels = list(self.TAPS), [32, 128, 128]
        self.weights, self.module = weights, None
        if weights == "random":
            self.weights_id = "random-seed0"
            self.note = "RANDOM WEIGHTS, NOT dlib's recogniser: for tests only; these features do not measure identity"
            return
        self.path = Path(weights) if weights else recogniser_weights_path()  # raises with the pip command
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(DLIB_HEADER))
        except OSError as e:
            raise RefbuildError(f"{self.path}: dlib recogniser weights unreadable ({e.strerror}); omit --weights "
                                "to use the installed face_recognition_models package") from None
        if head != DLIB_HEADER:  # e.g. MSRFACE_VGGFACE_WEIGHTS, exported for vggface, reaching --weights
            raise RefbuildError(f"{self.path}: not dlib's face recogniser (.dat); omit --weights and unset "
                                "MSRFACE_VGGFACE_WEIGHTS to use the installed face_recognition_models package")
        self.weights_id = sha256_file(self.path)
        if weights_sha256 and self.weights_id != weights_sha256.lower():
            raise RefbuildError(f"{self.path}: sha256 {self.weights_id} does not match --weights-sha256 {weights_sha256}")
        self.note = (f"dlib face recogniser ({self.path.name} sha256 {self.weights_id[:12]}); chips through the "
                     "aligned-crop template; layers stage1, stage3, 128-D embedding")

    def load(self) -> "DlibFace":
        import torch

        from refbuild.nets.dlib_resnet import DlibFaceNet, load_recogniser

        if self.module is None:
            if self.weights == "random":
                with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
                    torch.manual_seed(0)
                    self.module = DlibFaceNet().requires_grad_(False).eval()
            else:
                self.module = load_recogniser("cpu", self.path)
        return self

    def to(self, device: torch.device) -> "DlibFace":
        import torch

        if self.module is not None:
            self.module.to(device, memory_format=torch.channels_last)
        return self

    def maps(self, batch: torch.Tensor, precision: str = "fp32") -> list[torch.Tensor]:
        """precision: "fp32", or "bf16" (autocast). B, 3, S, S uint8 aligned crops -> [B, 32, 35, 35;
        B, 128, 8, 8; B, 128, 1, 1], float32."""
        import torch

        from refbuild.nets.chips import chips_from_aligned

        self.load()
        with torch.inference_mode():
            x = chips_from_aligned(batch.float()).contiguous(memory_format=torch.channels_last)  # B, 3, 150, 150
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                feats = self.module.forward_features(x)
            return [feats["stage1"].float(), feats["stage3"].float(), feats["embedding"].float()[:, :, None, None]]


def build_backbone(name: str, weights: str | None = None, weights_sha256: str | None = None,
                   layers: tuple[int, ...] = PAPER_LAYERS, load: bool = True) -> Backbone:
    """The registered backbone `name` (a key of BACKBONES).

    Args:
        weights: for vggface, a path to vgg_face_dag.pth, or "random" (tests only); for dlib, None (the
            installed face_recognition_models' .dat), a path to that .dat, or "random".
        load: False: only describe the features (names, channels, weights_id), build no network.
    """
    if name not in BACKBONES:
        raise RefbuildError(f"unknown backbone {name!r}; use {_one_of(list(BACKBONES))}")
    backbone = BACKBONES[name](weights, weights_sha256, tuple(layers))
    return backbone.load() if load else backbone
