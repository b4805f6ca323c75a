"""Fixtures shared by every test package: where the real photos are."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def faces_root() -> Path:
    """The shared real-photo folder: $MSRFACE_FACES, else <repo>/../shared/faces."""
    return Path(os.environ.get("MSRFACE_FACES", REPO.parent / "shared" / "faces"))


@pytest.fixture(scope="session")
def real_faces() -> Path:
    """The real-photo folder; skips the test, saying why, when it is absent."""
    root = faces_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"real photos not found at {root} (set MSRFACE_FACES to the shared/faces folder)")
    return root
