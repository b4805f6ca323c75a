"""Inference: LR faces (or whole photos with --detect) + references -> SR PNGs and `infer.json`.

Inputs are files, folders (recursive) and globs (`model/inputs.py`); each output
mirrors its input's relative path under `--out`, and nothing an earlier run
wrote is replaced without `--overwrite`. A face that is not 16x16 is resized
(a non-square one centre-padded first, or refused) with a one-line note.

References come from explicit files (the same for every face) or, with a
refbuild library, are retrieved per face: the LR face itself, upsampled, is
embedded with the library's backbone and matched against the library (the
"LR view" of `refbuild pair --query-view lr`). `infer.json` records, for every
input, the faces restored, the references each used and the files written.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from refbuild.io import sha256_file, write_json
from refbuild.torchutil import pick_device

from .checkpoint import load_checkpoint, model_from_checkpoint
from .data import load_rgb, to_tensor
from .errors import MsrError
from .inputs import Input, change_notes, check_outputs, collect_inputs, output_stem, square_lr
from .metrics import tensor_to_uint8
from .msrnet import LR_SIZE
from .runlog import labelled_grid, save_png_atomic

GRID_ROWS = 16  # faces per grid page
PASTE_MAX = 1.25  # --detect pastes a face back only if its box, upscaled, is at most this x the SR size
NO_REFS_NOTE = ("running with no references (the model is trained to work without them); "
                "give --library LIB to retrieve them per face, or --refs IMG (up to 5) to use the same for every face")


@dataclass(frozen=True)
class InferConfig:
    """What one `model infer` run does; written into `infer.json`."""

    checkpoint: Path
    inputs: tuple[str, ...]
    out_dir: Path = Path("sr_out")
    refs: tuple[Path, ...] = ()
    library: Path | None = None
    num_refs: int = 4
    weights: str | None = None
    detect: bool = False
    all_faces: bool = False
    margin: float = 0.52
    upscale: int | None = None
    non_square: str = "pad"  # pad | refuse
    grid: bool = False
    overwrite: bool = False
    device: str = "auto"
    batch_size: int | None = None  # None: 16 on CUDA, 1 on CPU
    use_ema: bool = True


@dataclass
class Face:
    """One face to restore: its 16x16 LR, where it came from, and what was made of it."""

    inp: Input
    lr: Image.Image
    out: Path
    box: tuple[int, int, int, int] | None = None
    refs: list[dict[str, Any]] = field(default_factory=list)  # face_id, path, identity, distance
    sr: Image.Image | None = None


def check_library_scale(library: Path, scale: int) -> str | None:
    """A warning when the library's LR view was degraded at another scale than the checkpoint's."""
    cfg_path = library / "embed.config.json"
    if not cfg_path.is_file():
        return None  # retrieval itself says how to embed the library
    cfg = json.loads(cfg_path.read_text())
    lr_scale = cfg.get("lr_scale")
    if "lr" in cfg.get("views", []) and lr_scale and int(lr_scale) != scale:
        return (f"{library}: its LR view is x{lr_scale} (`refbuild embed --lr-scale {lr_scale}`) but the checkpoint is "
                f"x{scale}; continuing, but its manifests chose references at another degradation than this model's; "
                f"re-embed with --lr-scale {scale} for like-for-like references")
    return None


def prepare_faces(cfg: InferConfig, inputs: list[Input], scale: int, note: Callable[[str], None]
                  ) -> tuple[list[Face], dict[Path, dict[str, Any]]]:
    """The faces to restore, and a record per input (status, size, what was done to it)."""
    records: dict[Path, dict[str, Any]] = {}
    faces: list[Face] = []
    if not cfg.detect:
        changes = []
        for inp in inputs:
            im = load_rgb(inp.path)
            lr, change = square_lr(im, inp.path, cfg.non_square)
            if change:
                changes.append((inp.path, change))
            records[inp.path] = {"input": str(inp.path), "status": "ok", "size": list(im.size), "prepared": change}
            faces.append(Face(inp, lr, Path(f"{output_stem(cfg.out_dir, inp)}_x{scale}.png")))
        for line in change_notes(changes):
            note(line)
        return faces, records
    from .paste import crop, find_faces

    photos = [load_rgb(inp.path) for inp in inputs]
    for inp, photo, boxes in zip(inputs, photos, find_faces(photos, cfg.all_faces, cfg.margin, cfg.device)):
        rec = records[inp.path] = {"input": str(inp.path), "size": list(photo.size)}
        if isinstance(boxes, str) or not boxes:
            rec.update(status="skipped", reason=boxes if isinstance(boxes, str) else "no face found")
            note(f"{inp.path}: {rec['reason']}, skipped (recorded in infer.json)")
            continue
        rec["status"] = "ok"
        stem = output_stem(cfg.out_dir, inp)
        for k, box in enumerate(boxes):
            name = f"{stem}_face{k + 1}_x{scale}.png" if cfg.all_faces else f"{stem}_x{scale}.png"
            c = crop(photo, box)
            faces.append(Face(inp, c.resize((LR_SIZE, LR_SIZE), Image.BICUBIC), Path(name), box=box))
    return faces, records


def attach_references(cfg: InferConfig, faces: list[Face]) -> None:
    """Fill each face's references: the --refs files, or the library's nearest faces."""
    if cfg.library is None:
        for f in faces:
            f.refs = [{"face_id": None, "path": str(p), "identity": None, "distance": None} for p in cfg.refs]
        return
    from refbuild.errors import RefbuildError
    from refbuild.retrieve import retrieve

    try:
        found = retrieve(cfg.library, [f.lr for f in faces], m=cfg.num_refs, weights=cfg.weights, device=cfg.device)
    except RefbuildError as e:
        raise MsrError(str(e)) from None
    for f, refs in zip(faces, found):
        f.refs = [{"face_id": r.face_id, "path": str(r.path), "identity": r.identity, "distance": r.distance} for r in refs]


def restore(model: torch.nn.Module, faces: list[Face], batch_size: int, dev: torch.device) -> float:
    """Run the model over the faces (SR into each Face); returns faces per second."""
    S = model.out_size
    cache: dict[str, torch.Tensor] = {}

    def ref_tensor(p: str) -> torch.Tensor:
        if p not in cache:
            cache[p] = to_tensor(load_rgb(Path(p)).resize((S, S), Image.BICUBIC))
        return cache[p]

    t0 = time.perf_counter()
    for s in range(0, len(faces), batch_size):
        batch = faces[s : s + batch_size]
        M = max(len(f.refs) for f in batch)
        refs, mask = torch.zeros(len(batch), M, 3, S, S), torch.zeros(len(batch), M, dtype=torch.bool)
        for i, f in enumerate(batch):
            for j, r in enumerate(f.refs):
                refs[i, j], mask[i, j] = ref_tensor(r["path"]), True
        lr = torch.stack([to_tensor(f.lr) for f in batch]).to(dev)  # B, 3, 16, 16
        sr = model(lr, refs.to(dev), mask.to(dev)).float().cpu()  # B, 3, S, S
        for f, img in zip(batch, sr):
            f.sr = Image.fromarray(tensor_to_uint8(img))
    return len(faces) / max(time.perf_counter() - t0, 1e-9)


def write_grids(out_dir: Path, faces: list[Face], S: int, scale: int) -> list[Path]:
    """LR | bicubic | references | SR per face, GRID_ROWS faces per page: OUT/grid-001.png, ..."""
    M = max([len(f.refs) for f in faces] + [0])
    labels = ["LR 16x16", "bicubic", *(f"ref {k + 1}" for k in range(M)), f"SR x{scale}"]
    pages = []
    for p in range(0, len(faces), GRID_ROWS):
        rows = []
        for f in faces[p : p + GRID_ROWS]:
            refs = [load_rgb(Path(r["path"])) for r in f.refs] + [None] * (M - len(f.refs))
            rows.append([f.lr.resize((S, S), Image.NEAREST), f.lr.resize((S, S), Image.BICUBIC), *refs, f.sr])
        path = out_dir / f"grid-{p // GRID_ROWS + 1:03d}.png"
        save_png_atomic(labelled_grid(rows, labels, S), path)
        pages.append(path)
    for stale in set(out_dir.glob("grid-[0-9][0-9][0-9].png")) - set(pages):  # an earlier --overwrite'd run's
        stale.unlink()
    return pages


def infer(cfg: InferConfig, note: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Super-resolve every face the inputs hold; returns the `infer.json` record (also written to OUT).

    `note` receives one-line notices (resizing, no references, skipped photos, scale mismatch)."""
    if cfg.library is not None and cfg.refs:
        raise MsrError("give --refs or --library, not both")
    if len(cfg.refs) > 5 or not 0 <= cfg.num_refs <= 5:
        raise MsrError(f"{max(len(cfg.refs), cfg.num_refs)} references asked for; MSRNet takes 0 to 5")
    if cfg.non_square not in ("pad", "refuse"):
        raise MsrError(f"--non-square {cfg.non_square!r}: choose pad or refuse")
    missing = [p for p in cfg.refs if not Path(p).is_file()]
    if missing:
        raise MsrError(f"{missing[0]}: no such reference image; give existing files to --refs")
    inputs = collect_inputs(list(cfg.inputs))
    ck = load_checkpoint(cfg.checkpoint)
    if Path(ck.path) != Path(cfg.checkpoint):
        note(f"{cfg.checkpoint} is a folder: using {ck.path}")
    dev = pick_device(cfg.device)
    model = model_from_checkpoint(ck, cfg.use_ema).to(dev, memory_format=torch.channels_last).eval()
    scale, S = model.scale, model.out_size
    check_outputs(cfg.out_dir, inputs, scale, cfg.detect, cfg.overwrite)
    faces, records = prepare_faces(cfg, inputs, scale, note)
    takes_refs = getattr(model, "use_refs", True)
    if not takes_refs:
        if cfg.library is not None or cfg.refs:
            note(f"{ck.meta.get('model', 'this model')} takes no references: --library/--refs are ignored")
    elif cfg.library is None and not cfg.refs:
        note(NO_REFS_NOTE)
    elif cfg.library is not None and (warning := check_library_scale(cfg.library, scale)):
        note(warning)
    if not faces:
        raise MsrError(f"no face found in any of the {len(inputs)} photo(s) given; crop the faces by hand and "
                       "run without --detect")
    if takes_refs:
        attach_references(cfg, faces)
    batch_size = cfg.batch_size or (16 if dev.type == "cuda" else 1)  # on CPU a batch of 16 ran 0.7x one at a time
    with torch.no_grad():
        rate = restore(model, faces, batch_size, dev)
    for f in faces:
        f.out.parent.mkdir(parents=True, exist_ok=True)
        save_png_atomic(f.sr, f.out)
        records[f.inp.path].setdefault("faces", []).append(
            {"box": list(f.box) if f.box else None, "output": str(f.out), "references": f.refs})
    if cfg.detect:
        from .paste import auto_upscale, paste_back

        for inp in inputs:
            mine = [f for f in faces if f.inp is inp]
            if not mine:
                continue
            photo = load_rgb(inp.path)
            up = cfg.upscale or auto_upscale(photo.size, [f.box for f in mine], S, scale)
            paste = [f for f in mine if (f.box[2] - f.box[0]) * up <= PASTE_MAX * S]
            pasted = {id(f) for f in paste}
            for f in mine:
                if id(f) not in pasted:  # a 16x16 bottleneck would blur a face this large: keep the photo's own pixels
                    note(f"{inp.path}: a face of {f.box[2] - f.box[0]} px (x{up}) is larger than the model's {S} px "
                         f"output, so its SR ({f.out}) is not pasted back: it would blur the photo")
            out = Path(f"{output_stem(cfg.out_dir, inp)}_restored.png")
            save_png_atomic(paste_back(photo, [(f.box, f.sr) for f in paste], up), out)
            records[inp.path].update(restored=str(out), upscale=up)
            for f, face_rec in zip(mine, records[inp.path]["faces"]):
                face_rec["pasted"] = id(f) in pasted
    grids = write_grids(cfg.out_dir, faces, S, scale) if cfg.grid else []
    record = {
        "checkpoint": str(ck.path), "checkpoint_sha256": sha256_file(ck.path), "model": ck.meta["model"],
        "scale": scale, "weights": "ema" if cfg.use_ema and ck.section("ema") else "raw",
        "references": "library" if cfg.library else ("files" if cfg.refs else "none"),
        "library": str(cfg.library) if cfg.library else None, "detect": cfg.detect, "grids": [str(g) for g in grids],
        "faces_per_s": round(rate, 2), "inputs": [records[i.path] for i in inputs],
    }
    write_json(cfg.out_dir / "infer.json", record)
    return record
