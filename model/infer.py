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

With --detect only faces that need it are restored (`model/paste.py`, docs/DESIGN.md
"Restoring faces in whole photos"): each face's decision and its reason go into
`infer.json`. A photo that cannot be read, or holds no face, is one skip with a one-line
reason; the rest go on. Without --checkpoint, --detect uses the realistic-degradation
checkpoint where it is shipped (`DEFAULT_REAL`), else the clean one (`DEFAULT_CLEAN`).
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
from .ensemble import super_resolve
from .errors import MsrError
from .inputs import Input, change_notes, check_outputs, collect_inputs, output_stem, square_lr
from .metrics import tensor_to_uint8
from .msrnet import LR_SIZE
from .paste import BACK_PROJECT, MAX_FACE, MIN_AGREEMENT, MIN_FACE, MIN_PROB
from .runlog import labelled_grid, save_png_atomic

GRID_ROWS = 16  # faces per grid page
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_CLEAN = "msrnet2_x8.safetensors"  # bicubic-degraded training: the paper's setting, the benchmarks'
DEFAULT_REAL = "msrnet2_x8_real.safetensors"  # realistic degradations: whole photos (--detect) when shipped
NO_REFS_NOTE = ("running with no references (the model is trained to work without them); "
                "give --library LIB to retrieve them per face, or --refs IMG (up to 5) to use the same for every face")


@dataclass(frozen=True)
class InferConfig:
    """What one `model infer` run does; written into `infer.json`."""

    checkpoint: Path | None  # None: default_checkpoint(detect)
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
    min_face: int = MIN_FACE  # --detect: smallest face looked for (detector box width, px)
    min_prob: float = MIN_PROB  # --detect: MTCNN probability a face must reach
    max_face: float = MAX_FACE  # --detect: wider faces are left as they were
    min_agreement: float = MIN_AGREEMENT  # --detect: dB; a restoration that disagrees more with its face is not pasted
    back_project: int = BACK_PROJECT  # --detect: back-projection rounds fitting each restoration to its face (0: none)
    self_ensemble: bool = True  # average each face's output with its mirror image's (model.ensemble; x2 compute)


@dataclass
class Face:
    """One face to restore: its 16x16 LR, where it came from, and what was made of it."""

    inp: Input
    lr: Image.Image
    out: Path
    box: tuple[int, int, int, int] | None = None
    refs: list[dict[str, Any]] = field(default_factory=list)  # face_id, path, identity, distance
    sr: Image.Image | None = None
    record: dict[str, Any] | None = None  # --detect: its entry in infer.json's "faces"


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


def default_checkpoint(detect: bool, weights: Path | None = None) -> tuple[Path, str]:
    """The checkpoint used without --checkpoint (from `weights`, default WEIGHTS), and why: for whole
    photos (--detect) the realistic-degradation one where it is shipped, else (and for face crops) the clean one."""
    weights = WEIGHTS if weights is None else weights
    real, clean = weights / DEFAULT_REAL, weights / DEFAULT_CLEAN
    if detect and real.is_file():
        return real, "default for whole photos (--detect): trained on realistic degradations"
    if not clean.is_file():
        raise MsrError(f"no --checkpoint given and {clean} is not there; give --checkpoint FILE (or a run folder)")
    if detect:
        return clean, f"default; {real.name}, the realistic-degradation checkpoint, is not in {weights}"
    return clean, "default for face crops: trained on bicubic-degraded 16x16 faces"


def load_input(path: Path) -> Image.Image | str:
    """The image, or why it cannot be used (one line): unreadable, or too large to open."""
    try:
        return load_rgb(path)
    except MsrError as e:
        return str(e)
    except Image.DecompressionBombError as e:  # PIL's guard against images that would fill memory
        return f"{path}: too large to open ({e})"


def prepare_faces(cfg: InferConfig, inputs: list[Input], scale: int, note: Callable[[str], None]
                  ) -> tuple[list[Face], dict[Path, dict[str, Any]]]:
    """The faces to restore, and a record per input (status, size, what was done to it).

    An input that cannot be read is skipped with its reason; when none can be, that is the error."""
    records: dict[Path, dict[str, Any]] = {}
    faces: list[Face] = []
    images = {inp.path: load_input(inp.path) for inp in inputs}
    bad = [(path, im) for path, im in images.items() if isinstance(im, str)]  # (path, why)
    if bad and len(bad) == len(inputs):
        raise MsrError(bad[0][1] if len(bad) == 1 else f"none of the {len(bad)} inputs can be read; first {bad[0][1]}")
    for path, reason in bad:
        records[path] = {"input": str(path), "status": "skipped", "reason": reason}
        note(f"{reason}; skipped (recorded in infer.json)")
    if not cfg.detect:
        changes = []
        for inp in inputs:
            im = images[inp.path]
            if isinstance(im, str):
                continue
            lr, change = square_lr(im, inp.path, cfg.non_square)
            if change:
                changes.append((inp.path, change))
            records[inp.path] = {"input": str(inp.path), "status": "ok", "size": list(im.size), "prepared": change}
            faces.append(Face(inp, lr, Path(f"{output_stem(cfg.out_dir, inp)}_x{scale}.png")))
        for line in change_notes(changes):
            note(line)
        return faces, records
    from .paste import crop, find_faces, size_rule

    good = [inp for inp in inputs if not isinstance(images[inp.path], str)]
    photos = [images[inp.path] for inp in good]
    found_all = find_faces(photos, cfg.margin, cfg.device, min_face=cfg.min_face, min_prob=cfg.min_prob)
    for inp, photo, found in zip(good, photos, found_all):
        rec = records[inp.path] = {"input": str(inp.path), "size": list(photo.size)}
        if isinstance(found, str) or not found:
            rec.update(status="skipped", reason=found if isinstance(found, str) else "no face found")
            note(f"{inp.path}: {rec['reason']}, skipped (recorded in infer.json)")
            continue
        rec.update(status="ok", faces_found=len(found), faces=[])
        stem = output_stem(cfg.out_dir, inp)
        for k, fd in enumerate(found if cfg.all_faces else found[:1]):
            face_rec = {"box": list(fd.box), "detector_box": list(fd.detector_box), "width": round(fd.width, 1),
                        "prob": round(fd.prob, 4)}
            rec["faces"].append(face_rec)
            why = size_rule(fd.width, cfg.max_face)
            if why:
                face_rec.update(decision="left", reason=why, pasted=False)
                continue
            name = f"{stem}_face{k + 1}_x{scale}.png" if cfg.all_faces else f"{stem}_x{scale}.png"
            c = crop(photo, fd.box)
            faces.append(Face(inp, c.resize((LR_SIZE, LR_SIZE), Image.BICUBIC), Path(name), box=fd.box, record=face_rec))
    return faces, records


def _left_boxes(rec: dict[str, Any]) -> list[tuple[float, ...]]:
    """The detector boxes of the photo's faces left as they were (no paste may reach into them)."""
    return [tuple(face["detector_box"]) for face in rec["faces"] if face.get("decision") == "left"]


def paste_photo(cfg: InferConfig, inp: Input, rec: dict[str, Any], mine: list[Face], S: int, scale: int) -> None:
    """Fit each restored face of one photo to its face and paste those `paste_rule` lets through;
    the photo's record (rec) gains its status, upscale and restored file, each face its decision."""
    from .paste import auto_upscale, covered, crop, fit_to_face, paste_back, paste_rule

    photo = load_rgb(inp.path)
    up = cfg.upscale or (auto_upscale(photo.size, [f.box for f in mine], S, scale) if mine else 1)
    paste = []
    wider = _left_boxes(rec)  # faces the size rule left; the loop below may leave more
    for f in mine:
        face = crop(photo, f.box)
        side = face.width * up
        fitted, agreement = fit_to_face(f.sr, face, side, cfg.back_project)
        why = paste_rule(side, face.width, agreement, cfg.min_agreement, sr_side=f.sr.width,
                         inside_left=covered(f.box, wider))
        f.record.update(agreement_db=round(agreement, 2), pasted=why is None, decision="left" if why else "restored",
                        reason=why or f"at most {cfg.max_face:g} px wide: restored x{scale}, pasted at x{up}")
        if not why:
            paste.append((f.box, fitted))
    rec["upscale"] = up
    if not paste:
        reasons = sorted({face["reason"].split(":")[0] for face in rec["faces"]})
        rec.update(status="nothing_restored", reason=f"nothing restored: {len(rec['faces'])} face(s) left as they "
                                                      f"were ({'; '.join(reasons)})")
        return
    out = Path(f"{output_stem(cfg.out_dir, inp)}_restored.png")
    save_png_atomic(paste_back(photo, paste, up, keep_out=_left_boxes(rec)), out)
    rec.update(status="restored", restored=str(out))


def summary_line(record: dict[str, Any]) -> str:
    """'3 face(s) restored, 2 left as they were (wider than 40 px); 1 photo(s) skipped (...)' for a --detect run."""
    faces = [f for i in record["inputs"] for f in i.get("faces", [])]
    restored = sum(f.get("decision") == "restored" for f in faces)
    left: dict[str, int] = {}
    for f in faces:
        if f.get("decision") == "left":
            kind = f["reason"].split(":")[0]  # "restoration disagrees with the face: 25.1 dB < ...": by kind
            left[kind] = left.get(kind, 0) + 1
    line = f"{restored} face(s) restored, {sum(left.values())} left as they were"
    if left:
        line += " (" + "; ".join(f"{n} {k}" if len(left) > 1 else k for k, n in left.items()) + ")"
    more = sum(i.get("faces_found", 0) - len(i.get("faces", [])) for i in record["inputs"])
    if more:
        line += f"; {more} more face(s) found, considered with --all-faces"
    nothing = sum(i["status"] == "nothing_restored" for i in record["inputs"])
    if nothing:
        line += f"; nothing restored in {nothing} photo(s)"
    skipped = [i for i in record["inputs"] if i["status"] == "skipped"]
    if skipped:
        line += f"; {len(skipped)} photo(s) skipped (first: {skipped[0]['reason']})"
    return line


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


def restore(model: torch.nn.Module, faces: list[Face], batch_size: int, dev: torch.device,
            self_ensemble: bool = True) -> float:
    """Run the model over the faces (SR into each Face; `self_ensemble`: x2 flip); returns faces per second."""
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
        sr = super_resolve(model, lr, refs.to(dev), mask.to(dev), self_ensemble).cpu()  # B, 3, S, S
        for f, img in zip(batch, sr):
            f.sr = Image.fromarray(tensor_to_uint8(img))
    return len(faces) / max(time.perf_counter() - t0, 1e-9)


def write_grids(out_dir: Path, faces: list[Face], S: int, scale: int) -> list[Path]:
    """LR | bicubic | references | SR per face, GRID_ROWS faces per page: OUT/grid-001.png, ..."""
    M = max([len(f.refs) for f in faces] + [0])
    labels = ["LR 16x16", "bicubic", *(f"ref {k + 1}" for k in range(M)), f"SR x{scale}"]
    pages = []
    per_input: dict[Path, int] = {}
    names = []  # each row names its input file (and which of its faces, when a photo has several)
    for f in faces:
        per_input[f.inp.path] = per_input.get(f.inp.path, 0) + 1
        names.append(f.inp.rel.as_posix() + (f" (face {per_input[f.inp.path]})" if f.box is not None else ""))
    for p in range(0, len(faces), GRID_ROWS):
        rows = []
        for f in faces[p : p + GRID_ROWS]:
            refs = [load_rgb(Path(r["path"])) for r in f.refs] + [None] * (M - len(f.refs))
            rows.append([f.lr.resize((S, S), Image.NEAREST), f.lr.resize((S, S), Image.BICUBIC), *refs, f.sr])
        path = out_dir / f"grid-{p // GRID_ROWS + 1:03d}.png"
        save_png_atomic(labelled_grid(rows, labels, S, names[p : p + GRID_ROWS]), path)
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
    given = cfg.checkpoint is not None
    path, why = (cfg.checkpoint, "given") if given else default_checkpoint(cfg.detect)
    ck = load_checkpoint(path)
    if Path(ck.path) != Path(path):
        note(f"{path} is a folder: using {ck.path}")
    dev = pick_device(cfg.device)
    model = model_from_checkpoint(ck, cfg.use_ema).to(dev, memory_format=torch.channels_last).eval()
    scale, S = model.scale, model.out_size
    if not given:
        note(f"model: {ck.meta['model']} from {ck.path} ({why})")
    check_outputs(cfg.out_dir, inputs, scale, cfg.detect, cfg.overwrite)
    faces, records = prepare_faces(cfg, inputs, scale, note)
    takes_refs = getattr(model, "use_refs", True)
    if not takes_refs:
        if cfg.library is not None or cfg.refs:
            note(f"{ck.meta.get('model', 'this model')} takes no references: --library/--refs are ignored")
    elif cfg.library is None and not cfg.refs and faces:  # no face to restore: nothing to say about references
        note(NO_REFS_NOTE)
    elif cfg.library is not None and (warning := check_library_scale(cfg.library, scale)):
        note(warning)
    if not faces and not any(r.get("faces") for r in records.values()):
        raise MsrError(f"no face found in any of the {len(inputs)} photo(s) given; crop the faces by hand and "
                       "run without --detect" + (f", or lower --min-prob (now {cfg.min_prob:g})" if cfg.detect else ""))
    if takes_refs and faces:
        attach_references(cfg, faces)
    batch_size = cfg.batch_size or (16 if dev.type == "cuda" else 1)  # on CPU a batch of 16 ran 0.7x one at a time
    with torch.no_grad():
        rate = restore(model, faces, batch_size, dev, cfg.self_ensemble) if faces else 0.0
    for f in faces:
        f.out.parent.mkdir(parents=True, exist_ok=True)
        save_png_atomic(f.sr, f.out)
        if f.record is None:
            f.record = {"box": None}
            records[f.inp.path].setdefault("faces", []).append(f.record)
        f.record.update(output=str(f.out), references=f.refs)
    if cfg.detect:
        for inp in inputs:
            rec = records[inp.path]
            if rec["status"] != "skipped":
                paste_photo(cfg, inp, rec, [f for f in faces if f.inp is inp], S, scale)
    grids = write_grids(cfg.out_dir, faces, S, scale) if cfg.grid else []
    record = {
        "checkpoint": str(ck.path), "checkpoint_choice": why, "checkpoint_sha256": sha256_file(ck.path), "model": ck.meta["model"],
        "scale": scale, "weights": "ema" if cfg.use_ema and ck.section("ema") else "raw", "self_ensemble": cfg.self_ensemble,
        "references": "library" if cfg.library else ("files" if cfg.refs else "none"),
        "library": str(cfg.library) if cfg.library else None, "detect": cfg.detect, "grids": [str(g) for g in grids],
        "detection": {"min_face": cfg.min_face, "min_prob": cfg.min_prob, "max_face": cfg.max_face,
                      "min_agreement_db": cfg.min_agreement, "back_project": cfg.back_project} if cfg.detect else None,
        "faces_per_s": round(rate, 2), "inputs": [records[i.path] for i in inputs],
    }
    write_json(cfg.out_dir / "infer.json", record)
    return record
