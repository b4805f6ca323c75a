"""A folder of bad and awkward inputs, generated at run time, with the outcome each may have.

`make_bad_inputs(src, outside, base)` writes the files under `src` (and link
targets under `outside`, a folder beside it) from one `base` RGB image: a
synthetic pattern for the `--aligned` runs, a real face photo for the MTCNN
runs. It returns {relative path: allowed outcomes}, an outcome being "face" or
a reject reason of refbuild.images.REJECT_REASONS.

The byte-level generators are those of tests/refbuild/test_refbuild_images.py.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from test_refbuild_images import _encode, _flip, _png_claiming

FACE = {"face"}
BROKEN = {"corrupt", "not_an_image"}  # which one depends on how far the header survives

# exif_transpose applies these to orientations 2..8; each is stored with the inverse applied
_EXIF_OPS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}
_INVERSE = {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270}


def exif_jpeg(base: Image.Image, orientation: int) -> bytes:
    """A JPEG that displays as `base` once its EXIF orientation is applied."""
    stored = base
    if orientation in _EXIF_OPS:
        op = _EXIF_OPS[orientation]
        stored = base.transpose(_INVERSE.get(op, op))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", exif=exif.tobytes(), quality=92)


def _sixteen_bit(base: Image.Image) -> Image.Image:
    a = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(a)  # mode I;16


def _float(base: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 255.0, "F")


def _animated(base: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    base.save(buf, format=fmt, save_all=True, append_images=[base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
              duration=100, loop=0)
    return buf.getvalue()


def _bad_crc(base: Image.Image) -> bytes:
    data = bytearray(_encode(base, "PNG"))
    data[29] ^= 0xFF  # the IHDR CRC
    return bytes(data)


def make_bad_inputs(src: Path, outside: Path, base: Image.Image, mtcnn: bool = False) -> dict[str, set[str]]:
    """Write the inputs; return the allowed outcomes per relative path.

    mtcnn: the run detects faces (not --aligned), so a decodable image may also be
    `no_face` where the conversion destroys the face (1-bit dithering).
    """
    src.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    NOFACE = {"no_face"} if mtcnn else set()  # a damaged file that still decodes shows no face to MTCNN
    files: dict[str, tuple[bytes, set[str]]] = {}
    jpg, png, webp = _encode(base, "JPEG", quality=92), _encode(base, "PNG"), _encode(base, "WEBP", quality=90)
    # damaged bytes
    for ext, data in (("jpg", jpg), ("png", png), ("webp", webp)):
        files[f"damaged/truncated_half.{ext}"] = (data[: len(data) // 2], {"corrupt"} | ({"not_an_image"} if ext == "webp" else set()))
        files[f"damaged/truncated_20_bytes.{ext}"] = (data[:20], BROKEN)
        files[f"damaged/truncated_last_byte.{ext}"] = (data[:-1], {"corrupt"} | FACE | NOFACE)  # decoders may pad one byte
        files[f"damaged/zero_bytes.{ext}"] = (b"", {"not_an_image"})
    files["damaged/bit_flipped.png"] = (_flip(png, 100, 50), {"corrupt"})
    files["damaged/bit_flipped.jpg"] = (_flip(jpg, 400, 37), {"corrupt"} | FACE | NOFACE)  # JPEG may resynchronise
    files["damaged/bit_flipped.webp"] = (_flip(webp, 60, 41), BROKEN | FACE | NOFACE)  # garbage pixels: no face
    files["damaged/bad_crc.png"] = (_bad_crc(base), BROKEN)  # PIL checks the IHDR CRC while identifying
    # not images at all, with image names
    files["not_images/notes.jpg"] = (b"this is not an image\n" * 40, {"not_an_image"})
    files["not_images/page.png"] = (b"<html><body>404 not found</body></html>\n", {"not_an_image"})
    files["not_images/random.webp"] = (np.random.default_rng(1).bytes(4096), {"not_an_image"})
    files["not_images/report.jpeg"] = (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 10, {"not_an_image"})
    files["not_images/archive.tif"] = (b"PK\x03\x04" + bytes(300), {"not_an_image"})
    # sizes
    files["sizes/bomb_20000x20000.png"] = (_encode(Image.new("1", (20000, 20000)), "PNG"), {"too_large"})
    files["sizes/header_claims_20000x20000.png"] = (_png_claiming(20000, 20000), {"too_large"})
    files["sizes/header_claims_9000x9000.png"] = (_png_claiming(9000, 9000), {"too_large"})  # under PIL's limit, over ours
    files["sizes/one_pixel.png"] = (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), {"too_small"})
    files["sizes/one_pixel.jpg"] = (_encode(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"), {"too_small"})
    files["sizes/15x300.png"] = (_encode(base.resize((15, 300)), "PNG"), {"too_small"})
    files["sizes/16x300.png"] = (_encode(base.resize((16, 300)), "PNG"), FACE | NOFACE | ({"face_too_small"} if mtcnn else set()))
    files["sizes/3000x24.png"] = (_encode(base.resize((3000, 24)), "PNG"), FACE | NOFACE | ({"face_too_small"} if mtcnn else set()))
    # pixel formats
    files["modes/palette.png"] = (_encode(base.quantize(256), "PNG"), FACE)
    files["modes/palette_transparent.png"] = (_encode(base.quantize(256), "PNG", transparency=0), FACE)
    files["modes/grey16.png"] = (_encode(_sixteen_bit(base), "PNG"), FACE)
    files["modes/grey16.tif"] = (_encode(_sixteen_bit(base), "TIFF"), FACE)
    files["modes/float32.tif"] = (_encode(_float(base), "TIFF"), FACE)
    files["modes/cmyk.jpg"] = (_encode(base.convert("CMYK"), "JPEG", quality=92), FACE)
    files["modes/cmyk.tif"] = (_encode(base.convert("CMYK"), "TIFF"), FACE)
    files["modes/rgba.png"] = (_encode(base.convert("RGBA"), "PNG"), FACE)
    files["modes/rgba.webp"] = (_encode(base.convert("RGBA"), "WEBP", lossless=True), FACE)
    files["modes/la.png"] = (_encode(base.convert("LA"), "PNG"), FACE)
    files["modes/grey.jpg"] = (_encode(base.convert("L"), "JPEG", quality=92), FACE)
    files["modes/grey.bmp"] = (_encode(base.convert("L"), "BMP"), FACE)
    files["modes/bilevel.png"] = (_encode(base.convert("1"), "PNG"), FACE | NOFACE)
    files["modes/progressive.jpg"] = (_encode(base, "JPEG", quality=92, progressive=True), FACE)
    files["modes/animated.webp"] = (_animated(base, "WEBP"), FACE)
    files["modes/animated.png"] = (_animated(base, "PNG"), FACE)
    files["modes/png_bytes_named.jpg"] = (png, FACE)
    # EXIF orientations 1..8, plus an out-of-range one
    for o in range(1, 9):
        files[f"exif/orientation_{o}.jpg"] = (exif_jpeg(base, o), FACE)
    files["exif/orientation_9.jpg"] = (exif_jpeg(base, 9), FACE)
    # names
    files["names/with spaces  and (parens).png"] = (_encode(base, "PNG", compress_level=1), FACE)
    files["names/ünïcödé/名前 émigré.jpg"] = (_encode(base, "JPEG", quality=91), FACE)
    files["names/emoji 😀.webp"] = (_encode(base, "WEBP", quality=89), FACE)
    files["names/UPPER.JPG"] = (_encode(base, "JPEG", quality=90), FACE)
    files["names/Mixed.PnG"] = (_encode(base, "PNG", compress_level=2), FACE)
    files["names/.hidden.png"] = (_encode(base, "PNG", compress_level=4), FACE)
    # the same bytes under two names
    files["dup/original.png"] = (png, FACE)
    files["dup/copy of original.png"] = (png, FACE)

    out: dict[str, set[str]] = {}
    for rel, (data, allowed) in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = set(allowed)

    # links: outside the folder (absolute and relative), inside it, dangling, a loop, a folder outside
    (outside / "face.jpg").write_bytes(jpg)
    (outside / "dir").mkdir(exist_ok=True)
    (outside / "dir" / "face.png").write_bytes(png)
    links = src / "links"
    links.mkdir()
    os.symlink(outside / "face.jpg", links / "to_outside_absolute.jpg")
    os.symlink(os.path.relpath(outside / "face.jpg", links), links / "to_outside_relative.jpg")
    os.symlink(outside / "dir", links / "folder_outside")  # not followed: its files are never listed
    os.symlink("../dup/original.png", links / "to_inside.png")
    os.symlink("missing_target.png", links / "dangling.png")
    os.symlink("loop.jpg", links / "loop.jpg")
    out["links/to_outside_absolute.jpg"] = {"outside_source"}
    out["links/to_outside_relative.jpg"] = {"outside_source"}
    out["links/to_inside.png"] = FACE
    out["links/dangling.png"] = {"unreadable"}
    out["links/loop.jpg"] = {"unreadable"}
    # a FIFO named like an image: never opened (reading it would block), not an input file
    os.mkfifo(src / "links" / "fifo.jpg")
    return out


def synthetic_base(w: int = 48, h: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colour pattern (no face): good enough for --aligned runs."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 6, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)

