"""How well one slice of a library's features separates same-person from other-person pairs.

    python scripts/embed_identity_auc.py LIB [--view hr] [--slice -1]

ROC AUC of the cosine similarity over all pairs of faces with an identity label: same-identity
pairs are the positives, every other pair the negatives (the issue-24 figure: `refbuild embed
--backbone dlib`'s last slice, the 128-D descriptor, against `pixels`). Reads LIB/faces.parquet and
LIB/features.parquet (or features_<view>.parquet) with the slices recorded in its metadata.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from refbuild.library import Library  # noqa: E402


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney: the chance a random positive outscores a random negative (ties count half)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    ranks = np.empty(len(s), np.float64)
    edges = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
    for a, b in zip(edges[:-1], edges[1:]):  # average ranks over ties
        ranks[a:b] = (a + b + 1) / 2
    r = np.empty_like(ranks)
    r[order] = ranks
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lib", type=Path)
    ap.add_argument("--view", default="hr")
    ap.add_argument("--slice", type=int, default=-1, help="which layer slice (default: the last)")
    a = ap.parse_args()
    lib = Library(a.lib)
    feats = pq.read_table(lib.features(a.view))
    meta = {k.decode(): v.decode() for k, v in (feats.schema.metadata or {}).items()}
    lo, hi = json.loads(meta["slices"])[a.slice]
    ident = dict(zip(*pq.read_table(lib.faces, columns=["face_id", "identity"]).to_pydict().values()))
    ids = feats.column("face_id").to_pylist()
    keep = [i for i, f in enumerate(ids) if ident.get(f)]
    x = np.stack(feats.column("features").to_numpy(zero_copy_only=False))[keep, lo:hi].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.array([ident[ids[i]] for i in keep])
    iu = np.triu_indices(len(keep), 1)
    cos = (x @ x.T)[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    print(json.dumps({"backbone": meta.get("backbone"), "view": a.view, "slice": [lo, hi],
                      "layer": json.loads(meta["layers"])[a.slice], "faces": len(keep),
                      "identities": len(set(labels)), "same_pairs": int(same.sum()),
                      "other_pairs": int((~same).sum()), "roc_auc": round(roc_auc(cos, same), 4)}))


if __name__ == "__main__":
    main()
