"""`refbuild report`: the files it writes (no browser), then the page in a real headless Chromium."""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
PAGE = 50


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.data, self._in_data = [], "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src"))
        self._in_data = tag == "script" and a.get("id") == "data"

    def handle_data(self, data):
        if self._in_data:
            self.data += data

    def handle_endtag(self, tag):
        self._in_data = False


def _page(report: Path) -> tuple[str, list[str], dict]:
    text = (report / "index.html").read_text(encoding="utf-8")
    p = _Imgs()
    p.feed(text)
    return text, p.srcs, json.loads(p.data)


def _inside(report: Path, rel: str) -> bool:
    full = (report / rel).resolve()
    return full.is_file() and full.is_relative_to(report.resolve())


# ---- files, no browser -------------------------------------------------------------------------------------------

def test_every_picture_is_a_file_inside_the_report(built):
    text, srcs, data = _page(built.report)
    rels = srcs + [f[2] for f in data["faces"].values() if f[2]] + [r[3] for r in data["rejects"] if r[3]]
    assert len(rels) >= built.n_ids * built.per_id + 1
    bad = [r for r in rels if not _inside(built.report, r) or r.startswith("/") or ":" in r]
    assert not bad, f"pictures outside the report folder or missing: {bad[:5]}"
    assert not re.search(r"https?://", text), "the page must not name any network address"
    assert "<link" not in text and "@import" not in text


def test_summary_and_charts(built):
    text, _, data = _page(built.report)
    n_faces = built.n_ids * built.per_id
    assert len(data["faces"]) == n_faces and len(data["queries"]) == n_faces
    assert f"<td>{n_faces}</td>" in text
    for split in ("train", "val", "test"):
        assert f"<td>{split}</td>" in text
    assert text.count("<svg") == 1  # the distance histogram; --aligned faces have no detection probability
    assert "no values" in text


def test_rejects_have_reasons_and_readable_ones_a_thumbnail(built):
    _, _, data = _page(built.report)
    bad = built.bad_files
    rows = {r[0]: r for r in data["rejects"]}
    assert {k: rows[k][1] for k in bad} == bad
    assert rows["id03/tiny.png"][3] is not None  # readable, too small: a real thumbnail
    assert all(rows[k][3] is None for k in bad if k != "id03/tiny.png")  # placeholders


def test_rerun_skips_thumbnails_and_writes_the_same_page(built, cli, tmp_path):
    out = tmp_path / "r"
    cli("report", built.lib, "--out", out, "-q")
    thumbs = {p: p.stat().st_mtime_ns for p in (out / "thumbs").rglob("*.jpg")}
    page = (out / "index.html").read_bytes()
    cli("report", built.lib, "--out", out, "-q")
    assert {p: p.stat().st_mtime_ns for p in (out / "thumbs").rglob("*.jpg")} == thumbs
    assert (out / "index.html").read_bytes() == page
    assert not list(out.rglob(".tmp-*"))


def test_refuses_a_foreign_folder_and_a_missing_library(built, cli, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = cli("report", built.lib, "--out", tmp_path / "mine", ok=False)
    assert res.exit_code == 1 and "not empty" in res.output and "Traceback" not in res.output
    res = cli("report", tmp_path / "nolib", "--out", tmp_path / "r", ok=False)
    assert res.exit_code == 1 and "faces.parquet" in res.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- the page in headless Chromium ---------------------------------------------------------------------------------

@pytest.fixture()
def page(open_page, built):
    return open_page(built.report / "index.html")


def _cards(pg) -> list[str]:
    return pg.eval_on_selector_all("#q-gallery .card .query", "els => els.map(e => e.dataset.faceId)")


def _load_all_images(pg) -> list[str]:
    """Force every lazy image to load; returns the src of those that did not."""
    pg.eval_on_selector_all("img", "els => els.forEach(i => { i.loading = 'eager'; })")
    deadline = time.monotonic() + 15
    # polled from here: wait_for_function would eval() in the page, which the page's CSP forbids
    while not pg.evaluate("() => [...document.images].every(i => i.complete)"):
        assert time.monotonic() < deadline, "images still loading after 15 s"
        pg.wait_for_timeout(50)
    return pg.eval_on_selector_all("img", "els => els.filter(i => !(i.naturalWidth > 0)).map(i => i.getAttribute('src'))")


def test_page_loads_every_image_without_errors(page, built, keep_artifact, tmp_path):
    assert len(_cards(page)) == PAGE
    assert page.locator("#r-gallery .card").count() == len(built.bad_files)
    assert page.locator("#r-gallery .ph").count() == len(built.bad_files) - 1
    assert _load_all_images(page) == []
    assert page.eval_on_selector_all("img", "els => els.length") >= PAGE * 3 + 1
    png = tmp_path / "report.png"
    page.screenshot(path=str(png), full_page=True)
    assert png.stat().st_size > 10_000
    keep_artifact(png, "report.png")
    assert page.problems == []


def test_paging_filter_and_search(page, built):
    first = _cards(page)
    page.click("#q-next")
    second = _cards(page)
    assert len(second) == built.n_ids * built.per_id - PAGE and not set(first) & set(second)
    assert page.is_disabled("#q-next") and not page.is_disabled("#q-prev")
    assert _load_all_images(page) == []

    splits = Counter(pq.read_table(built.lib / "pairs.parquet").column("query_split").to_pylist())
    for split, n in splits.items():
        page.select_option("#q-split", split)
        assert len(_cards(page)) == min(n, PAGE), split
        assert page.get_attribute("#q-gallery", "data-total") == str(n)
    page.select_option("#q-split", "")

    page.fill("#q-search", "id03")
    cards = _cards(page)
    assert len(cards) == built.per_id
    assert page.eval_on_selector_all("#q-gallery .query .who", "els => els.map(e => e.textContent)") == ["id03"] * built.per_id
    page.fill("#q-search", cards[0][:10])  # part of a face id
    assert _cards(page) == [cards[0]]
    page.fill("#q-search", "nobody")
    assert _cards(page) == [] and "nothing matches" in page.inner_text("#q-gallery")
    page.fill("#q-search", "")
    assert _cards(page) == first

    page.select_option("#r-reason", "not_an_image")
    assert page.locator("#r-gallery .card").count() == 2
    assert page.problems == []
