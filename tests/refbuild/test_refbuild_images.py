"""refbuild.images: every bad input ends as a BadImage with the right reason,
every good one as 8-bit RGB with EXIF orientation applied."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from refbuild.images import REJECT_REASONS, BadImage, Decoded, decode, list_images, read_and_decode

MAX_PIXELS = 64_000_000
MIN_SIDE = 16
W, H = 48, 64


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(w: int = W, h: int = H, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _dec(data: bytes, **kw) -> Decoded:
    return decode(data, max_pixels=kw.get("max_pixels", MAX_PIXELS), min_side=kw.get("min_side", MIN_SIDE), name="x")


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(BadImage) as e:
        _dec(data, **kw)
    assert e.value.reason in REJECT_REASONS
    assert e.value.detail.startswith("x:"), e.value.detail  # the detail names the file
    return e.value.reason


def _flip(data: bytes, start: int, step: int) -> bytes:
    b = bytearray(data)
    for i in range(start, len(b), step):
        b[i] ^= 0xFF
    return bytes(b)


def _png_claiming(w: int, h: int) -> bytes:
    """A real 32x32 PNG whose IHDR (with a recomputed CRC) claims w x h."""
    data = bytearray(_encode(_rgb(32, 32), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


# -- bad inputs ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_body_is_corrupt(fmt):
    data = _encode(_rgb(), fmt)
    assert _reason(data[: len(data) // 2]) == "corrupt"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_header(fmt):
    # 20 bytes: the signature may or may not be enough for PIL to name the format
    assert _reason(_encode(_rgb(), fmt)[:20]) in ("corrupt", "not_an_image")


def test_bit_flipped_png_is_corrupt():
    assert _reason(_flip(_encode(_rgb(), "PNG"), 100, 50)) == "corrupt"


def test_bit_flipped_jpeg_is_corrupt_or_clean_rgb():
    # JPEG decoders may resynchronise on damaged entropy data; what must never
    # happen is an exception other than BadImage, or a non-RGB result.
    data = _flip(_encode(_rgb(), "JPEG"), 400, 37)
    try:
        out = _dec(data)
    except BadImage as e:
        assert e.reason == "corrupt"
    else:
        assert out.image.mode == "RGB" and out.size == (W, H)


def test_zero_byte_file():
    assert _reason(b"") == "not_an_image"


def test_text_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n" * 20)
    with pytest.raises(BadImage) as e:
        read_and_decode(p, max_pixels=MAX_PIXELS, min_side=MIN_SIDE, name="notes.jpg")
    assert e.value.reason == "not_an_image"
    assert "notes.jpg" in e.value.detail


def test_unreadable_path(tmp_path):
    with pytest.raises(BadImage) as e:
        read_and_decode(tmp_path / "gone.jpg", max_pixels=MAX_PIXELS, min_side=MIN_SIDE, name="gone.jpg")
    assert e.value.reason == "unreadable"


def test_one_pixel_is_too_small():
    assert _reason(_encode(Image.new("RGB", (1, 1)), "PNG")) == "too_small"


def test_min_side_boundary():
    assert _dec(_encode(_rgb(16, 40), "PNG")).size == (16, 40)
    assert _reason(_encode(_rgb(15, 40), "PNG")) == "too_small"


def test_decompression_bomb_real_png():
    # a real 20000x20000 1-bit PNG: ~50 KB on disk, 400 Mpx decoded
    data = _encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 200_000
    assert _reason(data) == "too_large"


def test_decompression_bomb_patched_header():
    assert _reason(_png_claiming(20000, 20000)) == "too_large"


def test_max_pixels_guard_below_pil_limit():
    # 9000x9000 = 81 Mpx: under PIL's own bomb limit, over our --max-pixels
    assert _reason(_png_claiming(9000, 9000)) == "too_large"
    assert _reason(_encode(_rgb(), "PNG"), max_pixels=W * H - 1) == "too_large"


# -- good inputs in every pixel format -----------------------------------------

@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("RGB", "JPEG"), ("LA", "PNG"), ("1", "PNG")])
def test_modes_decode_to_rgb(mode, fmt):
    src = _rgb().convert(mode)
    assert Image.open(io.BytesIO(_encode(src, fmt))).mode == mode
    out = _dec(_encode(src, fmt))
    assert isinstance(out, Decoded)
    assert out.image.mode == "RGB" and out.size == (W, H)
    assert np.asarray(out.image).dtype == np.uint8


def test_decoded_keeps_pixels_and_hash():
    import hashlib

    src = _rgb()
    data = _encode(src, "PNG")
    out = _dec(data)
    assert np.array_equal(np.asarray(out.image), np.asarray(src))
    assert out.sha256 == hashlib.sha256(data).hexdigest()


def test_rgba_transparent_becomes_white():
    a = np.zeros((H, W, 4), np.uint8)
    a[..., 0] = 200
    a[:, : W // 2, 3] = 255  # left half opaque red-ish, right half transparent
    out = np.asarray(_dec(_encode(Image.fromarray(a, "RGBA"), "PNG")).image)
    assert (out[:, : W // 2] == [200, 0, 0]).all()
    assert (out[:, W // 2 :] == 255).all()


def test_palette_with_transparency():
    img = Image.new("P", (W, H), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    out = np.asarray(_dec(_encode(img, "PNG", transparency=0)).image)
    assert (out == [10, 20, 30]).all()


def test_sixteen_bit_png_scaled_to_8_bit():
    a = np.zeros((H, W), np.uint16)
    a[:, : W // 2] = 65535
    a[:, W // 2 :] = 32768
    img = Image.fromarray(a)
    data = _encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    out = np.asarray(_dec(data).image)
    assert out.shape == (H, W, 3)
    assert (out[:, : W // 2] == 255).all()
    assert (out[:, W // 2 :] == 128).all()  # 32768/65535*255 = 127.5 -> 128, not clipped to 255


def test_exif_orientation_6_is_transposed():
    src = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    src[:, :20] = [255, 0, 0]  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = _encode(Image.fromarray(src), "JPEG", exif=exif.tobytes(), quality=95)
    out = _dec(data)
    assert out.size == (20, 40)  # came out transposed: 20 wide, 40 high
    a = np.asarray(out.image).astype(int)
    # rotated 90 CW: the red left half is now the top half
    assert a[:20, :, 0].mean() > 200 and a[20:, :, 0].mean() < 50


# -- listing ------------------------------------------------------------------

def test_list_images_sorted_filtered_and_links(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    for rel in ["b/2.PNG", "a.jpg", "b/1.jpeg", "notes.txt", ".tmp-x.png.123"]:
        (src / rel).write_bytes(b"x")
    (src / "sub.jpg").mkdir()  # a folder with an image suffix is no image
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"x")
    (src / "escape.jpg").symlink_to(outside)
    (src / "inside.jpg").symlink_to(src / "a.jpg")
    (src / "dangling.png").symlink_to(src / "nope.png")
    rels, out = list_images(src)
    assert rels == ["a.jpg", "b/1.jpeg", "b/2.PNG", "dangling.png", "inside.jpg"]  # a broken link is listed: it becomes an unreadable reject
    assert out == [("escape.jpg", str(outside.resolve()))]
