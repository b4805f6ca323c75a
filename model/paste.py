"""`model infer --detect`: faces found in whole photos, and their SR pasted back (GFPGAN-style).

Each face is MTCNN's box made square and grown by `margin` (0.52 frames a face
as the shipped model's aligned training crops, docs/DESIGN.md "Framing"). Its SR
goes back into the photo, upscaled bicubically, through a feathered mask: 1 in
the middle of the box, falling smoothly to 0 over the outer `feather` of its
side, so no seam shows where the restored face meets the bicubic photo.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom in photo pixels (may reach outside the photo)

MIN_PROB = 0.95  # refbuild detect's --min-prob
MIN_FACE = 16  # smallest face box side kept, in photo pixels (tiny faces are what this model is for)
MAX_SIDE = 4096  # the restored photo's long side is kept below this


def find_faces(photos: list[Image.Image], all_faces: bool, margin: float, device: str = "auto") -> list[list[Box] | str]:
    """Square face boxes per photo, most confident first (only that one unless all_faces);
    a string (the reason) where the detector failed on the photo."""
    from refbuild.detect import square_box
    from refbuild.detector import Detector

    det = Detector(device=device, min_face=MIN_FACE)
    found: list[list[Box] | str] = []
    for res in det.detect(photos):
        if isinstance(res, Exception):
            found.append(f"detector_error: {type(res).__name__}: {res}")
            continue
        order = [int(i) for i in np.argsort(-res.probs) if res.probs[i] >= MIN_PROB]
        found.append([square_box(res.boxes[i], margin) for i in (order if all_faces else order[:1])])
    return found


def crop(photo: Image.Image, box: Box) -> Image.Image:
    """The box cut from the photo (black outside it)."""
    return photo.crop(box)


def auto_upscale(photo_size: tuple[int, int], boxes: list[Box], sr_size: int, scale: int) -> int:
    """The factor that brings the largest face to the SR size, between 1 and the model's scale,
    and keeps the restored photo's long side within MAX_SIDE."""
    side = max(b[2] - b[0] for b in boxes)
    u = max(1, min(scale, round(sr_size / side)))
    return max(1, min(u, MAX_SIDE // max(photo_size)))


def feather_mask(side: int, feather: float = 0.1) -> np.ndarray:
    """side x side float32 in [0, 1]: 1 inside, a smoothstep to 0 over `feather` x side at each border."""
    d = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32) + 0.5  # distance to the nearest edge
    t = np.clip(d / max(1.0, feather * side), 0.0, 1.0)
    ramp = t * t * (3 - 2 * t)
    return np.minimum(ramp[:, None], ramp[None, :])


def paste_back(photo: Image.Image, faces: list[tuple[Box, Image.Image]], upscale: int) -> Image.Image:
    """The photo upscaled bicubically by `upscale`, each SR face blended in at its box."""
    W, H = photo.size
    canvas = np.asarray(photo.resize((W * upscale, H * upscale), Image.BICUBIC), dtype=np.float32)
    for box, sr in faces:
        l, t, r, b = (v * upscale for v in box)
        side = r - l
        face = np.asarray(sr.resize((side, side), Image.BICUBIC), dtype=np.float32)
        mask = feather_mask(side)[..., None]
        x0, y0, x1, y1 = max(l, 0), max(t, 0), min(r, canvas.shape[1]), min(b, canvas.shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        f, m = face[y0 - t:y1 - t, x0 - l:x1 - l], mask[y0 - t:y1 - t, x0 - l:x1 - l]
        canvas[y0:y1, x0:x1] = m * f + (1 - m) * canvas[y0:y1, x0:x1]
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
