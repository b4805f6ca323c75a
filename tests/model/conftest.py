"""Fixtures for the model tests: tiny manifests of synthetic and of real faces."""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_manifests import TRAINING_MANIFEST, with_metadata

REPO = Path(__file__).resolve().parents[2]


def faces_root() -> Path:
    return Path(os.environ.get("MSRFACE_FACES", REPO.parent / "shared" / "faces"))


def write_manifest(path: Path, rows: list[dict], hr_root: Path, ref_root: Path) -> Path:
    """rows: face_id, hr_path, identity, ref_paths (list) -> a training_manifest file."""
    cols = {
        "face_id": [r["face_id"] for r in rows],
        "hr_path": [r["hr_path"] for r in rows],
        "identity": [r["identity"] for r in rows],
        "split": ["train"] * len(rows),
        "ref_face_ids": [[Path(p).stem for p in r["ref_paths"]] for r in rows],
        "ref_paths": [r["ref_paths"] for r in rows],
        "ref_identities": [r.get("ref_identities", ["x"] * len(r["ref_paths"])) for r in rows],
        "ref_distances": [[float(i) for i in range(len(r["ref_paths"]))] for r in rows],
        "schema_version": [1] * len(rows),
    }
    table = pa.Table.from_pydict(cols, schema=TRAINING_MANIFEST)
    table = with_metadata(table, "training_manifest", {"hr_root": str(hr_root), "ref_root": str(ref_root)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _smooth_image(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """A smooth random colour image (low-frequency noise upsampled)."""
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory) -> Path:
    """8 smooth synthetic 256x256 'faces' of 8 identities, 4 references each (other identities)."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    names = []
    for i in range(8):
        name = f"img{i}.png"
        _smooth_image(rng).save(root / name)
        names.append(name)
    rows = [
        {"face_id": f"f{i}", "hr_path": names[i], "identity": f"id{i}",
         "ref_paths": [names[(i + k) % 8] for k in range(1, 5)]}
        for i in range(8)
    ]
    return write_manifest(root / "train.parquet", rows, root, root)


def photos_by_identity(src: Path) -> dict[str, list[str]]:
    """celeba_facecrops' labels.csv: identity -> its photos' paths (relative to `src`), in file order."""
    by_id: dict[str, list[str]] = defaultdict(list)
    with open(src / "labels.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            by_id[r["celeba_identity"]].append(r["path"])
    return by_id


@pytest.fixture(scope="session", name="photos_by_identity")
def _photos_by_identity_fixture():
    """`photos_by_identity` for test modules (a conftest is not importable by name from them)."""
    return photos_by_identity


@pytest.fixture(scope="session")
def real_manifest(tmp_path_factory) -> Path:
    """8 CelebA face crops (8 identities) resized to 256x256 PNG; refs = 4 faces of other identities."""
    src = faces_root() / "celeba_facecrops"
    if not (src / "labels.csv").is_file():
        pytest.skip(f"real faces not found at {src} (set MSRFACE_FACES to the shared faces folder)")
    by_id = photos_by_identity(src)
    ids = sorted(by_id, key=lambda i: (-len(by_id[i]), i))[:12]
    root = tmp_path_factory.mktemp("real")
    picked = []
    for ident in ids:
        rel = sorted(by_id[ident])[0]
        out = f"{ident}_{Path(rel).stem}.png"
        with Image.open(src / rel) as im:
            im.convert("RGB").resize((256, 256), Image.BICUBIC).save(root / out)
        picked.append((ident, out))
    train, pool = picked[:8], picked[8:]
    rows = [
        {"face_id": Path(p).stem, "hr_path": p, "identity": ident,
         "ref_paths": [q for j, q in pool if j != ident][:4], "ref_identities": [j for j, _ in pool][:4]}
        for ident, p in train
    ]
    return write_manifest(root / "train.parquet", rows, root, root)


@pytest.fixture
def manifest_writer():
    """The `write_manifest` helper, for tests that build broken manifests."""
    return write_manifest


@pytest.fixture
def comparison_manifests(synthetic_manifest, tmp_path) -> Path:
    """A `--manifests` folder for the comparison recipes: the fixture's 8 faces as both train and test split."""
    import shutil

    man = tmp_path / "man"
    man.mkdir()
    shutil.copy(synthetic_manifest, man / "train.parquet")
    shutil.copy(synthetic_manifest, man / "test.parquet")
    return man
