"""`model infer --detect`: faces found in whole photos, and their SR pasted back (GFPGAN-style).

Each face is MTCNN's box made square and grown by `margin` (0.52 frames a face
as the shipped model's aligned training crops, docs/DESIGN.md "Framing"). Its SR
goes back into the photo, upscaled bicubically, through a feathered mask: 1 in
the middle of the box, falling smoothly to 0 over the outer `feather` of its
side, so no seam shows where the restored face meets the bicubic photo.

Which faces are restored (docs/DESIGN.md "Restoring faces in whole photos", measured by
`pipelines/realfaces.py`): only faces at most `MAX_FACE` px wide (the widest measured to
gain: the model sees every face through a 16x16 input, which holds ever less of a wider
face); each restoration fitted to its face by back-projection (`fit_to_face`: the face's
own detail kept, the model's added above it), and pasted only where, shrunk back to the
face's own size, it agrees with the face (`MIN_AGREEMENT` dB) and the output is larger
than the face: a restoration never replaces a face that holds more detail, and never reaches
into a face left as it was (`paste_back`'s keep-out boxes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # left, top, right, bottom in photo pixels (may reach outside the photo)

MIN_PROB = 0.95  # --min-prob: MTCNN's last-stage probability (faces 8-16 px wide scored >= 0.97; false faces on
#   nonface_negatives 0.86, 0.90, 0.97, 0.997: docs/DESIGN.md "Restoring faces in whole photos")
MIN_FACE = 12  # --min-face: the smallest face looked for, detector box width in photo pixels
ENLARGE_TO = 24  # photos are enlarged for detection so a MIN_FACE face spans this many pixels (MTCNN misses < ~20 px)
DETECT_SIZE = 2048  # ... while the long side seen by the detector stays within this
MAX_FACE = 40  # faces wider than this (detector box, px) are left as they were
BACK_PROJECT = 4  # back-projection rounds fitting a restoration to its face (8 gained 0.01-0.02 dB more)
MIN_AGREEMENT = 30.0  # dB PSNR between the fitted restoration shrunk back to the face's size and the face
MAX_SIDE = 4096  # the restored photo's long side is kept below this


@dataclass(frozen=True)
class Found:
    """One detected face: its square crop box (grown by the margin), the detector's box, its probability."""

    box: Box
    detector_box: tuple[float, float, float, float]
    prob: float

    @property
    def width(self) -> float:
        """The face's width: the detector box's, in photo pixels."""
        return self.detector_box[2] - self.detector_box[0]


def find_faces(photos: list[Image.Image], margin: float, device: str = "auto", min_face: int = MIN_FACE,
               min_prob: float = MIN_PROB) -> list[list[Found] | str]:
    """Faces per photo, most confident first, with probability >= min_prob; a string (the
    reason) where the detector failed on the photo. Photos are enlarged for detection so a
    face of min_face px spans ENLARGE_TO px (long side within DETECT_SIZE)."""
    from refbuild.detect import square_box
    from refbuild.detector import Detector

    det = Detector(device=device, min_face=min_face, min_face_det=12, detect_size=DETECT_SIZE, enlarge_to=ENLARGE_TO)
    found: list[list[Found] | str] = []
    for res in det.detect(photos):
        if isinstance(res, Exception):
            found.append(f"detector_error: {type(res).__name__}: {res}")
            continue
        order = [int(i) for i in np.argsort(-res.probs, kind="stable") if res.probs[i] >= min_prob]
        found.append([Found(square_box(res.boxes[i], margin), tuple(round(float(v), 1) for v in res.boxes[i]),
                            float(res.probs[i])) for i in order])
    return found


def size_rule(width: float, max_face: float = MAX_FACE) -> str | None:
    """None when a face this wide (detector box, px) is restored; else why it is left as it was."""
    if width > max_face:
        return f"wider than {max_face:g} px"
    return None


def _resize_f(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HWC float32 -> size (w, h), PIL bicubic (antialiased when shrinking) per channel, unclipped."""
    return np.stack([np.asarray(Image.fromarray(a[..., c], "F").resize(size, Image.BICUBIC)) for c in range(a.shape[2])], -1)


def fit_to_face(sr: Image.Image, face: Image.Image, side: int, iters: int = BACK_PROJECT) -> tuple[Image.Image, float]:
    """The restoration at side x side, back-projected onto the face it came from; and its agreement.

    Back-projection (Irani & Peleg): the difference between the face and the restoration
    shrunk to the face's size is enlarged and added, `iters` times, so what the face itself
    shows (every band up to its own resolution) comes from the face, and the model adds only
    finer detail. Agreement: PSNR (dB, RGB) of the result shrunk back to the face's size
    against the face.
    """
    f = np.asarray(face, dtype=np.float32)
    small = face.size
    out = np.asarray(sr.resize((side, side), Image.BICUBIC), dtype=np.float32)
    for _ in range(iters):
        out = out + _resize_f(f - _resize_f(out, small), (side, side))
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    back = np.asarray(Image.fromarray(out).resize(small, Image.BICUBIC), dtype=np.float64)
    mse = float(np.mean((back - f) ** 2))
    return Image.fromarray(out), (float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))


def covered(box: Box, boxes: list[tuple[float, float, float, float]]) -> bool:
    """Whether the box lies wholly inside one of the boxes (a paste there would be kept out entirely)."""
    return any(l <= box[0] and t <= box[1] and r >= box[2] and b >= box[3] for l, t, r, b in boxes)


def paste_rule(side: int, crop: int, agreement: float, min_agreement: float = MIN_AGREEMENT,
               sr_side: int | None = None, inside_left: bool = False) -> str | None:
    """None when a restoration (sr_side px, made) pasted at side px over a face cut at crop px may be
    pasted; else why not (the kind of reason before the colon, its figures after: summaries group by kind).
    inside_left: the face's box lies inside a face left as it was (`paste_back` would keep it all out)."""
    if inside_left:
        return "inside a face left as it was: its pixels stay"
    if sr_side is not None and sr_side <= crop:
        return f"restoration no larger than the face: {sr_side} px <= {crop} px"
    if side <= crop:
        return f"output no larger than the face: {side} px <= {crop} px"
    if agreement < min_agreement:
        return f"restoration disagrees with the face: {agreement:.1f} dB < {min_agreement:g} dB, shrunk back to {crop} px"
    return None


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


def paste_back(photo: Image.Image, faces: list[tuple[Box, Image.Image]], upscale: int,
               keep_out: list[tuple[float, float, float, float]] = ()) -> Image.Image:
    """The photo upscaled bicubically by `upscale`, each SR face blended in at its box, except inside
    the `keep_out` boxes (photo pixels: the detector boxes of faces left as they were), which keep the
    photo's own pixels: a small face's paste never reaches into a larger face beside it."""
    W, H = photo.size
    canvas = np.asarray(photo.resize((W * upscale, H * upscale), Image.BICUBIC), dtype=np.float32)
    for box, sr in faces:
        l, t, r, b = (v * upscale for v in box)
        side = r - l
        face = np.asarray(sr.resize((side, side), Image.BICUBIC), dtype=np.float32)
        mask = feather_mask(side)[..., None]
        for kl, kt, kr, kb in keep_out:  # in box coordinates, clipped to the box
            x0, y0 = max(0, int(np.floor(kl * upscale)) - l), max(0, int(np.floor(kt * upscale)) - t)
            x1, y1 = min(side, int(np.ceil(kr * upscale)) - l), min(side, int(np.ceil(kb * upscale)) - t)
            if x0 < x1 and y0 < y1:
                mask[y0:y1, x0:x1] = 0.0
        x0, y0, x1, y1 = max(l, 0), max(t, 0), min(r, canvas.shape[1]), min(b, canvas.shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        f, m = face[y0 - t:y1 - t, x0 - l:x1 - l], mask[y0 - t:y1 - t, x0 - l:x1 - l]
        canvas[y0:y1, x0:x1] = m * f + (1 - m) * canvas[y0:y1, x0:x1]
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
