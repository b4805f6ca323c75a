"""`model eval --report`: one self-contained static HTML page about an evaluation.

`<eval out>/report/index.html` holds the metrics table (both conventions, bicubic
beside), a histogram of the per-face PSNR-Y gain, a gallery of LR | bicubic |
references | SR | HR per test face (sortable by PSNR gain and, when `model eval` scored
identity, by identity gain; paged over an inline JSON
blob) and the run's training sample grids. Pictures are small PNGs under
`report/img/` and `report/samples/` (copied from the checkpoint's run folder), so
the folder can be moved or zipped and opens without a server or a network; the
page's Content-Security-Policy forbids anything else.

The tiles are written during the evaluation pass (`EvalReport.add` is the
`visit` callback of `evaluate_dataset`), into `report.partial/`, which replaces
`report/` only once the page is written.
"""
from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from refbuild.htmlkit import safe_name, script_json

from .data import ManifestDataset
from .errors import MsrError
from .metrics import tensor_to_uint8
from .runlog import save_png_atomic

TEMPLATE = Path(__file__).with_name("report_template.html")
TILE = 128  # largest stored tile; x16 outputs are shrunk to it, smaller ones kept and enlarged by the page (pixelated)
PAGE_SIZE = 50
_COLUMNS = (("psnr_y", "PSNR Y", 3), ("ssim_y", "SSIM Y", 4), ("psnr_rgb", "PSNR RGB", 3), ("ssim_rgb", "SSIM RGB", 4))


def _num(x: float | None, digits: int) -> float | None:
    """A JSON-safe rounded number; None for inf/NaN (PSNR of identical images is inf)."""
    return round(x, digits) if x is not None and math.isfinite(x) else None


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def _dir_name(face_id: str) -> str:
    # face ids name folders; anything unusual is hashed so it stays one plain file name
    return safe_name(face_id)


def _tile(x: torch.Tensor, size: int) -> Image.Image:
    """3, H, W in [0, 1] -> a size x size PIL image: enlarged by nearest (pixels stay visible), shrunk by Lanczos."""
    im = Image.fromarray(tensor_to_uint8(x))
    if im.size == (size, size):
        return im
    return im.resize((size, size), Image.NEAREST if im.width < size else Image.LANCZOS)


REPORT_MARKER = "eval_report.json"  # in every report folder this writes: the only folders it replaces


def _refuse_foreign(folder: Path) -> None:
    """A non-empty folder without our marker holds someone else's files: never delete it."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / REPORT_MARKER).is_file():
        raise MsrError(f"{folder}: the folder holds files `model eval --report` did not write ({REPORT_MARKER} "
                       "missing); move them or give another --out")
    if folder.exists() and not folder.is_dir():
        raise MsrError(f"{folder}: a file is in the way of the report folder; move it or give another --out")


class EvalReport:
    """Collects the tiles during evaluation, then writes the page.

    Args:
        out: the report folder (`<eval out>/report`).
        ds: the evaluated dataset (scale, identities, reference mode).
    """

    def __init__(self, out: Path, ds: ManifestDataset):
        self.out, self.ds = Path(out), ds
        self.stage = self.out.with_name(self.out.name + ".partial")
        self.old = self.out.with_name(self.out.name + ".old")
        for folder in (self.out, self.stage, self.old):
            _refuse_foreign(folder)
        if self.stage.exists():  # left by a killed run
            shutil.rmtree(self.stage)
        (self.stage / "img").mkdir(parents=True)
        (self.stage / REPORT_MARKER).write_text(json.dumps({"writer": "model eval --report"}))  # first: ours
        self.identity = {r.face_id: r.identity for r in ds.rows}
        self.tiles: dict[str, list] = {}  # face_id -> [lr, bicubic, [refs], sr, hr] relative paths

    def add(self, face_id: str, lr: torch.Tensor, bicubic: torch.Tensor, refs: torch.Tensor,
            sr: torch.Tensor, hr: torch.Tensor) -> None:
        """One face: lr 3,16,16; bicubic, sr, hr 3,S,S; refs M,3,S,S (only the real ones); all [0, 1] on CPU."""
        d = f"img/{_dir_name(face_id)}"
        (self.stage / d).mkdir(exist_ok=True)
        size = min(hr.shape[-1], TILE)  # x4: 64, shown at 128 by the page
        rel = {}
        for name, x in (("lr", F.interpolate(lr[None], size=size, mode="nearest")[0]), ("bicubic", bicubic),
                        ("sr", sr), ("hr", hr)):
            rel[name] = f"{d}/{name}.png"
            save_png_atomic(_tile(x, size), self.stage / rel[name])
        ref_rels = []
        for k in range(refs.shape[0]):
            ref_rels.append(f"{d}/ref{k}.png")
            save_png_atomic(_tile(refs[k], size), self.stage / ref_rels[-1])
        self.tiles[face_id] = [rel["lr"], rel["bicubic"], ref_rels, rel["sr"], rel["hr"]]

    def _samples(self, run_dir: Path) -> list[list]:
        """Copy the run's sample grids into the report; returns [[rel, step, shown width, shown height], ...]."""
        grids = sorted(run_dir.glob("samples_*.png"))
        if grids:
            (self.stage / "samples").mkdir()
        out = []
        for g in grids:
            shutil.copyfile(g, self.stage / "samples" / g.name)
            step = g.stem.split("_", 1)[1].lstrip("0") or "0"
            with Image.open(g) as im:
                w, h = im.size
            zoom = max(1, min(2, 1280 // max(w, 1)))  # x4 grids (512 px wide) are shown at 2x, pixels kept sharp
            out.append([f"samples/{g.name}", int(step) if step.isdigit() else None, w * zoom, h * zoom])
        return out

    def write(self, rows: list[dict[str, Any]], summary: dict[str, Any], run_dir: Path) -> Path:
        """Write index.html next to the tiles and move the folder into place; returns index.html."""
        from refbuild.report import BASE_CSS, BASE_JS, svg_histogram  # the library report's look and chart

        faces = []
        for r in rows:
            fid = r["face_id"]
            bic, sr = r["bicubic_psnr_y"], r["sr_psnr_y"]
            gain = sr - bic if math.isfinite(sr) and math.isfinite(bic) else None
            faces.append([fid, self.identity.get(fid), _num(bic, 3), _num(sr, 3), _num(gain, 3),
                          _num(r["bicubic_ssim_y"], 4), _num(r["sr_ssim_y"], 4), self.tiles.get(fid),
                          *_identity_cells(r)])
        gains = [f[4] for f in faces if f[4] is not None]
        samples = self._samples(Path(run_dir))
        data = {"faces": faces, "samples": samples, "pageSize": PAGE_SIZE}
        try:
            template = TEMPLATE.read_text(encoding="utf-8")
        except OSError as e:
            raise MsrError(f"{TEMPLATE}: cannot read the report template ({e.strerror}); reinstall msrface") from None
        title = f"model eval: {summary['model']} on {Path(summary['manifest']).name}"
        page = (template.replace("{{TITLE}}", html.escape(title))
                .replace("{{SUB}}", html.escape(str(summary["checkpoint"])))
                .replace("{{METRICS}}", _metrics_html(summary, gains))
                .replace("{{CHARTS}}", svg_histogram(gains, "PSNR-Y gain per face", "SR minus bicubic, dB"))
                .replace("{{SAMPLES}}", _samples_html(samples, run_dir))
                .replace("{{DATA}}", script_json(data, allow_nan=False))
                .replace("{{BASE_CSS}}", BASE_CSS.read_text(encoding="utf-8"))
                .replace("{{BASE_JS}}", BASE_JS.read_text(encoding="utf-8")))  # the look of refbuild's report
        (self.stage / "index.html").write_text(page, encoding="utf-8")
        old = self.old
        if old.exists():
            shutil.rmtree(old)
        if self.out.exists():
            self.out.rename(old)
        self.stage.rename(self.out)
        if old.exists():
            shutil.rmtree(old)
        return self.out / "index.html"


def _identity_cells(r: dict[str, Any]) -> list:
    """[identity gain (bicubic minus SR distance to the HR; > 0: SR nearer), [bicubic distance, SR distance,
    SR verified, SR drifted, the reference identity it drifted to]], or [None, None] without identity."""
    if "sr_id_dist" not in r:
        return [None, None]
    return [_num(r["id_gain"], 4), [_num(r["bicubic_id_dist"], 4), _num(r["sr_id_dist"], 4), bool(r["sr_verified"]),
                                    bool(r["sr_drifted"]), r.get("sr_drift_ref")]]


def _identity_html(s: dict[str, Any]) -> str:
    """The identity box of the metrics row (summary["identity"])."""
    g = s["gallery"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    body = ""
    for m, label in (("hr", "HR"), ("bicubic", "bicubic"), ("sr", "SR")):
        x = s[m]
        ref = "n/a" if x.get("ref_distance") is None else f"{x['ref_distance']:.3f}"
        body += (f"<tr data-method='id-{m}'><td>{label}</td><td>{x['distance']:.3f}</td><td>{pct(x['verified'])}</td>"
                 f"<td>{pct(x['rank1'])}</td><td>{ref}</td><td>{'' if m == 'hr' else x.get('drifted', 'n/a')}</td></tr>")
    table = ("<table class='metrics'><thead><tr><th>identity</th><th>distance to HR</th><th>verified</th><th>rank-1</th>"
             f"<th>nearest ref</th><th>drifted to a ref</th></tr></thead><tbody>{body}</tbody></table>")
    note = (f"<p class='note'>dlib's face recogniser; same person when the distance is below {s['threshold']}. "
            f"Rank-1 among {g['identities']} identities against a gallery of {g['photos']} photos (each face's own "
            f"HR photo and its near-duplicates left out; {g['queries']} faces have another photo of their person). "
            "Drifted: the face verifies as one of its references (other people) rather than its own HR.</p>")
    return f"<div class='box'>{table}{note}</div>"


def _metrics_html(summary: dict[str, Any], gains: list[float]) -> str:
    head = "".join(f"<th>{h}</th>" for _, h, _ in _COLUMNS)
    body = ""
    for method, label in (("bicubic", "bicubic"), ("sr", "SR")):
        m = summary[method]
        body += f"<tr data-method='{method}'><td>{label}</td>" + "".join(
            f"<td data-key='{k}'>{_fmt(m[k], d)}</td>" for k, _, d in _COLUMNS) + "</tr>"
    body += "<tr class='diff'><td>SR &minus; bicubic</td>" + "".join(
        f"<td>{summary['sr'][k] - summary['bicubic'][k]:+.{d}f}</td>" for k, _, d in _COLUMNS) + "</tr>"
    metrics = f"<table class='metrics'><thead><tr><th>method</th>{head}</tr></thead><tbody>{body}</tbody></table>"
    scale = summary["scale"]
    note = (f"<p class='note'>Y: BT.601 luma, border crop {scale}; RGB: no crop. "
            "Means over every face; PSNR in dB.</p>")
    better = sum(g > 0 for g in gains)
    kv = [("faces", f"{summary['n']:,}"), ("scale", f"x{scale} (16 &rarr; {16 * scale} px)"),
          ("model", html.escape(str(summary["model"]))),
          ("references", f"{html.escape(str(summary['refs']))}, up to {summary['num_refs']} per face"),
          ("SR beats bicubic (PSNR Y)", f"{better:,} of {len(gains):,} faces"),
          ("manifest", f"<code>{html.escape(str(summary['manifest']))}</code>")]
    kv_html = "<table class='kv'>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in kv) + "</table>"
    ident = _identity_html(summary["identity"]) if summary.get("identity") else ""
    return f"<div class='box'>{metrics}{note}</div><div class='box'>{kv_html}</div>{ident}"


def _samples_html(samples: list[list], run_dir: Path) -> str:
    if not samples:
        return f"<p class='empty'>no sample grids (samples_*.png) in {html.escape(str(run_dir))}</p>"
    figs = "".join(
        f"<figure class='box sample'><figcaption>step {s if s is not None else '?'}</figcaption>"
        f"<a href='{html.escape(rel)}'><img src='{html.escape(rel)}' alt='samples at step {s}' width='{w}' height='{h}' "
        "loading='lazy'></a></figure>"
        for rel, s, w, h in samples)
    return ("<p class='note'>Rows of a training batch: LR | bicubic | references | SR | HR, "
            f"as the run wrote them.</p><div class='row'>{figs}</div>")
