"""Fixtures of the report tests: a small synthetic library with rejects, its report, and a headless Chromium.

The library is built with the CLI exactly as a user would (detect --aligned,
embed --backbone pixels, split, pair), from 60 generated PNGs in 12 identity
folders (more than one 50-card page) plus four bad files: three that cannot be
decoded (placeholders in the report) and one too small to use but readable
(a real thumbnail).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from refbuild.cli import app

REPO_ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
N_IDS, PER_ID = 12, 5
BAD_FILES = {"id00/broken.png": "not_an_image", "id01/empty.jpg": "not_an_image",
             "id02/truncated.png": "corrupt", "id03/tiny.png": "too_small"}


def invoke(*args: object, ok: bool = True):
    """Run `refbuild ARGS` in-process; ok=True asserts exit 0 and shows the output if not."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, f"refbuild {' '.join(map(str, args))} exited {res.exit_code}:\n{res.output}\n{res.exception!r}"
    return res


def make_photos(root: Path, seed: int = 0) -> None:
    """N_IDS identity folders of PER_ID synthetic 48x48 'faces' (an 8x8 pattern per identity plus noise), and BAD_FILES."""
    rng = np.random.default_rng(seed)
    for i in range(N_IDS):
        base = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
        d = root / f"id{i:02d}"
        d.mkdir(parents=True)
        for k in range(PER_ID):
            a = np.kron(base, np.ones((6, 6, 1))) + rng.normal(0, 20, (48, 48, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"img{k}.png")
    (root / "id00/broken.png").write_bytes(b"this is not a picture")
    (root / "id01/empty.jpg").write_bytes(b"")
    (root / "id02/truncated.png").write_bytes((root / "id02/img0.png").read_bytes()[:200])
    Image.new("RGB", (8, 8), (200, 40, 40)).save(root / "id03/tiny.png")


@dataclass
class Built:
    src: Path
    lib: Path
    report: Path
    n_ids: int = N_IDS
    per_id: int = PER_ID
    bad_files: dict = field(default_factory=lambda: dict(BAD_FILES))


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    tmp = tmp_path_factory.mktemp("report")
    src, lib, report = tmp / "src", tmp / "lib", tmp / "report"
    make_photos(src)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 64, "-q")
    invoke("embed", lib, "--backbone", "pixels", "--device", "cpu", "-q")
    invoke("split", lib, "--ratios", "2,1,1", "-q")
    invoke("pair", lib, "-m", 2, "--manifest-dir", tmp / "manifests", "--device", "cpu", "-q")
    invoke("report", lib, "--out", report, "-q")
    return Built(src, lib, report)


@pytest.fixture(scope="session")
def browser():
    """A headless Debian Chromium driven by Playwright; skips, saying why, when either is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(f"browser tier skipped: {CHROMIUM} not found (run scripts/install_browser.sh as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tier skipped: the `playwright` Python package is not installed (run scripts/install_browser.sh)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def open_page(browser):
    """open_page(html) -> a page on that file whose `problems` list collects console errors and
    warnings, page errors, failed requests and any request that leaves file://."""
    contexts = []

    def _open(html: Path):
        ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(ctx)
        pg = ctx.new_page()
        problems: list[str] = []
        pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
        pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        pg.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
        pg.on("request", lambda r: problems.append(f"left the folder: {r.url}") if not r.url.startswith("file://") else None)
        pg.goto(html.as_uri())
        pg.problems = problems
        return pg

    yield _open
    for ctx in contexts:
        ctx.close()


@pytest.fixture(scope="session")
def cli():
    """`cli(*args, ok=True)`: run refbuild in-process (see `invoke`)."""
    return invoke


@pytest.fixture(scope="session")
def keep_artifact():
    """`keep_artifact(png, name)`: copy a screenshot to <repo>/.artifacts/NAME when MSRFACE_ARTIFACTS is set."""
    def keep(png: Path, name: str) -> None:
        if os.environ.get("MSRFACE_ARTIFACTS"):
            REPO_ARTIFACTS.mkdir(exist_ok=True)
            shutil.copyfile(png, REPO_ARTIFACTS / name)
    return keep
