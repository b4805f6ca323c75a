"""Stage 1, `refbuild detect SRC --out LIB`: MTCNN face crops.

The paper (Sec. II-A): "face detection is performed using MTCNN and the
detected face is then resized to 256x256 according to the bounding box".
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from data_manifests import FACES, REJECTS, ManifestError, metadata, read_table
from refbuild import shards
from refbuild.errors import RefbuildError
from refbuild.images import BadImage, Decoded, list_images, read_and_decode
from refbuild.io import (config_dict, library_lock, outputs_together, resolved_config, sha256_file, write_bytes,
                         write_json, write_table)
from refbuild.labels import IdentityFrom, identity_of, read_labels
from refbuild.library import Library
from refbuild.progress import bar, summary, warn
from refbuild.runners import Runner, make_runner, resolve_workers

RUNTIME_FIELDS = ("device", "batch_size", "quiet", "overwrite", "workers", "engine")


@dataclass(frozen=True)
class DetectConfig:
    src: Path
    out: Path
    labels: Path | None = None  # CSV with a `path` column (relative to src) and an identity column
    identity_column: str = "identity"
    identity_from: IdentityFrom = "none"  # csv when labels is given
    only_labeled: bool = False  # process only images listed in labels
    aligned: bool = False  # already-aligned faces: no detection, the whole image is the face
    all_faces: bool = False  # keep every face, not only the most confident one
    margin: float = 0.0  # extra border around the squared MTCNN box, as a fraction of its side
    crop_size: int = 256
    crop_format: Literal["png", "jpg"] = "png"
    min_face: int = 40  # faces with a shorter box side (source px) are rejected
    min_prob: float = 0.95  # faces below this MTCNN probability are ignored
    detect_size: int = 1024
    max_pixels: int = 64_000_000  # decompression-bomb guard
    min_image_side: int = 16
    limit: int | None = None  # only the first N images (sorted by path)
    shard_size: int = 128
    batch_size: int = 8
    device: str = "auto"
    workers: int = 0  # processes (local engine) or actors (ray engine); 0: one per core on CPU
    engine: str = "local"
    quiet: bool = False
    overwrite: bool = False

    def fingerprint(self) -> dict:
        d = config_dict(self)
        for k in RUNTIME_FIELDS + ("out",):  # a moved library resumes too
            d.pop(k)
        return d


def face_id(rel_path: str, index: int) -> str:
    return f"{hashlib.sha256(rel_path.encode()).hexdigest()[:16]}-{index}"


def square_box(box: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """The MTCNN box made square around its centre, grown by `margin` of its side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    s = max(1, round(side))
    return left, top, left + s, top + s


def crop_face(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The square `box` of `img` resized bicubically to size x size; outside the image is black."""
    return img.crop(box).resize((size, size), Image.BICUBIC)


def encode_crop(img: Image.Image, box: tuple[int, int, int, int], size: int, fmt: str) -> bytes:
    """`crop_face` as the bytes of a crop file: PNG (lossless) or JPEG q95 without chroma subsampling."""
    crop = crop_face(img, box, size)
    buf = io.BytesIO()
    if fmt == "png":
        crop.save(buf, format="PNG", compress_level=3)
    else:
        crop.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def crop_key(cfg: DetectConfig) -> str:
    """Crops of one configuration live in their own folder, crops/<key>/, so a rerun
    with other settings never overwrites the crops the current faces.parquet names."""
    return hashlib.sha256(json.dumps(cfg.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:10]


def _crop_rel(fid: str, fmt: str, key: str) -> str:
    return f"crops/{key}/{fid[:2]}/{fid}.{fmt}"


def process_shard(rels: list[str], cfg: DetectConfig, labels: dict[str, str], detector) -> tuple[pa.Table, pa.Table]:
    """The work: decode, detect, crop and record one shard of images. Never raises
    for a bad image; it becomes a row of the rejects table."""
    lib = Library(cfg.out)
    key = crop_key(cfg)
    faces: list[dict] = []
    rejects: list[dict] = []
    decoded: list[tuple[str, Decoded]] = []
    for rel in rels:
        try:
            decoded.append((rel, read_and_decode(cfg.src / rel, max_pixels=cfg.max_pixels, min_side=cfg.min_image_side,
                                                 name=rel)))
        except BadImage as e:
            sha = None
            try:
                sha = hashlib.sha256((cfg.src / rel).read_bytes()).hexdigest()
            except OSError:
                pass
            rejects.append({"src_path": rel, "src_sha256": sha, "reason": e.reason, "detail": e.detail})
    if cfg.aligned:
        found = [None] * len(decoded)
    else:
        found = detector.detect([d.image for _, d in decoded], batch_size=cfg.batch_size)
    for (rel, dec), res in zip(decoded, found):
        w, h = dec.size
        base = {"src_path": rel, "src_sha256": dec.sha256, "identity": identity_of(rel, labels, cfg),
                "img_w": w, "img_h": h}
        if cfg.aligned:
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            kept = [(np.array(box, np.float32), float("nan"), None)]
            n_faces = 1
        elif isinstance(res, Exception):
            rejects.append({"src_path": rel, "src_sha256": dec.sha256, "reason": "detector_error",
                            "detail": f"{rel}: {res}"})
            continue
        else:
            n_faces = len(res)
            confident = [i for i in range(n_faces) if res.probs[i] >= cfg.min_prob]
            if not confident:
                rejects.append({"src_path": rel, "src_sha256": dec.sha256, "reason": "no_face",
                                "detail": f"{rel}: no face with probability >= {cfg.min_prob}"})
                continue
            big = [i for i in confident
                   if min(res.boxes[i][2] - res.boxes[i][0], res.boxes[i][3] - res.boxes[i][1]) >= cfg.min_face]
            if not big:
                rejects.append({"src_path": rel, "src_sha256": dec.sha256, "reason": "face_too_small",
                                "detail": f"{rel}: faces found are below {cfg.min_face} px"})
                continue
            kept = [(res.boxes[i], float(res.probs[i]), res.landmarks[i]) for i in (big if cfg.all_faces else big[:1])]
        for k, (box, prob, lm) in enumerate(kept):
            fid = face_id(rel, k)
            crop_rel = _crop_rel(fid, cfg.crop_format, key)
            sq = tuple(int(v) for v in box) if cfg.aligned else square_box(box, cfg.margin)
            data = encode_crop(dec.image, sq, cfg.crop_size, cfg.crop_format)
            write_bytes(lib.root / crop_rel, data)
            faces.append({
                **base, "face_id": fid, "face_index": k, "n_faces": n_faces,
                # a photo's label names one person: the most confident face; the others (--all-faces) are bystanders
                "identity": base["identity"] if k == 0 else None,
                "box": [float(v) for v in box], "prob": prob,
                "landmarks": None if lm is None else [float(v) for v in np.concatenate([lm[:, 0], lm[:, 1]])],
                "crop_path": crop_rel, "crop_sha256": hashlib.sha256(data).hexdigest(),
                "src_side": sq[2] - sq[0],  # < crop_size: the crop was enlarged, a soft HR target
            })
    return (pa.Table.from_pylist(faces, schema=FACES), pa.Table.from_pylist(rejects, schema=REJECTS))


def plan(cfg: DetectConfig) -> tuple[list[str], list[dict], dict[str, str]]:
    """The sorted list of images to process, the rejects known before any decoding, and the labels."""
    if cfg.src.is_file():
        raise RefbuildError(f"{cfg.src}: a file, not a folder; give the folder that holds the photos "
                            "(searched recursively)")
    if not cfg.src.is_dir():
        raise RefbuildError(f"{cfg.src}: source folder not found")
    rels, outside = list_images(cfg.src)
    labels = read_labels(cfg)
    pre = [{"src_path": r, "src_sha256": None, "reason": "outside_source",
            "detail": f"{r}: link to {t} is outside {cfg.src}"} for r, t in outside]
    if labels and not set(labels) & set(rels):
        example = next(iter(labels))
        raise RefbuildError(f"{cfg.labels}: none of its {len(labels)} paths (e.g. {example!r}) is an image "
                            f"under {cfg.src}; paths must be relative to SRC")
    if cfg.only_labeled:
        if not labels:
            raise RefbuildError("--only-labeled needs --labels")
        rels = [r for r in rels if r in labels]
    if cfg.limit is not None:
        rels = rels[: cfg.limit]
    elif labels:
        present = set(rels) | {r for r, _ in outside}
        pre += [{"src_path": r, "src_sha256": None, "reason": "missing_file",
                 "detail": f"{r}: in {cfg.labels.name} but not in {cfg.src}"} for r in sorted(set(labels) - present)]
    if not rels:
        raise RefbuildError(f"{cfg.src}: no image files (.jpg .jpeg .png .webp .bmp .tif); "
                            "point SRC at a folder of photos")
    return rels, pre, labels


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def shard_key(rels: list[str], labels: dict[str, str], cfg: DetectConfig) -> str:
    """What a shard's result depends on besides the settings and the bytes: its photos and their labels
    (with --all-faces, labelled on the most confident face only: shards that labelled every face are redone)."""
    key = [[r, identity_of(r, labels, cfg)] for r in rels] + (["label: most confident face"] if cfg.all_faces else [])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def shard_is_current(wdir: Path, index: int, rels: list[str], labels: dict[str, str], cfg: DetectConfig) -> bool:
    """A finished shard still holds the result of its inputs: the same photos and labels, every source
    unchanged (same size and mtime, or else the same sha256), every crop in place with its sha256."""
    rec = shards.done_record(wdir, index)
    if rec is None or rec.get("key") != shard_key(rels, labels, cfg):
        return False
    try:
        faces = read_table(shards.shard_file(wdir, index, "faces"), "faces")
        rejects = read_table(shards.shard_file(wdir, index, "rejects"), "rejects")
    except ManifestError:
        return False
    sha = {t["src_path"]: t["src_sha256"]
           for t in rejects.to_pylist() + faces.select(["src_path", "src_sha256"]).to_pylist()}
    now = {r: _stat(cfg.src / r) for r in rels}
    for r in rels:
        if now[r] != rec["stat"].get(r) and (now[r] is None or sha.get(r) is None
                                             or sha256_file(cfg.src / r) != sha[r]):
            return False
    for crop, want in zip(faces.column("crop_path").to_pylist(), faces.column("crop_sha256").to_pylist()):
        p = cfg.out / crop
        if want is None or not p.is_file() or sha256_file(p) != want:
            return False
    if now != rec["stat"]:  # touched, same bytes: remember the new times, so the next rerun need not hash them
        shards.mark_done(wdir, index, rec | {"stat": now})
    return True


class DetectWorker:
    """Built once per worker (loads MTCNN); called on one shard (index, paths):
    writes the shard's faces, rejects and done-marker, returns the image count."""

    def __init__(self, cfg: DetectConfig, labels: dict[str, str], wdir: Path):
        self.cfg, self.labels, self.wdir = cfg, labels, wdir
        self.detector = None
        if not cfg.aligned:
            from refbuild.detector import Detector

            self.detector = Detector(device=cfg.device, detect_size=cfg.detect_size, min_face=cfg.min_face)

    def __call__(self, task: tuple[int, list[str]]) -> int:
        index, rels = task
        stat = {rel: _stat(self.cfg.src / rel) for rel in rels}  # before reading: a later change is seen next run
        f, r = process_shard(rels, self.cfg, self.labels, self.detector)
        write_table(shards.shard_file(self.wdir, index, "faces"), f, "faces")
        write_table(shards.shard_file(self.wdir, index, "rejects"), r, "rejects")
        shards.mark_done(self.wdir, index, {"key": shard_key(rels, self.labels, self.cfg), "stat": stat})
        return len(rels)


def check_same_source(lib: Library, cfg: DetectConfig) -> None:
    """Refuse to replace a library made from another source folder (its crops go, and with them what
    features, pairs and manifests point to) unless --overwrite."""
    try:
        old = metadata(lib.faces).get("src_root") if lib.faces.is_file() else None
    except Exception:  # unreadable: not a library to protect
        return
    if old and old != str(cfg.src.resolve()) and not cfg.overwrite:
        raise RefbuildError(f"{lib.root}: a library of {old}, not of {cfg.src.resolve()}; pick another --out, "
                            "or add --overwrite to replace it (its features, splits and pairs must then be remade)")


def run(cfg: DetectConfig, runner: Runner | None = None) -> dict:
    """Run the detect stage (resumable). Returns summary counts."""
    if cfg.out.resolve().is_relative_to(cfg.src.resolve()):
        raise RefbuildError(f"{cfg.out}: the library must not be inside the source folder {cfg.src}")
    rels, pre_rejects, labels = plan(cfg)
    lib = Library(cfg.out)
    with library_lock(lib.root, "detect"):
        check_same_source(lib, cfg)
        wdir = shards.work_dir(lib.root, "detect")
        shards.prepare(wdir, cfg.fingerprint(), cfg.overwrite, inputs={"n_images": len(rels)})
        parts = shards.chunks(len(rels), cfg.shard_size)
        todo = [i for i in range(len(parts)) if not shard_is_current(wdir, i, [rels[j] for j in parts[i]], labels, cfg)]
        t0 = time.perf_counter()
        done_images = sum(len(parts[i]) for i in range(len(parts)) if i not in set(todo))
        tasks = [(i, [rels[j] for j in parts[i]]) for i in todo]
        with bar(cfg.quiet) as prog:
            task = prog.add_task("detect", total=len(rels), completed=done_images)
            workers = resolve_workers(cfg.workers, cfg.device, needs_model=not cfg.aligned)
            runner = runner or make_runner(cfg.engine, workers, cfg.device)
            for n in runner.map(DetectWorker, (cfg, labels, wdir), tasks):
                prog.advance(task, n)
        elapsed = time.perf_counter() - t0
        faces = pa.concat_tables([read_table(shards.shard_file(wdir, i, "faces"), "faces") for i in range(len(parts))])
        rejects = pa.concat_tables(
            [pa.Table.from_pylist(pre_rejects, schema=REJECTS)]
            + [read_table(shards.shard_file(wdir, i, "rejects"), "rejects") for i in range(len(parts))]
        ).sort_by("src_path")
        with outputs_together():  # a full disk leaves the library as it was
            write_table(lib.rejects, rejects, "rejects")
            write_table(lib.faces, faces, "faces", {"src_root": str(cfg.src.resolve())})
            from refbuild.detector import resolve_device

            used_device = resolve_device(cfg.device) if not cfg.aligned else "none (--aligned)"
            used = resolved_config(cfg, device=used_device, workers=workers, engine=cfg.engine)
            write_json(lib.config("detect"), used | {"n_images": len(rels)})
        shards.finish(wdir)
        for old in lib.crops.iterdir() if lib.crops.is_dir() else []:
            if old.is_dir() and old.name != crop_key(cfg):  # crops of an earlier configuration
                shutil.rmtree(old)
    reasons = Counter(rejects.column("reason").to_pylist())
    processed = sum(len(parts[i]) for i in todo)
    rows = faces.select(["src_path", "face_index", "identity", "src_side"]).to_pylist()
    labelled = {r["src_path"] for r in rows if r["face_index"] == 0 and r["identity"] is not None}
    bystanders = sum(r["face_index"] > 0 and r["src_path"] in labelled for r in rows)
    sides = [r["src_side"] for r in rows if r["src_side"] is not None]
    enlarged = [s for s in sides if s < cfg.crop_size]
    stats = {
        "images": len(rels),
        "images_with_faces": len(set(faces.column("src_path").to_pylist())),
        "faces": faces.num_rows,
        "identities": len(set(x for x in faces.column("identity").to_pylist() if x is not None)),
        "rejects": rejects.num_rows,
        **{f"rejects:{k}": v for k, v in sorted(reasons.items())},
        **({"faces left unlabelled (not the photo's most confident)": bystanders} if cfg.all_faces else {}),
        "faces enlarged (source square < crop size)": len(enlarged) if len(sides) == len(rows) else
        f"{len(enlarged)} of {len(sides)} known",
        "processed_now": processed,
        "seconds": round(elapsed, 1),
        "images_per_s": round(processed / elapsed, 2) if processed and elapsed > 0 else None,
    }
    summary(f"refbuild detect -> {lib.root}", list(stats.items()), cfg.quiet)
    if bystanders:
        warn(f"{bystanders} face(s) of labelled photos were left unlabelled: a photo's label names one person, "
             "given to its most confident face (--all-faces keeps the others, without identity)", "note")
    if enlarged:
        warn(f"{len(enlarged)} of {len(rows)} faces were cut from squares smaller than --crop-size {cfg.crop_size} "
             f"(smallest {min(enlarged)} px) and enlarged: soft HR targets. `model train`/`model eval` refuse HR "
             "targets enlarged to the model's output size unless --allow-enlarged; `refbuild query "
             f"{lib.root} \"SELECT face_id, src_side FROM faces WHERE src_side < {cfg.crop_size}\"` lists them")
    return stats
