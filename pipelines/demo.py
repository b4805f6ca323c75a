"""`make demo`: the reference-library pipeline end to end on real CelebA photos.

detect -> embed -> split -> pair (HR and LR view) -> audit -> DuckDB queries on
../shared/faces/celeba_wild_identity (identities from its labels.csv), then a
first result: the test split's faces shrunk to 16x16, restored by the shipped
checkpoint (weights/msrnet2_x8.safetensors) with references retrieved from the
library (`model infer --library --grid`), and scored against their originals
(`model eval --report`). By default a subset of identities, so it ends within
3 minutes on 2 CPU cores; `--full` runs all 1,519 photos. Every command is
printed as a user would type it.

Features: VGGFace when MSRFACE_VGGFACE_WEIGHTS points at vgg_face_dag.pth,
otherwise the `pixels` baseline (said in the output; VGGFace weights cannot be
downloaded in every environment).
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def faces_root() -> Path:
    return Path(os.environ.get("MSRFACE_FACES", REPO.parent / "shared" / "faces"))


def subset_labels(src: Path, out: Path, n_identities: int | None) -> int:
    """Write labels for the first n identities (by id) with at least 4 photos; returns image count."""
    with open(src / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_id = defaultdict(list)
    for r in rows:
        by_id[r["celeba_identity"]].append(r)
    ids = sorted((i for i, rs in by_id.items() if len(rs) >= 4), key=int)
    keep = ids if n_identities is None else ids[:n_identities]
    chosen = [r for i in keep for r in by_id[i]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "celeba_identity"])
        w.writeheader()
        w.writerows({"path": r["path"], "celeba_identity": r["celeba_identity"]} for r in chosen)
    return len(chosen)


def step(timings: list, name: str, *args: str, tool: str = "refbuild") -> None:
    cmd = [sys.executable, "-m", tool, *args]
    print(f"\n$ {tool} {shlex.join(args)}", flush=True)
    t = time.perf_counter()
    rc = subprocess.call(cmd)
    timings.append((name, time.perf_counter() - t))
    if rc != 0:
        sys.exit(f"demo: `{tool} {args[0]}` failed with exit code {rc}")


def find_manifest(manifest_dir: Path, lib: Path, name: str, split: str) -> Path:
    """Where `refbuild pair --name NAME --manifest-dir DIR` put a split's manifest."""
    for p in (manifest_dir / name / f"{split}.parquet", lib / "manifests" / name / f"{split}.parquet"):
        if p.is_file():
            return p
    sys.exit(f"demo: no {split}.parquet for manifest {name!r} under {manifest_dir} or {lib / 'manifests'}; "
             "rerun `make demo`")


def make_lr(manifest: Path, out: Path, scale: int) -> list[Path]:
    """Each manifest face degraded as `model eval` does (bicubic to 16*scale, then to 16x16): OUT/<face_id>.png."""
    import pyarrow.parquet as pq
    from PIL import Image

    from model.data import degrade

    table = pq.read_table(manifest, columns=["face_id", "hr_path"])
    hr_root = Path(table.schema.metadata[b"hr_root"].decode())
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for face_id, hr_path in zip(table["face_id"].to_pylist(), table["hr_path"].to_pylist()):
        with Image.open(hr_root / hr_path) as im:
            lr = degrade(im.convert("RGB"), scale)[1]
        lr.save(out / f"{face_id}.png")
        written.append(out / f"{face_id}.png")
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="all 1,519 photos of celeba_wild_identity")
    ap.add_argument("--identities", type=int, default=30, help="identities in the default subset")
    ap.add_argument("--out", type=Path, default=REPO / "demo_out")
    ap.add_argument("--manifest-dir", type=Path, default=None, help="default: the library's own, OUT/lib/manifests")
    args = ap.parse_args(argv)
    src = faces_root() / "celeba_wild_identity"
    if not (src / "labels.csv").is_file():
        sys.exit(f"demo: {src} not found; set MSRFACE_FACES to the folder holding celeba_wild_identity/")
    lib, labels = args.out / "lib", args.out / "labels_subset.csv"
    n = subset_labels(src, labels, None if args.full else args.identities)
    print(f"demo: {n} photos of {'all' if args.full else args.identities} identities from {src}")
    weights = os.environ.get("MSRFACE_VGGFACE_WEIGHTS")
    backbone = ["--backbone", "vggface", "--weights", weights] if weights else ["--backbone", "pixels"]
    if not weights:
        print("demo: MSRFACE_VGGFACE_WEIGHTS is not set, so references are matched on the `pixels` baseline "
              "descriptor, not VGGFace features")
    timings: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    # --margin 0.52 frames the faces as the shipped model's training crops (docs/DESIGN.md "Framing")
    step(timings, "detect", "detect", str(src), "--out", str(lib), "--labels", str(labels),
         "--identity-column", "celeba_identity", "--only-labeled", "--margin", "0.52")
    step(timings, "embed", "embed", str(lib), *backbone, "--views", "hr,lr")
    step(timings, "split", "split", str(lib), "--ratios", "14,3,1", "--seed", "0")
    mdir = ["--manifest-dir", str(args.manifest_dir)] if args.manifest_dir is not None else []
    # --overwrite on both: each replaces the library's own pairs.parquet with other settings (a rerun of the demo too)
    step(timings, "pair (hr view)", "pair", str(lib), "-m", "4", "--name", "celeba_wild", *mdir, "--overwrite")
    step(timings, "pair (lr view)", "pair", str(lib), "-m", "4", "--query-view", "lr", "--name", "celeba_wild_lr",
         *mdir, "--overwrite")
    manifest_dir = args.manifest_dir if args.manifest_dir is not None else lib / "manifests"
    shown = [find_manifest(manifest_dir, lib, n, s) for n in ("celeba_wild", "celeba_wild_lr") for s in ("train", "val", "test")]
    # every manifest the demo points the user to is audited, not only the last pairing's
    step(timings, "audit", "audit", str(lib), *[a for p in shown for a in ("--manifest", str(p))])
    for sql in [
        "SELECT reason, count(*) AS n FROM rejects GROUP BY reason ORDER BY n DESC",
        "SELECT s.split, count(*) AS faces, count(DISTINCT f.identity) AS identities "
        "FROM faces f JOIN splits s USING (face_id) GROUP BY s.split ORDER BY s.split",
        "SELECT query_split, round(avg(ref_distances[1]), 2) AS mean_top1_distance, "
        "round(avg(len(list_distinct(ref_identities))), 2) AS distinct_ref_identities FROM pairs GROUP BY 1 ORDER BY 1",
        "SELECT f.src_path, f.identity, round(f.prob, 4) AS prob, f.n_faces FROM faces f WHERE f.n_faces > 1 "
        "ORDER BY f.n_faces DESC LIMIT 5",
    ]:
        step(timings, "query", "query", str(lib), sql)
    ckpt = str(REPO / "weights" / "msrnet2_x8.safetensors")
    test = find_manifest(manifest_dir, lib, "celeba_wild_lr", "test")
    lr_dir, sr_dir, ev_dir = args.out / "lr16", args.out / "sr", args.out / "eval"
    t = time.perf_counter()
    lrs = make_lr(test, lr_dir, 8)
    timings.append(("make 16x16 LR", time.perf_counter() - t))
    print(f"\ndemo: the {len(lrs)} test faces (identities the library's train pool never saw) shrunk to 16x16 "
          f"in {lr_dir}")
    step(timings, "infer", "infer", "--checkpoint", ckpt, "--lr", str(lr_dir), "--library", str(lib),
         "--out", str(sr_dir), "--grid", "--overwrite", tool="model")
    # a few test faces of these photos are under 128 px: enlarged HR targets, which eval refuses unless told (and says)
    step(timings, "eval --report", "eval", "--checkpoint", ckpt, "--manifest", str(test), "--out", str(ev_dir),
         "--report", "--allow-enlarged", tool="model")
    total = time.perf_counter() - t0
    print("\ndemo: wall time per step (s)")
    for name, s in timings:
        print(f"  {name:<16} {s:7.1f}")
    print(f"  {'total':<16} {total:7.1f}")
    print(f"\ndemo: library in {lib}; training manifests in {test.parent.parent}/celeba_wild/{{train,val,test}}.parquet")
    print(f"demo: {len(lrs)} SR faces (16 -> 128) in {sr_dir}/, e.g. {sr_dir / (lrs[0].stem + '_x8.png')}")
    grids = sorted(sr_dir.glob("grid-*.png"))
    print(f"demo: comparison grid (a row per face: LR | bicubic | 4 references | SR): {grids[0]}"
          + (f" (pages up to {grids[-1].name})" if len(grids) > 1 else ""))
    print(f"demo: evaluation report (PSNR/SSIM, SR against bicubic): {ev_dir / 'report' / 'index.html'}")


if __name__ == "__main__":
    main()
