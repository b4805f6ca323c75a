"""Inference: LR faces (or whole photos with --detect) + references -> SR PNGs.

References come from explicit files (the same for every face) or, with a
refbuild library, are retrieved per face: the LR face itself, upsampled, is
embedded with the library's backbone and matched against the library (the
"LR view" of `refbuild pair --query-view lr`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import LR_SIZE, load_rgb, to_tensor
from .errors import MsrError
from .metrics import tensor_to_uint8
from .runlog import save_png_atomic


def lr_faces(lr_paths: list[Path], detect: bool, device: str) -> list[Image.Image]:
    """The LR faces as 16x16 RGB: the images themselves, or their detected faces."""
    images = [load_rgb(p) for p in lr_paths]
    if detect:
        from refbuild.retrieve import detect_faces

        crops = detect_faces(images, device=device)
        missing = [str(p) for p, c in zip(lr_paths, crops) if c is None]
        if missing:
            raise MsrError(f"{missing[0]}: no face found (of {len(missing)} without a face); crop it by hand or drop it")
        images = crops
    return [im.resize((LR_SIZE, LR_SIZE), Image.BICUBIC) for im in images]


def references(faces: list[Image.Image], ref_paths: list[Path], library: Path | None, num_refs: int,
               weights: str | None, device: str) -> list[list[Path]]:
    """Reference paths per face."""
    if library is None:
        return [list(ref_paths)] * len(faces)
    from refbuild.errors import RefbuildError
    from refbuild.retrieve import retrieve

    try:
        found = retrieve(library, faces, m=num_refs, weights=weights, device=device)
    except RefbuildError as e:
        raise MsrError(str(e)) from None
    return [[r.path for r in refs] for refs in found]


@torch.no_grad()
def infer(
    checkpoint: Path,
    lr_paths: list[Path],
    ref_paths: list[Path],
    out_dir: Path,
    device: str = "auto",
    batch_size: int | None = None,
    use_ema: bool = True,
    library: Path | None = None,
    detect: bool = False,
    num_refs: int = 4,
    weights: str | None = None,
) -> tuple[list[Path], float]:
    """Super-resolve each LR face. LR images that are not 16x16 are bicubic-resized
    to 16x16; references are resized to the output size. Returns (written paths,
    faces per second of the model part). batch_size None: 16 on CUDA, 1 on CPU."""
    from .train import pick_device

    if library is not None and ref_paths:
        raise MsrError("give --refs or --library, not both")
    if len(ref_paths) > 5 or not 0 <= num_refs <= 5:
        raise MsrError(f"{max(len(ref_paths), num_refs)} references asked for; MSRNet takes 0 to 5")
    dev = pick_device(device)
    model = model_from_checkpoint(load_checkpoint(checkpoint), use_ema).to(dev, memory_format=torch.channels_last).eval()
    if batch_size is None:  # on CPU a batch of 16 measured 0.7x one face at a time (its maps fall out of cache)
        batch_size = 16 if dev.type == "cuda" else 1
    S = model.out_size
    faces = lr_faces(lr_paths, detect, device)
    refs_per_face = references(faces, ref_paths, library, num_refs, weights, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, t0 = [], time.perf_counter()
    for s in range(0, len(faces), batch_size):
        idx = range(s, min(s + batch_size, len(faces)))
        lr = torch.stack([to_tensor(faces[i]) for i in idx]).to(dev)  # B, 3, 16, 16
        refs = torch.stack([
            torch.stack([to_tensor(load_rgb(p).resize((S, S), Image.BICUBIC)) for p in refs_per_face[i]])
            if refs_per_face[i] else torch.zeros(0, 3, S, S) for i in idx]).to(dev)  # B, M, 3, S, S
        sr = model(lr, refs).float().cpu()
        for i, img in zip(idx, sr):
            out = out_dir / f"{lr_paths[i].stem}_x{model.scale}.png"
            save_png_atomic(Image.fromarray(tensor_to_uint8(img)), out)
            written.append(out)
    return written, len(faces) / max(time.perf_counter() - t0, 1e-9)
