"""`refbuild pair --same-person`: a positive control, an experiment mode, never the default.

Each query's references are the m nearest, by the pairing's own features and Eq. 2
distance on `--query-view`, among the OTHER photos of its OWN identity: never the
query itself, nor a copy or re-encoding of its photo (same sha256, a near-duplicate
crop by `refbuild.dupes`, a distance below DUP_EPS per dimension), and never two
references of one photo. Unlabelled faces have no identity, hence no references.

Splits are identity-disjoint, so a person's other photos all lie in the query's own
split: a train query's references are train photos, a test query's are test photos.
That is the point of the control, and why it is never a deployable pairing: the model
is shown real, misaligned photos of the very person it restores (another pose,
expression, light), information that references of other people cannot carry. What
it measures is whether the reference path can use such information at all; a test
score with these references says nothing about a library of strangers.

Every output says so: the manifests' and pairs' metadata carry
`pairing: same_person (experiment)`, the default name is `<library>_same_person`
(an explicit `--name` must contain `same_person`), pairs.parquet and pair.config.json
go beside the manifests (LIB's own pairing stays), and `refbuild audit` checks the
inverted identity invariant on such manifests (`manifest_checks`).
"""
from __future__ import annotations

import numpy as np

from refbuild.errors import RefbuildError
from refbuild.l1kernel import topk

TAG = "same_person"
PAIRING = "same_person (experiment)"
POOL = "own_split"  # the metadata's `pool`: a query's references come from its own split


def is_same_person(meta: dict[str, str]) -> bool:
    """Whether a manifest's (or pairs') metadata is of a same-person pairing."""
    return meta.get("pairing", "").startswith(TAG)


def check_config(cfg, cross: bool) -> None:
    """What --same-person refuses, before any work (cfg: `refbuild.pair.PairConfig`)."""
    if cross:
        raise RefbuildError("--same-person pairs a library's faces with other photos of their own identity; "
                            "drop --queries (another library's labels name other people)")
    if cfg.pool not in ("train", POOL):  # train: the default, which --same-person replaces by POOL
        raise RefbuildError(f"--pool {cfg.pool}: --same-person draws references from the query's own split "
                            "(its identity lives in no other); drop --pool")
    if cfg.index != "exact":
        raise RefbuildError("--same-person searches each identity's photos exactly; drop --index ivf")
    if cfg.name is not None and TAG not in cfg.name:
        raise RefbuildError(f"--name {cfg.name}: a same-person pairing is an experiment and says so in its name; "
                            f"use a name containing {TAG!r}, e.g. --name {cfg.name}_{TAG}")


def pool_rows(identity: list[str | None], split: list[str]) -> np.ndarray:
    """Faces that can be someone's reference: labelled, in a used split."""
    return np.array([i for i, (ident, s) in enumerate(zip(identity, split)) if ident is not None and s != "unused"],
                    dtype=np.int64)


def by_person(identity: list[str | None], split: list[str], rows: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Positions in `rows` of each (identity, split): a query's candidates, its own identity in its own split."""
    out: dict[tuple[str, str], list[int]] = {}
    for j, p in enumerate(rows):
        out.setdefault((identity[p], split[p]), []).append(j)
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}


def search_chunk(pool_mat: np.ndarray, q: np.ndarray, qi: list[int], side, rows: np.ndarray,
                 people: dict[tuple[str, str], np.ndarray], m: int, eps: float) -> list[dict]:
    """Top-m same-person references for the queries `qi` (rows of `side`, whose weighted features are `q`):
    exact L1 (refbuild.l1kernel) over each query's own identity, nearest first, ties by row.

    side: the library's `refbuild.pair.Side` (queries and pool are one library). rows: the pool's rows of
    `side`, `pool_mat` their weighted features. eps: DUP_EPS times the feature dimension."""
    groups: dict[tuple, list[int]] = {}  # one search per person: the chunk's queries by (identity, split)
    for r, i in enumerate(qi):
        groups.setdefault((side.identity[i], side.split[i]), []).append(r)
    found: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for key, rs in groups.items():
        cand = people.get(key, np.zeros(0, np.int64))
        if len(cand):
            dist, idx = topk(q[rs], pool_mat[cand], len(cand))
            found |= {r: (cand, dist[k], idx[k]) for k, r in enumerate(rs)}
    out = []
    for r, i in enumerate(qi):
        chosen: list[tuple[int, float]] = []
        if r in found:
            cand, dist, idx = found[r]
            for d, j in zip(dist, idx):
                p = int(rows[cand[j]])
                if p == i or d <= eps or side.sha[p] == side.sha[i] or side.photo[p] == side.photo[i] \
                        or side.photo[p] in {side.photo[c] for c, _ in chosen} or side.identity[p] != side.identity[i]:
                    continue  # itself, its photo (a copy, a re-encoding), a photo already given
                chosen.append((p, float(d)))
                if len(chosen) == m:
                    break
        out.append({
            "query_face_id": side.face_ids[i], "query_library": "self", "query_split": side.split[i],
            "query_identity": side.identity[i], "n_refs": len(chosen),
            "ref_face_ids": [side.face_ids[p] for p, _ in chosen],
            "ref_identities": [side.identity[p] for p, _ in chosen],
            "ref_distances": [d for _, d in chosen],
        })
    return out


def manifest_checks(name: str, rows: list[dict], faces: dict[str, dict], photo: dict[str, str],
                    split: dict[str, str]) -> list[tuple[str, int, list[str]]]:
    """`refbuild audit` on a same-person manifest, beyond what every manifest gets: its references are
    other photos (not the query's own photo: sha256 or near-duplicate; not two of one photo) from the
    query's own split. faces, photo, split: by face id, from the library (`audit.audit_library`).
    Returns (check name, items checked, violations) triples."""
    dup, one, own = [], [], []
    n = 0
    for r in rows:
        q = faces.get(r["face_id"])
        keys = [photo[f] for f in r["ref_face_ids"] or [] if f in photo]
        if len(set(keys)) < len(keys):
            one.append(f"{r['face_id']}: two of its references {r['ref_face_ids']} are one photo")
        for fid in r["ref_face_ids"] or []:
            n += 1
            ref = faces.get(fid)
            if q is None or ref is None:
                continue  # not this library's faces: the manifest's path checks report it
            near = photo.get(fid) is not None and photo.get(fid) == photo.get(q["face_id"])
            if ref["src_sha256"] == q["src_sha256"] or near:
                dup.append(f"{r['face_id']}: reference {fid} is its own photo (a copy or near-duplicate)")
            if split.get(fid) != split.get(r["face_id"]):
                own.append(f"{r['face_id']}: reference {fid} is in split {split.get(fid)}, the query in "
                           f"{split.get(r['face_id'])}")
    return [(f"{name}: same-person references are not the query's own photo", n, dup),
            (f"{name}: no two references of one photo (near-duplicates included)", len(rows), one),
            (f"{name}: same-person references come from the query's own split", n, own)]
