"""Safe image decoding: every failure becomes a reject with a reason code.

One input type (a path), one output type (`Decoded`, an 8-bit RGB PIL image
with EXIF orientation applied) or a `BadImage` carrying the reason.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from refbuild.errors import RefbuildError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

REJECT_REASONS = {
    "unreadable": "the file could not be opened or read",
    "not_an_image": "the bytes are not an image format PIL understands",
    "corrupt": "the image data is truncated or damaged",
    "too_large": "more pixels than --max-pixels (decompression-bomb guard)",
    "too_small": "an image side is below --min-image-side",
    "unsupported_mode": "a pixel format that cannot be converted to RGB",
    "outside_source": "a symbolic link that points outside the source folder",
    "missing_file": "listed in the labels file but not present",
    "no_face": "MTCNN found no face",
    "face_too_small": "every face found is smaller than --min-face",
    "detector_error": "the detector failed on this image",
}


class BadImage(RefbuildError):
    """An image that cannot be used; detect records it as a reject of `reason` (one of REJECT_REASONS)."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # mode RGB, EXIF orientation applied
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, LAB, HSV, 1


def decode(data: bytes, *, max_pixels: int, min_side: int, name: str = "<bytes>") -> Decoded:
    """Decode image bytes to RGB. Raises BadImage with a reason code."""
    import io

    sha = hashlib.sha256(data).hexdigest()
    if not data:
        raise BadImage("not_an_image", f"{name}: empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImage("not_an_image", f"{name}: not an image PIL can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("too_large", f"{name}: {e}") from None
        except Exception as e:  # PIL raises many types for broken headers
            raise BadImage("corrupt", f"{name}: bad header ({type(e).__name__}: {e})") from None
        w, h = img.size
        if w * h > max_pixels:
            raise BadImage("too_large", f"{name}: {w}x{h} has more than {max_pixels} pixels")
        if min(w, h) < min_side:
            raise BadImage("too_small", f"{name}: {w}x{h} is below {min_side} px on a side")
        try:
            img.load()
            img = ImageOps.exif_transpose(img) or img
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("too_large", f"{name}: {e}") from None
        except Exception as e:  # truncated / corrupt data
            raise BadImage("corrupt", f"{name}: {type(e).__name__}: {e}") from None
    try:
        rgb = _to_rgb(img)
    except Exception as e:
        raise BadImage("unsupported_mode", f"{name}: mode {img.mode}: {e}") from None
    return Decoded(rgb, sha)


def read_and_decode(path: Path, *, max_pixels: int, min_side: int, name: str) -> Decoded:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadImage("unreadable", f"{name}: {e.strerror or e}") from None
    return decode(data, max_pixels=max_pixels, min_side=min_side, name=name)


def list_images(src: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under `src`, as sorted POSIX paths relative to it.

    Returns (paths, outside) where `outside` lists (path, target) for symbolic
    links that resolve outside `src`; those are never read. Broken links (dangling,
    or a loop) are listed in `paths`: reading them fails, so each becomes an
    `unreadable` reject instead of vanishing. Special files (FIFOs, sockets,
    devices) are skipped: they hold no image, and reading a FIFO would block.
    """
    root = src.resolve()
    paths, outside = [], []
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTS or p.name.startswith(".tmp-"):
            continue
        rel = p.relative_to(src).as_posix()
        try:
            real = p.resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            paths.append(rel)
            continue
        if not real.is_relative_to(root):
            outside.append((rel, str(real)))
            continue
        if real.is_file() or (p.is_symlink() and not real.exists()):
            paths.append(rel)
    return paths, outside
