"""Bad inputs: every file ends as a recorded reject or a valid face, the run exits 0,
and input files = faces + rejects. Generated at run time (bad_inputs.py), plus
hypothesis-generated damaged bytes and names."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bad_inputs import make_bad_inputs, synthetic_base
from rb_helpers import invoke, make_faces
from refbuild.images import REJECT_REASONS, BadImage, decode
from rel_helpers import accounted, input_files, record


def _sha(p: Path) -> str:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return "unreadable:" + os.readlink(p)


def _check_accounting(src: Path, lib: Path, expected: dict[str, set[str]] | None) -> tuple[dict, dict]:
    """Every input file is exactly one face or one reject, with an allowed outcome."""
    faces, rejects = accounted(lib)
    inputs = input_files(src)
    n_face_rows = pq.read_metadata(lib / "faces.parquet").num_rows
    assert n_face_rows + len(rejects) == len(inputs), (n_face_rows, len(rejects), len(inputs))
    assert sorted(set(faces) | set(rejects)) == inputs, "inputs and recorded outcomes differ: " + str(
        sorted(set(inputs) ^ (set(faces) | set(rejects))))
    for rel, r in rejects.items():
        assert r["reason"] in REJECT_REASONS and r["detail"], r
    if expected is not None:
        wrong = {rel: (rejects[rel]["reason"] if rel in rejects else "face", sorted(ok))
                 for rel, ok in expected.items() if (rejects[rel]["reason"] if rel in rejects else "face") not in ok}
        assert not wrong, f"unexpected outcomes (got, allowed): {wrong}"
    return faces, rejects


def _valid_crop(lib: Path, row: dict, size: int) -> None:
    with Image.open(lib / row["crop_path"]) as im:
        im.load()
        assert im.size == (size, size) and im.mode == "RGB", row


def test_bad_inputs_aligned_then_whole_pipeline(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    base = synthetic_base()
    expected = make_bad_inputs(src / "bad", tmp_path / "outside", base)
    expected = {f"bad/{k}": v for k, v in expected.items()}
    for rel in make_faces(src / "good", n_ids=6, per_id=3, duplicate=False):
        expected[f"good/{rel}"] = {"face"}
    for rel in expected:
        if rel.startswith("bad/"):
            record("bad_inputs", ("named", rel, _sha(src / rel)))
            record("bad_inputs:named", rel)
    invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 32, "--shard-size", 16, "-q")
    faces, rejects = _check_accounting(src, lib, expected)
    for rows in faces.values():
        assert len(rows) == 1
        _valid_crop(lib, rows[0], 32)
    for o in range(1, 10):  # every EXIF orientation came out upright: the base's width x height
        row = faces[f"bad/exif/orientation_{o}.jpg"][0]
        assert (row["img_w"], row["img_h"]) == base.size, (o, row["img_w"], row["img_h"])
    a, b = faces["bad/dup/original.png"][0], faces["bad/dup/copy of original.png"][0]
    assert a["src_sha256"] == b["src_sha256"] and a["face_id"] != b["face_id"]
    assert not any(p.startswith("bad/links/folder_outside") for p in list(faces) + list(rejects))
    assert "bad/links/fifo.jpg" not in faces and "bad/links/fifo.jpg" not in rejects
    # the library the bad inputs went into is a good one: every later stage and the audit pass
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", lib, "-q")
    invoke("pair", lib, "-m", 2, "--manifest-dir", tmp_path / "man", "--device", "cpu", "-q")
    res = invoke("audit", lib)
    assert "audit passed" in res.output


@pytest.mark.slow
@pytest.mark.realdata
def test_bad_inputs_mtcnn_real_face(real_faces, tmp_path):
    """The same inputs made from a real face photo, through MTCNN: every readable
    format and every EXIF orientation is found as a face."""
    photo = real_faces / "celeba_facecrops" / "crops" / "192975.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} not found")
    with Image.open(photo) as im:
        base = im.convert("RGB")
    src, lib = tmp_path / "src", tmp_path / "lib"
    expected = make_bad_inputs(src, tmp_path / "outside", base, mtcnn=True)
    for rel in expected:
        record("bad_inputs", ("named-real", rel, _sha(src / rel)))
    invoke("detect", src, "--out", lib, "--device", "cpu", "--crop-size", 64, "-q")
    faces, rejects = _check_accounting(src, lib, expected)
    for rows in faces.values():
        assert len(rows) == 1
        _valid_crop(lib, rows[0], 64)
    found = [o for o in range(1, 10) if f"exif/orientation_{o}.jpg" in faces]
    assert found == list(range(1, 10)), f"faces found only for EXIF orientations {found}"
    for mode in ("palette", "grey16", "cmyk", "rgba", "la", "grey"):
        assert any(rel.startswith(f"modes/{mode}.") for rel in faces), mode


# -- hypothesis: damaged bytes and odd names ------------------------------------------

def _seed_bytes(fmt: str, mode: str, w: int, h: int) -> bytes:
    img = synthetic_base(w, h).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


FORMATS = st.sampled_from([("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "P"),
                           ("PNG", "RGBA"), ("PNG", "I;16"), ("WEBP", "RGB"), ("WEBP", "RGBA"), ("TIFF", "RGB"),
                           ("BMP", "RGB"), ("GIF", "P")])


@st.composite
def damaged(draw) -> bytes:
    fmt, mode = draw(FORMATS)
    data = bytearray(_seed_bytes(fmt, mode, draw(st.integers(8, 64)), draw(st.integers(8, 64))))
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "zero_tail"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        i = draw(st.integers(0, len(data) - 1))
        data[i : i + 8] = draw(st.binary(min_size=1, max_size=8))
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=32))
    else:
        i = draw(st.integers(0, len(data)))
        data[i:] = bytes(len(data) - i)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about damaged TIFF tags and EXIF
@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=damaged())
def test_fuzz_decode_never_raises_anything_else(data):
    """Any damaged JPEG/PNG/WebP/TIFF/BMP/GIF: a BadImage with a known reason, or 8-bit RGB."""
    record("bad_inputs", ("fuzz", hashlib.sha256(data).hexdigest()))
    record("bad_inputs:fuzz_decode", hashlib.sha256(data).hexdigest())
    try:
        out = decode(data, max_pixels=1_000_000, min_side=4, name="fuzz")
    except BadImage as e:
        assert e.reason in REJECT_REASONS and e.detail.startswith("fuzz:")
        return
    a = np.asarray(out.image)
    assert out.image.mode == "RGB" and a.dtype == np.uint8 and a.ndim == 3 and min(out.size) >= 4


NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"), min_size=1, max_size=16)
EXT = st.sampled_from([".jpg", ".JPG", ".jpeg", ".png", ".PNG", ".webp", ".tif", ".bmp"])


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(NAME, EXT, damaged() | st.just(b"")), min_size=1, max_size=6))
def test_fuzz_folder_every_file_accounted(files):
    """A folder of hypothesis-made damaged files under hypothesis-made names, among good ones."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "src", Path(tmp) / "lib"
        make_faces(src, n_ids=2, per_id=2, duplicate=False)
        for i, (name, ext, data) in enumerate(files):
            rel = f"fuzz/{i} {name}{ext}"
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
            record("bad_inputs", ("fuzz-file", rel, hashlib.sha256(data).hexdigest()))
            record("bad_inputs:fuzz_pipeline", (rel, hashlib.sha256(data).hexdigest()))
        invoke("detect", src, "--out", lib, "--aligned", "--crop-size", 16, "-q")
        _check_accounting(src, lib, None)
        shutil.rmtree(lib)
