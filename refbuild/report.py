"""`refbuild report`: one self-contained static HTML page about a library.

The page (`OUT/index.html`) holds everything but the pictures: inline CSS and
JS, the summary tables and the histograms as inline SVG rendered here, and the
galleries' rows as an inline JSON blob the page pages through (50 cards a
page). Pictures are small JPEG thumbnails under `OUT/thumbs/`, named after the
face id (or a hash of a reject's source path), so the folder can be moved or
zipped and opens without a server or a network. A rerun only makes the
thumbnails that are missing or older than their source, and deletes the temp
files a killed run left; two reports never write one folder at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import html
import io
import json
import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_manifests import ManifestError, metadata, read_table
from refbuild.errors import RefbuildError
from refbuild.htmlkit import safe_name, script_json
from refbuild.images import REJECT_REASONS
from refbuild.io import config_dict, remove_orphan_temps, write_bytes, write_json
from refbuild.library import Library
from refbuild.progress import bar, summary

MARKER = "report.json"  # written first and last; a non-empty --out without it is not ours to write into
TEMPLATE = Path(__file__).with_name("report_template.html")
BASE_CSS = Path(__file__).with_name("report_base.css")  # shared with model/report_template.html
BASE_JS = Path(__file__).with_name("report_base.js")  # el() and the gallery pager, shared likewise
_MAX_SRC_PIXELS = 64_000_000  # rejects are untrusted files: refuse to decode bombs


@dataclass(frozen=True)
class ReportConfig:
    lib: Path
    out: Path
    thumb_size: int = 96
    quality: int = 85
    page_size: int = 50
    workers: int = 8
    quiet: bool = False


@dataclass(frozen=True)
class Thumb:
    """One thumbnail to make: `src` shrunk into `rel` (relative to the report folder)."""
    src: Path
    rel: str


def _read(path: Path, name: str, stage: str, lib: Library, required: bool):
    if not path.is_file():
        if required:
            lib.require(path, stage)
        return None, {}
    try:
        return read_table(path, name).to_pylist(), metadata(path)
    except ManifestError as e:
        raise RefbuildError(str(e)) from None


def _face_thumb(face_id: str) -> str:
    # face ids are hex-index; anything else (another tool's ids) is hashed so it stays a plain file name
    name = safe_name(face_id)
    return f"thumbs/{name[:2]}/{name}.jpg"


def _reject_thumb(src_path: str) -> str:
    return f"thumbs/rejects/{hashlib.sha256(src_path.encode()).hexdigest()[:24]}.jpg"


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel when it stays inside root (symlinks resolved), else None."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return None
    try:
        full = (root / p).resolve()
        full.relative_to(root.resolve())
    except (OSError, ValueError):
        return None
    return full


def make_thumb(src: Path, size: int, quality: int) -> bytes:
    """A JPEG no larger than size x size, aspect kept. Raises RefbuildError naming the file."""
    try:
        with Image.open(src) as im:
            if im.width * im.height > _MAX_SRC_PIXELS:
                raise RefbuildError(f"{src}: {im.width}x{im.height} pixels, too large to preview")
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality, optimize=True)
            return buf.getvalue()
    except RefbuildError:
        raise
    except Exception as e:  # PIL raises many types (OSError, ValueError, SyntaxError, ...) for damaged files
        raise RefbuildError(f"{src}: cannot preview ({type(e).__name__}: {e})") from None


def _stale(target: Path, src: Path) -> bool:
    try:
        return not target.is_file() or target.stat().st_mtime < src.stat().st_mtime
    except OSError:
        return True


def make_thumbs(todo: list[Thumb], out: Path, cfg: ReportConfig, force: bool) -> dict[str, str]:
    """Write the missing or stale thumbnails in a thread pool; returns {rel: error} for the failed ones."""
    need = [t for t in todo if force or _stale(out / t.rel, t.src)]
    errors: dict[str, str] = {}

    def one(t: Thumb) -> None:
        try:
            write_bytes(out / t.rel, make_thumb(t.src, cfg.thumb_size, cfg.quality))
        except RefbuildError as e:
            errors[t.rel] = str(e)
            (out / t.rel).unlink(missing_ok=True)

    with bar(cfg.quiet) as progress, ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        task = progress.add_task("thumbnails", total=len(need))
        for _ in pool.map(one, need):
            progress.advance(task)
    return errors


def _prune(out: Path, keep: set[str]) -> int:
    """Delete thumbnails of faces no longer in the library, so a zipped report holds only what it shows."""
    n = 0
    for p in (out / "thumbs").rglob("*.jpg"):
        if p.relative_to(out).as_posix() not in keep:
            p.unlink(missing_ok=True)
            n += 1
    return n


def nice_step(span: float, n: int) -> float:
    """A round tick step (1, 2 or 5 x 10^k) giving at most about n intervals over span."""
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def svg_histogram(values: list[float], title: str, xlabel: str, bins: int = 40,
                  bounds: tuple[float, float] | None = None) -> str:
    """An inline SVG bar chart of `values` (finite ones only); a note when there are none.

    bounds: the values' possible range (a probability: (0, 1)); the axis never leaves it."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    head = f"<figure class='chart'><figcaption>{html.escape(title)}</figcaption>"
    if v.size == 0:
        return head + f"<p class='empty'>no values ({html.escape(xlabel)})</p></figure>"
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:  # one value: a narrow range around it, inside the bounds
        pad = max(abs(lo) * 0.01, 1e-3)
        lo, hi = lo - pad, hi + pad
        if bounds is not None and hi > bounds[1]:  # e.g. every probability is 1.0: the range ends at 1
            lo, hi = bounds[1] - 2 * pad, bounds[1]
        elif bounds is not None and lo < bounds[0]:
            lo, hi = bounds[0], bounds[0] + 2 * pad
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    w, h, ml, mr, mt, mb = 560, 220, 48, 28, 10, 40
    pw, ph = w - ml - mr, h - mt - mb
    ystep = max(1, int(nice_step(max(int(counts.max()), 1), 4)))  # whole counts only
    peak = ystep * math.ceil(max(int(counts.max()), 1) / ystep)
    bw = pw / bins
    parts = [f"<svg viewBox='0 0 {w} {h}' width='{w}' height='{h}' role='img' aria-label='{html.escape(title)}'>"]
    for c in range(0, peak + 1, ystep):  # y grid and labels: 0 at the bottom, the axis top at the top
        y = mt + ph * (1 - c / peak)
        parts.append(f"<line class='grid' x1='{ml}' x2='{w - mr}' y1='{y:.1f}' y2='{y:.1f}'/>"
                     f"<text class='tick' x='{ml - 6}' y='{y + 4:.1f}' text-anchor='end'>{c:,}</text>")
    for i, c in enumerate(counts):
        bh = ph * c / peak
        parts.append(f"<rect class='bar' x='{ml + i * bw + 0.5:.1f}' y='{mt + ph - bh:.1f}' width='{max(bw - 1, 0.5):.1f}' "
                     f"height='{bh:.1f}'><title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {int(c):,}</title></rect>")
    xstep = nice_step(hi - lo, 5)
    for k in range(math.ceil(lo / xstep - 1e-9), math.floor(hi / xstep + 1e-9) + 1):  # x labels at round values
        val = k * xstep
        x = ml + pw * (val - lo) / (hi - lo)
        parts.append(f"<text class='tick' x='{x:.1f}' y='{mt + ph + 16}' text-anchor='middle'>{val:.6g}</text>")
    parts.append(f"<line class='axis' x1='{ml}' x2='{w - mr}' y1='{mt + ph}' y2='{mt + ph}'/>"
                 f"<text class='label' x='{ml + pw / 2:.0f}' y='{h - 4}' text-anchor='middle'>"
                 f"{html.escape(xlabel)} (n = {v.size:,})</text></svg>")
    return head + "".join(parts) + "</figure>"


def _table(header: tuple[str, ...], rows: list[tuple], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(f'{c:,}' if isinstance(c, int) else str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(lib: Library, faces: list[dict], split_of: dict[str, str], rejects: list[dict],
                  pairs_meta: dict[str, str], n_queries: int) -> str:
    ids = {f["identity"] for f in faces if f["identity"] is not None}
    unlabeled = sum(f["identity"] is None for f in faces)
    overview = [("faces", len(faces)), ("identities", len(ids)), ("faces without identity", unlabeled),
                ("source images rejected", len(rejects)), ("queries with references", n_queries)]
    if pairs_meta:
        overview += [("features", pairs_meta.get("note") or pairs_meta.get("backbone", "?")),  # says weights where any
                     ("references per query (m)", pairs_meta.get("m", "?")),
                     ("reference pool / query view", f"{pairs_meta.get('pool', '?')} / {pairs_meta.get('query_view', '?')}")]
    out = [_table(("", ""), overview, "kv")]
    if split_of:
        per: dict[str, list] = defaultdict(lambda: [0, set()])
        for f in faces:
            s = split_of.get(f["face_id"], "(none)")
            per[s][0] += 1
            if f["identity"] is not None:
                per[s][1].add(f["identity"])
        order = {"train": 0, "val": 1, "test": 2}
        rows = [(s, n, len(i)) for s, (n, i) in sorted(per.items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))]
        out.append(_table(("split", "faces", "identities"), rows))
    else:
        out.append(f"<p class='empty'>no splits yet: run <code>refbuild split {html.escape(str(lib.root))}</code></p>")
    if rejects:
        by = Counter(r["reason"] for r in rejects)
        out.append(_table(("reject reason", "images", "meaning"),
                          [(k, n, REJECT_REASONS.get(k, "")) for k, n in by.most_common()]))
    else:
        out.append("<p class='empty'>no rejected source images</p>")
    return "".join(f"<div class='box'>{t}</div>" for t in out)


def _check_out(cfg: ReportConfig) -> None:
    out, lib = cfg.out, cfg.lib
    if not (lib / "faces.parquet").is_file():
        raise RefbuildError(f"{lib / 'faces.parquet'}: missing; run `refbuild detect --out {lib}` first")
    if out.exists() and not out.is_dir():
        raise RefbuildError(f"{out}: exists and is not a folder; pick another --out")
    if out.resolve() == lib.resolve():
        raise RefbuildError(f"{out}: is the library folder itself; pick another --out, e.g. {lib}/report")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RefbuildError(f"{out}: folder is not empty and holds no refbuild report ({MARKER}); "
                            "pick a new or empty --out")
    if cfg.thumb_size < 16 or not 1 <= cfg.quality <= 95 or cfg.page_size < 1:
        raise RefbuildError("--thumb-size is at least 16, --quality 1..95, --page-size at least 1")


@contextlib.contextmanager
def _held(out: Path) -> Iterator[None]:
    """Hold OUT for this run (an flock on the folder itself: no lock file in the report) and
    delete the temp files a killed run left in it: while we hold it, none is another run's."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY)
    except OSError as e:
        raise RefbuildError(f"{out}: cannot create the report folder ({e.strerror or e}); "
                            "fix permissions or pick another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RefbuildError(f"{out}: another refbuild report is writing this folder; "
                                "wait for it to finish and rerun") from None
        except OSError:  # a file system without flock: run unlocked, leaving temp files alone
            pass
        else:
            remove_orphan_temps(out, recursive=True)
        yield
    finally:
        os.close(fd)


def run(cfg: ReportConfig) -> dict:
    """Write OUT/index.html, OUT/thumbs/ and OUT/report.json; returns the summary counts."""
    _check_out(cfg)
    with _held(cfg.out):
        return _write_report(cfg)


def _write_report(cfg: ReportConfig) -> dict:
    lib, out = Library(cfg.lib), cfg.out
    faces, faces_meta = _read(lib.faces, "faces", "detect", lib, required=True)
    rejects, _ = _read(lib.rejects, "rejects", "detect", lib, required=False)
    splits, _ = _read(lib.splits, "splits", "split", lib, required=False)
    pairs, pairs_meta = _read(lib.pairs, "pairs", "pair", lib, required=False)
    rejects, splits = rejects or [], splits or []
    split_of = {s["face_id"]: s["split"] for s in splits}

    thumbs: dict[str, Thumb] = {}
    face_rows: dict[str, list] = {}  # face_id -> [identity, split, thumb]
    for f in faces:
        src = _inside(lib.root, f["crop_path"] or "")
        rel = _face_thumb(f["face_id"])
        if src is not None:
            thumbs[rel] = Thumb(src, rel)
        face_rows[f["face_id"]] = [f["identity"], split_of.get(f["face_id"]), rel if src is not None else None]
    src_root = faces_meta.get("src_root")
    reject_rows = []
    for r in rejects:
        rel = _reject_thumb(r["src_path"])
        src = _inside(Path(src_root), r["src_path"]) if src_root else None
        if src is not None and src.is_file():
            thumbs[rel] = Thumb(src, rel)
        ok = src is not None and src.is_file()
        reject_rows.append([r["src_path"], r["reason"], r["detail"] or "", rel if ok else None,
                            None if ok else "source image not found or outside its folder"])

    prev = {}
    if (out / MARKER).is_file():
        try:
            prev = json.loads((out / MARKER).read_text())
        except (OSError, ValueError):
            prev = {}
    force = (prev.get("thumb_size"), prev.get("quality")) != (cfg.thumb_size, cfg.quality)
    # first: a killed run leaves a folder a rerun recognises as its own, and resumes
    write_json(out / MARKER, {**config_dict(cfg), "finished": False})
    errors = make_thumbs(sorted(thumbs.values(), key=lambda t: t.rel), out, cfg, force)
    for row in face_rows.values():
        if row[2] in errors:
            row[2] = None
    for row in reject_rows:
        if row[3] in errors:
            row[3], row[4] = None, errors[row[3]]
    pruned = _prune(out, set(thumbs) - set(errors))

    if pairs is None:  # no references yet: every face is a query without references
        queries = [[fid, row[1], row[0], [], []] for fid, row in face_rows.items()]
    else:
        queries = [[p["query_face_id"], p["query_split"], p["query_identity"], p["ref_face_ids"],
                    [round(d, 4) for d in p["ref_distances"]]] for p in pairs]
        for p in pairs:  # refs name faces of this library; a foreign query (--queries LIB2) has no thumbnail here
            for fid, ident in zip(p["ref_face_ids"], p["ref_identities"]):
                face_rows.setdefault(fid, [ident, split_of.get(fid), None])
            face_rows.setdefault(p["query_face_id"], [p["query_identity"], p["query_split"], None])
    data = {"faces": face_rows, "queries": queries, "rejects": reject_rows, "pageSize": cfg.page_size,
            "reasons": REJECT_REASONS}

    probs = [f["prob"] for f in faces]
    dists = [d for p in (pairs or []) for d in p["ref_distances"]]
    charts = (svg_histogram(probs, "Detection probability", "MTCNN probability (NaN for --aligned, not shown)", bounds=(0.0, 1.0))
              + svg_histogram(dists, "Reference distance", "Eq. 2 distance, every stored reference"))
    try:
        template = TEMPLATE.read_text(encoding="utf-8")
    except OSError as e:
        raise RefbuildError(f"{TEMPLATE}: cannot read the report template ({e.strerror}); reinstall msrface") from None
    page = (template.replace("{{TITLE}}", html.escape(f"refbuild report: {lib.root.resolve().name}"))
            .replace("{{LIB}}", html.escape(str(lib.root.resolve())))
            .replace("{{SUMMARY}}", _summary_html(lib, faces, split_of, rejects, pairs_meta, len(pairs or [])))
            .replace("{{CHARTS}}", charts)
            .replace("{{DATA}}", script_json(data))
            .replace("{{BASE_CSS}}", BASE_CSS.read_text(encoding="utf-8"))
            .replace("{{BASE_JS}}", BASE_JS.read_text(encoding="utf-8")))
    write_bytes(out / "index.html", page.encode("utf-8"))
    counts = {"faces": len(faces), "queries": len(queries), "rejects": len(rejects), "thumbnails": len(thumbs),
              "thumbnails_failed": len(errors), "thumbnails_pruned": pruned}
    write_json(out / MARKER, {**config_dict(cfg), **counts, "finished": True})
    summary(f"refbuild report -> {out / 'index.html'}", list(counts.items()), cfg.quiet)
    return counts
