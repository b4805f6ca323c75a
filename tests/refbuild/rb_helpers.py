"""Helpers for the refbuild tests (imported by the test files as `rb_helpers`): synthetic face folders and CLI invocation.

Synthetic "faces" are small PNGs: an 8x8 colour pattern per identity, upsampled,
plus per-photo noise. They are no faces at all, which is fine for the
`--aligned` path (no detector) and the pixel backbone.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from refbuild.cli import app

# the byte-identical photo placed under two identities (a CelebA-style label error)
DUP_ORIGINAL = "id00/img0.png"
DUP_COPY = "id01/dup.png"


def make_faces(root: Path, n_ids: int = 10, per_id: int = 4, size: int = 48, seed: int = 0,
               prefix: str = "id", duplicate: bool = True) -> list[str]:
    """Write identity folders of synthetic face PNGs; returns relative paths."""
    rng = np.random.default_rng(seed)
    rels = []
    for i in range(n_ids):
        base = rng.integers(0, 256, (8, 8, 3)).astype(np.float64)
        d = root / f"{prefix}{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_id):
            a = np.kron(base, np.ones((size // 8, size // 8, 1))) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"img{k}.png")
            rels.append(f"{prefix}{i:02d}/img{k}.png")
    if duplicate:
        shutil.copyfile(root / DUP_ORIGINAL, root / DUP_COPY)
        rels.append(DUP_COPY)
    return sorted(rels)


def invoke(*args: object, ok: bool = True, env: dict | None = None):
    """Run `refbuild ARGS` in-process. ok=True asserts exit 0 (showing the output if not)."""
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if ok:
        assert res.exit_code == 0, f"refbuild {' '.join(map(str, args))} exited {res.exit_code}:\n{res.output}\n{res.exception!r}"
    return res


def one_line_error(res) -> str:
    """Assert a user-error exit (code 1, one 'error:' line, no traceback); return the line."""
    assert res.exit_code == 1, f"exit {res.exit_code}, output:\n{res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@dataclass
class Built:
    src: Path
    lib: Path
    manifests: Path  # the folder holding train/val/test.parquet


def build(tmp: Path, m: int = 2, n_ids: int = 10, per_id: int = 4, views: str = "hr,lr", seed: int = 0,
          extra_detect: tuple = ()) -> Built:
    """detect --aligned -> embed pixels -> split -> pair -m M, all under `tmp`."""
    src, lib, mdir = tmp / "src", tmp / "lib", tmp / "manifests"
    make_faces(src, n_ids=n_ids, per_id=per_id, seed=seed)
    invoke("detect", src, "--out", lib, "--aligned", "--identity-from-folder", "--crop-size", 32, "-q", *extra_detect)
    invoke("embed", lib, "--backbone", "pixels", "--views", views, "--device", "cpu", "-q")
    invoke("split", lib, "-q")
    invoke("pair", lib, "-m", m, "--manifest-dir", mdir, "--device", "cpu", "-q")
    return Built(src, lib, mdir / "lib")
