"""`model eval --report`: the files it writes (no browser), then the page in a real headless Chromium."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval_report_data import N_FACES, N_REFS, STEPS, EvalRun, build
from test_report_browser import _inside, _load_all_images

PAGE = 50


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> EvalRun:
    return build(tmp_path_factory.mktemp("eval_report"))


class _Page(HTMLParser):
    """img srcs, the inline JSON blob, and the metrics table cells as {method: {key: text}}."""

    def __init__(self):
        super().__init__()
        self.srcs, self.data, self.metrics = [], "", {}
        self._in_data, self._method, self._key = False, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src"))
        elif tag == "tr":
            self._method = a.get("data-method")
        elif tag == "td":
            self._key = a.get("data-key")
        self._in_data = tag == "script" and a.get("id") == "data"

    def handle_data(self, data):
        if self._in_data:
            self.data += data
        elif self._method and self._key:
            self.metrics.setdefault(self._method, {})[self._key] = data

    def handle_endtag(self, tag):
        self._in_data, self._key = False, None


def _parse(report: Path) -> tuple[str, _Page, dict]:
    text = (report / "index.html").read_text(encoding="utf-8")
    p = _Page()
    p.feed(text)
    return text, p, json.loads(p.data)


# ---- files, no browser -------------------------------------------------------------------------------------------

def test_every_picture_is_a_file_inside_the_report(run):
    text, page, data = _parse(run.report)
    rels = list(page.srcs)
    for f in data["faces"]:
        lr, bic, refs, sr, hr = f[7]
        assert len(refs) == N_REFS
        rels += [lr, bic, *refs, sr, hr]
    rels += [s[0] for s in data["samples"]]
    assert len(data["faces"]) == N_FACES and len(data["samples"]) == STEPS
    assert len(rels) >= N_FACES * (4 + N_REFS) + STEPS
    bad = [r for r in rels if not _inside(run.report, r) or r.startswith("/") or ":" in r]
    assert not bad, f"pictures outside the report folder or missing: {bad[:5]}"
    assert not re.search(r"https?://", text), "the page must not name any network address"
    assert "<link" not in text and "@import" not in text
    assert sorted(p.name for p in (run.report / "samples").iterdir()) == sorted(p.name for p in run.run_dir.glob("samples_*.png"))
    assert not (run.out / "report.partial").exists()


def test_metrics_table_holds_the_summary(run):
    _, page, data = _parse(run.report)
    summary = json.loads((run.out / "summary.json").read_text())
    for method in ("bicubic", "sr"):
        for key, digits in (("psnr_y", 3), ("ssim_y", 4), ("psnr_rgb", 3), ("ssim_rgb", 4)):
            assert page.metrics[method][key] == f"{summary[method][key]:.{digits}f}", (method, key)
    # the cards agree with per_image.csv through the summary's means
    gains = [f[4] for f in data["faces"]]
    mean_gain = summary["sr"]["psnr_y"] - summary["bicubic"]["psnr_y"]
    assert sum(gains) / len(gains) == pytest.approx(mean_gain, abs=2e-3)


# ---- the page in headless Chromium ---------------------------------------------------------------------------------

@pytest.fixture()
def page(open_page, run):
    return open_page(run.report / "index.html")


def _cards(pg) -> list[tuple[str, float]]:
    return pg.eval_on_selector_all("#f-gallery .card", "els => els.map(e => [e.dataset.faceId, Number(e.dataset.gain)])")


def test_page_loads_every_image_without_errors(page, keep_artifact, tmp_path):
    assert len(_cards(page)) == PAGE
    assert _load_all_images(page) == []
    assert page.eval_on_selector_all("#f-gallery img", "els => els.length") == PAGE * (4 + N_REFS)
    assert page.eval_on_selector_all("#s-grids img", "els => els.length") == STEPS
    png = tmp_path / "eval_report.png"
    page.screenshot(path=str(png), full_page=True)
    assert png.stat().st_size > 10_000
    keep_artifact(png, "eval_report.png")
    assert page.problems == []


def test_sorting_and_paging(page, run):
    _, _, data = _parse(run.report)
    gains = [f[4] for f in data["faces"]]
    first = _cards(page)
    assert [c[0] for c in first] == sorted(f[0] for f in data["faces"])[:PAGE]

    page.select_option("#f-sort", "gain-desc")
    desc = _cards(page)
    assert desc[0][1] == pytest.approx(max(gains)) and desc != first
    assert [g for _, g in desc] == sorted((g for _, g in desc), reverse=True)
    page.select_option("#f-sort", "gain-asc")
    assert _cards(page)[0][1] == pytest.approx(min(gains))

    page.click("#f-next")
    second = _cards(page)
    assert len(second) == N_FACES - PAGE and page.is_disabled("#f-next") and not page.is_disabled("#f-prev")
    assert page.inner_text("#f-page") == "page 2 of 2"
    assert [g for _, g in second] == sorted(gains)[PAGE:]
    assert _load_all_images(page) == []
    page.click("#f-prev")
    assert len(_cards(page)) == PAGE and page.is_disabled("#f-prev")

    page.fill("#f-search", "face007")
    assert [c[0] for c in _cards(page)] == ["face007"]
    page.fill("#f-search", "nobody")
    assert _cards(page) == [] and "nothing matches" in page.inner_text("#f-gallery")
    assert page.problems == []
