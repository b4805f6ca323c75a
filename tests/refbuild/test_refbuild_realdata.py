"""Real MTCNN on the shared real photos (read in place; copies and crops live in tmp_path only)."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rb_helpers import invoke

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _accounted(lib: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(faces by src_path, reject reason by src_path); asserts no image is both or twice rejected."""
    faces = {r["src_path"]: r for r in pq.read_table(lib / "faces.parquet").to_pylist()}
    rej = pq.read_table(lib / "rejects.parquet").to_pylist()
    reasons = {r["src_path"]: r["reason"] for r in rej}
    assert len(reasons) == len(rej), "an image rejected twice"
    assert not set(faces) & set(reasons), "an image both a face and a reject"
    return faces, reasons


def test_wild_celeba_faces_found(real_faces, tmp_path):
    src = real_faces / "celeba_wild_identity"
    rows = list(csv.DictReader(open(src / "labels.csv", newline="")))
    by_id: dict[str, list] = {}
    for r in rows:
        by_id.setdefault(r["celeba_identity"], []).append(r)
    subset = [r for ident in sorted(by_id)[:8] for r in by_id[ident][:3]]  # 24 photos, 8 identities
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(subset)
    lib = tmp_path / "lib"
    invoke("detect", src, "--out", lib, "--labels", labels, "--identity-column", "celeba_identity", "--only-labeled",
           "--device", "cpu", "--crop-size", 64, "-q")
    faces, reasons = _accounted(lib)
    assert set(faces) | set(reasons) == {r["path"] for r in subset}
    assert len(faces) >= 0.8 * len(subset), reasons
    want = {r["path"]: r["celeba_identity"] for r in subset}
    min_prob = json.loads((lib / "detect.config.json").read_text())["min_prob"]
    for path, f in faces.items():
        assert f["identity"] == want[path]
        assert f["prob"] >= min_prob and f["landmarks"] is not None
        x0, y0, x1, y1 = f["box"]
        assert min(x1 - x0, y1 - y0) >= 40 and 0 <= (x0 + x1) / 2 <= f["img_w"] and 0 <= (y0 + y1) / 2 <= f["img_h"]
        with Image.open(lib / f["crop_path"]) as im:
            assert im.size == (64, 64)
    invoke("audit", lib)


def test_nonface_negatives(real_faces, tmp_path):
    src = real_faces / "nonface_negatives"
    lib = tmp_path / "lib"
    invoke("detect", src, "--out", lib, "--device", "cpu", "--crop-size", 64, "-q")
    faces, reasons = _accounted(lib)
    images = [p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert len(images) == len(faces) + len(reasons)  # every image is a face or a reject
    # At --min-prob 0.9 MTCNN (facenet-pytorch's own MTCNN.detect agrees) fires on the
    # butterfly (two encodings of one photo, p=0.94) and the tiger (p=0.97); the default
    # is 0.95 since commit 04c4615. At most 2 false faces, at the defaults.
    assert len(faces) <= 2, sorted(faces)
    assert set(reasons.values()) <= {"no_face", "face_too_small"}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_bad_inputs_mixed_with_real_photos(real_faces, tmp_path):
    crops = sorted((real_faces / "celeba_facecrops").rglob("*.jpg"))[:3]
    assert len(crops) == 3
    src = tmp_path / "mixed"
    src.mkdir()
    # Links to the real photos would point outside SRC, and links outside SRC are never
    # read (outside_source), so the good photos are copied into tmp_path (never the repo).
    for i, p in enumerate(crops[:2]):
        shutil.copyfile(p, src / f"good{i}.jpg")
    face = Image.open(crops[2]).convert("RGB")
    (src / "cmyk.jpg").write_bytes(_encode(face.convert("CMYK"), "JPEG", quality=95))
    gray16 = (np.asarray(face.convert("L"), np.float64) * 257).astype(np.uint16)
    (src / "gray16.png").write_bytes(_encode(Image.fromarray(gray16), "PNG"))
    rgba = face.convert("RGBA")
    rgba.putalpha(255)
    (src / "rgba.png").write_bytes(_encode(rgba, "PNG"))
    good = (src / "good0.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "text.jpg").write_text("definitely not a jpeg\n" * 10)
    (src / "empty.jpg").write_bytes(b"")
    (src / "tiny.png").write_bytes(_encode(Image.new("RGB", (1, 1)), "PNG"))
    (src / "outside.jpg").symlink_to(crops[0])  # a link to a real photo outside SRC
    (src / "inside.jpg").symlink_to(src / "good1.jpg")  # a link inside SRC is read
    (src / "readme.txt").write_text("not an image suffix: ignored")

    lib = tmp_path / "lib"
    res = invoke("detect", src, "--out", lib, "--device", "cpu", "--crop-size", 64)
    faces, reasons = _accounted(lib)
    assert reasons == {"truncated.jpg": "corrupt", "text.jpg": "not_an_image", "empty.jpg": "not_an_image",
                       "tiny.png": "too_small", "outside.jpg": "outside_source"}
    assert set(faces) == {"good0.jpg", "good1.jpg", "cmyk.jpg", "gray16.png", "rgba.png", "inside.jpg"}
    assert "rejects:corrupt" in res.output  # the summary counts reasons
    rej = {r["src_path"]: r for r in pq.read_table(lib / "rejects.parquet").to_pylist()}
    assert rej["outside.jpg"]["src_sha256"] is None  # never read
    assert rej["empty.jpg"]["src_sha256"] is not None
    for path, r in rej.items():
        assert r["detail"].startswith(path)
    invoke("audit", lib)
