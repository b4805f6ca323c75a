"""How a 16 px face is made from its HR crop: the paper's bicubic, or what cameras give.

Pure, seeded functions: `sample(name, rng, scale)` draws the parameters of one
degradation from a named preset, `apply(hr, params)` makes the LR from the HR
crop. Same rng state, same parameters; same parameters, same LR bytes. Training
draws with the sample's own rng (seed, key), evaluation with (seed, face index),
so a score on realistic inputs is reproducible and the parameters are recorded.

Presets (ranges adapted to a 16 px output; blur sigmas are in LR pixels, i.e.
HR pixels / scale, so one preset serves x4, x8 and x16):

- `bicubic`: the paper's and the benchmark's setting: HR -> 16 px, bicubic.
- `real` (training): with p 0.15 a clean resize (bicubic, bilinear or area);
  else first order blur (isotropic or anisotropic Gaussian,
  sigma 0.1-0.9 LR px, i.e. 0.8-7 HR px at x8; none with p 0.15) -> resize to
  16 px with a random kernel (bicubic, bilinear, area, or bilinear without
  antialiasing as a naive camera scaler does) -> Gaussian noise (sigma 0-20 of
  255, grey or colour; none with p 0.2) -> JPEG (quality 30-95; none with p 0.1),
  then with p 0.3 a second order at 16 px (blur 0.2-0.6 px, noise 0-10, JPEG
  50-95), as Real-ESRGAN. Wider than GFPGAN's (blur 0.1-10 px at 512, noise 0-20,
  JPEG 60-100) at the low end of quality, since our inputs are 16 px, and close
  to CodeFormer's (JPEG 30-80).
- `real_mild` (training): the same pipeline narrowed toward what phone and
  surveillance cameras give, with more clean faces: with p 0.3 a clean resize;
  else blur sigma 0.1-0.6 LR px (none with p 0.2; anisotropic with p 0.3) ->
  a random resize kernel -> noise 0-15 (none with p 0.25) -> JPEG 35-95 (none
  with p 0.15), then with p 0.15 a second order (blur 0.2-0.4 px, noise 0-5,
  JPEG 60-95). Measured against `real` in RESULTS.md 0.8: a 1.4M-parameter
  network spends less of itself on inputs no camera gives.
  (`real` and `real_mild` are two `Mix`es of one pipeline: `MIXES`.)
- `camera` (evaluation): one fixed-range camera pipeline, not the training
  sampler: Gaussian blur 0.1-0.4 LR px, bilinear downscale, Gaussian noise 0-10,
  JPEG 40-80. Scoring a model on the very sampler it was trained on would
  flatter it.
- `harsh` (evaluation): blur 0.25-0.5 px + noise 5-15 + JPEG 40-60.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .msrnet import LR_SIZE
TRAIN_PRESETS = ("bicubic", "real", "real_mild")  # model/cli.py's enums list these by hand (a fast --help)
PRESETS = (*TRAIN_PRESETS, "camera", "harsh")
RESIZE_KERNELS = ("bicubic", "bilinear", "area", "bilinear_naive")


@dataclass(frozen=True)
class Mix:
    """The ranges of a training mix: a clean share, else a first order and maybe a second."""

    p_clean: float  # a clean resize (bicubic, bilinear or area): the model must not spoil a good 16 px face
    blur_max: float  # first-order Gaussian blur, sigma 0.1..blur_max LR px
    p_no_blur: float
    p_anisotropic: float
    noise_max: float  # of 255
    p_no_noise: float
    jpeg_min: int  # quality jpeg_min..95
    p_no_jpeg: float
    p_second: float  # a second order at 16 px: blur 0.2..second_blur_max (p 0.5), noise, JPEG
    second_blur_max: float
    second_noise_max: float
    second_jpeg_min: int


MIXES = {  # the draw order in `_mixed` is part of a run's inputs: a test pins it
    "real": Mix(p_clean=0.15, blur_max=0.9, p_no_blur=0.15, p_anisotropic=0.4, noise_max=20.0, p_no_noise=0.2,
                jpeg_min=30, p_no_jpeg=0.1, p_second=0.3, second_blur_max=0.6, second_noise_max=10.0,
                second_jpeg_min=50),
    "real_mild": Mix(p_clean=0.3, blur_max=0.6, p_no_blur=0.2, p_anisotropic=0.3, noise_max=15.0, p_no_noise=0.25,
                     jpeg_min=35, p_no_jpeg=0.15, p_second=0.15, second_blur_max=0.4, second_noise_max=5.0,
                     second_jpeg_min=60),
}
_PIL_KERNEL = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "area": Image.BOX}


@dataclass(frozen=True)
class Blur:
    sigma_x: float  # LR pixels
    sigma_y: float
    theta: float  # radians


@dataclass(frozen=True)
class Stage:
    """One order of degradation: blur -> resize to 16 px -> noise -> JPEG (each may be absent)."""

    blur: Blur | None = None
    resize: str = "bicubic"
    noise_sigma: float = 0.0  # of 255
    noise_gray: bool = True
    noise_seed: int = 0
    jpeg_quality: int | None = None


@dataclass(frozen=True)
class Degradation:
    preset: str
    first: Stage
    second: Stage | None = None

    def to_json(self) -> dict:
        return asdict(self)


def sample(preset: str, rng: random.Random, scale: int) -> Degradation:
    """Draw one degradation of `preset` (see the module docstring) from `rng`."""
    if preset == "bicubic":
        return Degradation("bicubic", Stage())
    if preset in MIXES:
        return _mixed(preset, MIXES[preset], rng)
    if preset == "camera":
        return Degradation("camera", Stage(_blur(rng, 0.1, 0.4, False), "bilinear", *_noise(rng, 0.0, 10.0, 0.0),
                                           jpeg_quality=rng.randint(40, 80)))
    if preset == "harsh":
        return Degradation("harsh", Stage(_blur(rng, 0.25, 0.5, False), "bilinear", *_noise(rng, 5.0, 15.0, 0.0),
                                          jpeg_quality=rng.randint(40, 60)))
    raise ValueError(f"degradation {preset!r}: choose one of {', '.join(PRESETS)}")


def _mixed(preset: str, m: Mix, rng: random.Random) -> Degradation:
    if rng.random() < m.p_clean:
        return Degradation(preset, Stage(None, rng.choice(("bicubic", "bilinear", "area"))))
    blur = None
    if rng.random() >= m.p_no_blur:
        blur = _blur(rng, 0.1, m.blur_max, anisotropic=rng.random() < m.p_anisotropic)
    first = Stage(blur, rng.choice(RESIZE_KERNELS), *_noise(rng, 0.0, m.noise_max, p_none=m.p_no_noise),
                  jpeg_quality=None if rng.random() < m.p_no_jpeg else rng.randint(m.jpeg_min, 95))
    second = None
    if rng.random() < m.p_second:
        second = Stage(_blur(rng, 0.2, m.second_blur_max, False) if rng.random() < 0.5 else None, "bicubic",
                       *_noise(rng, 0.0, m.second_noise_max, p_none=0.5),
                       jpeg_quality=rng.randint(m.second_jpeg_min, 95))
    return Degradation(preset, first, second)


def _blur(rng: random.Random, lo: float, hi: float, anisotropic: bool) -> Blur:
    sx = rng.uniform(lo, hi)
    sy = rng.uniform(lo, hi) if anisotropic else sx
    return Blur(sx, sy, rng.uniform(0, math.pi) if anisotropic else 0.0)


def _noise(rng: random.Random, lo: float, hi: float, p_none: float) -> tuple[float, bool, int]:
    sigma = 0.0 if rng.random() < p_none else rng.uniform(lo, hi)
    return sigma, rng.random() < 0.4, rng.getrandbits(31)


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """Anisotropic Gaussian, rotated by theta, normalised to sum 1: K, K with K odd, >= 3 sigma each side."""
    r = max(1, math.ceil(3 * max(sigma_x, sigma_y)))
    y, x = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _to_t(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # 3, H, W in 0..255


def _to_im(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


BLUR_SIDE = 4 * LR_SIZE  # first-order blur runs at 64 px (after an area downscale): 16x fewer taps than at 128


def _stage(im: Image.Image, st: Stage, px: float) -> Image.Image:
    """One order on `im`; `px` = im's pixels per LR pixel (blur sigmas are in LR pixels)."""
    if st.blur is not None and im.size[0] > BLUR_SIDE:
        im, px = im.resize((BLUR_SIDE, BLUR_SIDE), Image.BOX), BLUR_SIDE / LR_SIZE
    if st.blur is not None:
        k = gaussian_kernel(max(st.blur.sigma_x * px, 0.2), max(st.blur.sigma_y * px, 0.2), st.blur.theta)
        t = _to_t(im)[:, None]  # 3, 1, H, W
        pad = k.shape[-1] // 2
        t = F.conv2d(F.pad(t, (pad,) * 4, mode="reflect" if pad < min(im.size) else "replicate"), k[None, None])
        im = _to_im(t[:, 0])
    if im.size != (LR_SIZE, LR_SIZE):
        if st.resize == "bilinear_naive":  # no antialiasing: each LR pixel samples 2x2 HR pixels, as cheap scalers
            t = F.interpolate(_to_t(im)[None], size=(LR_SIZE, LR_SIZE), mode="bilinear", align_corners=False)[0]
            im = _to_im(t)
        else:
            im = im.resize((LR_SIZE, LR_SIZE), _PIL_KERNEL[st.resize])
    if st.noise_sigma > 0:
        g = torch.Generator().manual_seed(st.noise_seed)
        shape = (1, LR_SIZE, LR_SIZE) if st.noise_gray else (3, LR_SIZE, LR_SIZE)
        im = _to_im(_to_t(im) + st.noise_sigma * torch.randn(shape, generator=g))
    if st.jpeg_quality is not None:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=st.jpeg_quality)
        with Image.open(io.BytesIO(buf.getvalue())) as j:
            im = j.convert("RGB")
    return im


def apply(hr: Image.Image, d: Degradation) -> Image.Image:
    """HR crop (square, any side) -> its 16x16 RGB LR under `d`. Deterministic."""
    if d.preset == "bicubic":
        return hr.resize((LR_SIZE, LR_SIZE), Image.BICUBIC)
    lr = _stage(hr, d.first, hr.size[0] / LR_SIZE)
    return _stage(lr, d.second, 1.0) if d.second is not None else lr


__all__ = ["Blur", "Degradation", "MIXES", "Mix", "PRESETS", "Stage", "TRAIN_PRESETS", "apply", "gaussian_kernel",
           "sample"]
