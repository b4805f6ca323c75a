"""MTCNN (facenet-pytorch) behind one typed function.

facenet-pytorch's `MTCNN.detect` needs one image size per batch, raises on a
batch where some image has no face, and can attach probabilities/landmarks to
the wrong box. We run its lower-level cascade (`detect_face`) instead, as
re-implemented in refbuild/nets/mtcnn.py: same weights and arithmetic, bit-identical
boxes, without its slow NCHW ceil-mode max-pool and without importing
facenet-pytorch/torchvision (see that module's docstring). Each image is
shrunk so its long side is at most `detect_size`; images that share a size (and
pyramid start) are batched. With `letterbox` (the default on CUDA, where big
batches pay) images are also padded bottom/right with black to a canvas rounded
up to 32 px, so photos of mixed sizes share batches. On CPU batching buys little
and padding changes boxes that touch the bottom/right border (facenet stretches
the in-image part of such a box; we would include black), so the default there
is exact sizes: boxes identical to a per-image MTCNN call.
Boxes and landmarks come back in source-image pixels.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from refbuild.torchutil import resolve_device  # the one device choice; retrieve/embed/detect import it from here

CANVAS_STEP = 32


@dataclass(frozen=True)
class Faces:
    """Faces found in one image, most confident first. Empty arrays when none."""

    boxes: np.ndarray  # N, 4 (x0, y0, x1, y1) float32, source pixels
    probs: np.ndarray  # N float32
    landmarks: np.ndarray  # N, 5, 2 (x, y) float32, source pixels

    @staticmethod
    def empty() -> "Faces":
        return Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.probs)


class Detector:
    """Batched MTCNN over images of mixed sizes.

    Args:
        device: "cpu", "cuda" or "auto".
        detect_size: long side (px) images are shrunk to before detection.
        min_face: smallest face wanted, in source pixels. MTCNN's pyramid starts at the
            scale where such a face is `minsize` = max(min_face_det, min_face x shrink)
            detection pixels, so no time goes to faces the stage would reject.
        min_face_det: floor of MTCNN's `minsize`, in detection pixels.
        thresholds: MTCNN's three stage thresholds.
        factor: pyramid scale step.
        letterbox: pad images to shared canvases (None: on CUDA only).
        enlarge_to: None (default): never enlarge. Else images are enlarged (bicubic) so a
            `min_face` face spans this many detection pixels, the long side still at most
            `detect_size`: MTCNN's first stage sees faces from 12 px, but finds those under
            ~20 px far less often (`model infer --detect` sets this to find 12-16 px faces).
    """

    def __init__(
        self,
        device: str = "auto",
        detect_size: int = 1024,
        min_face: int = 40,
        min_face_det: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        letterbox: bool | None = None,
        enlarge_to: int | None = None,
    ):
        from refbuild.nets.mtcnn import load_nets  # facenet-pytorch's weights, without importing it (torchvision: ~2 s)

        self.device = torch.device(resolve_device(device))
        self.pnet, self.rnet, self.onet = load_nets(self.device)
        self.detect_size = detect_size
        self.min_face = min_face
        self.min_face_det = min_face_det
        self.thresholds = list(thresholds)
        self.factor = factor
        self.letterbox = self.device.type == "cuda" if letterbox is None else letterbox
        self.enlarge_to = enlarge_to

    def _scale(self, size: tuple[int, int]) -> float:
        up = max(1.0, self.enlarge_to / self.min_face) if self.enlarge_to else 1.0
        return min(up, self.detect_size / max(size))

    def _minsize(self, size: tuple[int, int]) -> int:
        return max(self.min_face_det, int(self.min_face * self._scale(size)) // 4 * 4)

    def _run(self, canvases: np.ndarray, minsize: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        from refbuild.nets.mtcnn import detect_faces

        return detect_faces(torch.from_numpy(canvases).to(self.device), minsize, (self.pnet, self.rnet, self.onet),
                            tuple(self.thresholds), self.factor)

    def detect(self, images: list[Image.Image], batch_size: int = 8) -> list[Faces | Exception]:
        """Detect faces in RGB images. One result per image: `Faces`, or the exception
        the detector raised on that image alone."""
        results: list[Faces | Exception] = [Faces.empty()] * len(images)
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        small: list[np.ndarray] = []
        for i, img in enumerate(images):
            s = self._scale(img.size)
            w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
            resized = img if s == 1 else img.resize((w, h), Image.BILINEAR if s < 1 else Image.BICUBIC)  # enlarged: bicubic
            arr = np.asarray(resized, dtype=np.uint8)
            small.append(arr)
            if min(h, w) < self._minsize(img.size):  # no face of minsize fits (MTCNN would fail on an empty pyramid)
                continue  # stays Faces.empty()
            canvas = (-(-h // CANVAS_STEP) * CANVAS_STEP, -(-w // CANVAS_STEP) * CANVAS_STEP) if self.letterbox else (h, w)
            groups[canvas + (self._minsize(img.size),)].append(i)
        for (ch, cw, minsize), idx in sorted(groups.items()):
            for start in range(0, len(idx), batch_size):
                batch = idx[start : start + batch_size]
                canv = np.zeros((len(batch), ch, cw, 3), np.uint8)  # B, H, W, 3
                for j, i in enumerate(batch):
                    canv[j, : small[i].shape[0], : small[i].shape[1]] = small[i]
                try:
                    outs = list(zip(*self._run(canv, minsize)))
                except Exception:  # a batch failure must not take the other images with it
                    outs = []
                    for j in range(len(batch)):
                        try:
                            b, p = self._run(canv[j : j + 1], minsize)
                            outs.append((b[0], p[0]))
                        except Exception as e:
                            outs.append(e)
                for i, out in zip(batch, outs):
                    results[i] = out if isinstance(out, Exception) else self._to_source(out, images[i].size, small[i].shape)
        return results

    def _to_source(self, out: tuple[np.ndarray, np.ndarray], size: tuple[int, int], shape: tuple[int, ...]) -> Faces:
        b, p = out
        h, w = shape[:2]
        if self.letterbox:  # a face centred in the padding is not in the image; without padding keep
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2  # what MTCNN found, even centred past the edge
            keep = (cx < w) & (cy < h)
            b, p = b[keep], p[keep]
        order = np.argsort(-b[:, 4], kind="stable")
        b, p = b[order], p[order]
        sx, sy = size[0] / w, size[1] / h
        boxes = b[:, :4] * np.array([sx, sy, sx, sy], np.float32)
        lms = p * np.array([sx, sy], np.float32)
        return Faces(boxes.astype(np.float32), b[:, 4].astype(np.float32), lms.astype(np.float32))
