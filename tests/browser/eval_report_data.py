"""A tiny trained run and its `model eval --report`, for tests/browser/test_eval_report_browser.py.

60 smooth synthetic 64x64 'faces' (more than one 50-card page), each with 2
references of other faces; `msrnet_tiny_x4` trained 2 steps on CPU, a sample grid
written at every step; then `model eval --report` through the CLI as a user runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from data_manifests import TRAINING_MANIFEST, with_metadata

N_FACES, N_REFS, STEPS = 60, 2, 2


@dataclass
class EvalRun:
    manifest: Path
    run_dir: Path
    out: Path
    report: Path


def write_manifest(path: Path, root: Path, names: list[str]) -> Path:
    """A training_manifest over `root/names`: face i has identity i and the next N_REFS faces as references."""
    n = len(names)
    refs = [[names[(i + k) % n] for k in range(1, N_REFS + 1)] for i in range(n)]
    cols = {
        "face_id": [f"face{i:03d}" for i in range(n)],
        "hr_path": names,
        "identity": [f"id{i:03d}" for i in range(n)],
        "split": ["test"] * n,
        "ref_face_ids": [[Path(p).stem for p in r] for r in refs],
        "ref_paths": refs,
        "ref_identities": [["x"] * N_REFS for _ in refs],
        "ref_distances": [[float(k) for k in range(N_REFS)] for _ in refs],
        "schema_version": [1] * n,
    }
    table = with_metadata(pa.Table.from_pydict(cols, schema=TRAINING_MANIFEST), "training_manifest",
                          {"hr_root": str(root), "ref_root": str(root)})
    pq.write_table(table, path)
    return path


def build(tmp: Path) -> EvalRun:
    from model.cli import app
    from model.train import TrainConfig, train

    root = tmp / "faces"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(N_FACES):
        # smooth colour blobs with some detail, so that faces differ in how much SR gains
        small = (rng.random((4 + i % 5, 4 + i % 5, 3)) * 255).astype(np.uint8)
        names.append(f"img{i:03d}.png")
        Image.fromarray(small).resize((64, 64), Image.BICUBIC).save(root / names[-1])
    manifest = write_manifest(tmp / "test.parquet", root, names)
    cfg = TrainConfig(manifest=manifest, model="msrnet_tiny_x4", name="run", runs_dir=tmp / "runs", num_refs=N_REFS,
                      steps=STEPS, batch_size=4, sample_every=1, ckpt_every=STEPS, log_every=1, device="cpu",
                      progress=False)
    run_dir = train(cfg)
    out = tmp / "eval"
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(run_dir / "last.safetensors"), "--manifest",
                                   str(manifest), "--out", str(out), "--report", "--device", "cpu",
                                   "--batch-size", "16"])
    assert res.exit_code == 0, f"model eval --report exited {res.exit_code}:\n{res.output}\n{res.exception!r}"
    assert "report:" in res.output
    return EvalRun(manifest, run_dir, out, out / "report")
