"""Identity metrics: pure functions of face-recogniser embeddings (no model inside a metric).

Embeddings are rows of float arrays, N, D (dlib's 128-D descriptors, not normalised); distances are
Euclidean, the recogniser's own measure, and a pair is "the same person" below `THRESHOLD` (dlib's
0.6). Used by `model eval` (`model.identity_eval` computes the embeddings), documented in
docs/DESIGN.md "Identity in evaluation":

- `pair_distances`: per face, distance of the restored face (SR or bicubic) to its own HR;
- `verified`: that distance below the threshold;
- `gallery_allowed` + `rank1`: identification among the split's identities against a gallery of
  each identity's *other* photos, never the query's HR photo nor a near-duplicate of it;
- `drift`: the restored face verifies as one of its references (photos of other people) rather
  than as its own HR: a wrong person returned with exit 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THRESHOLD = 0.6  # dlib's same-person rule: Euclidean distance < 0.6
DUP_DISTANCE = 0.2  # a gallery photo this close to the query's HR (embeddings) counts as the same photo
DUP_CORR = 0.997  # ... or whose thumbnails correlate this much (refbuild.dupes.NEAR_DUP_CORR)


def pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance: a, b N, D -> N."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different shapes: {a.shape} vs {b.shape}")
    return np.linalg.norm(a - b, axis=1)


def cross_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairs: a N, D and b M, D -> N, M Euclidean distances."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T  # N, M
    return np.sqrt(np.maximum(d2, 0.0))


def verified(dist: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Distance -> same person by the recogniser's rule (strictly below the threshold)."""
    return np.asarray(dist) < threshold


def gallery_allowed(query_ids: list[str], gallery_ids: list[str], hr_to_gallery: np.ndarray,
                    pixel_corr: np.ndarray | None = None, dup_distance: float = DUP_DISTANCE,
                    dup_corr: float = DUP_CORR) -> np.ndarray:
    """Which gallery photos each query may be matched against: Q, G bool.

    A query's own HR photo (the same face id) is never in its gallery, nor a near-duplicate of it:
    a gallery photo whose embedding lies within `dup_distance` of the query's HR embedding
    (`hr_to_gallery`, Q, G), or whose thumbnail correlates >= `dup_corr` with the HR's (`pixel_corr`,
    Q, G; `refbuild.dupes.thumbnails` rows dotted). Both are decided on the HR, so SR, bicubic and HR
    queries of one face face the same gallery."""
    hr_to_gallery = np.asarray(hr_to_gallery)
    if hr_to_gallery.shape != (len(query_ids), len(gallery_ids)):
        raise ValueError(f"hr_to_gallery is {hr_to_gallery.shape}, want {(len(query_ids), len(gallery_ids))}")
    same = np.asarray(query_ids, object)[:, None] == np.asarray(gallery_ids, object)[None, :]
    dup = hr_to_gallery < dup_distance
    if pixel_corr is not None:
        dup |= np.asarray(pixel_corr) >= dup_corr
    return ~(same | dup)


@dataclass(frozen=True)
class Rank1:
    """Rank-1 identification of Q queries.

    hit: Q bool, the nearest allowed gallery photo is of the query's identity.
    eligible: Q bool, the query has an identity and at least one allowed gallery photo of it
        (only these count: `rate`).
    predicted: Q identities of the nearest allowed gallery photo (None: no allowed photo at all).
    """

    hit: np.ndarray
    eligible: np.ndarray
    predicted: list

    @property
    def rate(self) -> float | None:
        n = int(self.eligible.sum())
        return float((self.hit & self.eligible).sum() / n) if n else None


def rank1(queries: np.ndarray, query_identity: list, gallery: np.ndarray, gallery_identity: list,
          allowed: np.ndarray) -> Rank1:
    """Nearest-neighbour identification: each query (Q, D) against the allowed (Q, G) gallery
    photos (G, D); a hit when the nearest one's identity is the query's. Gallery identities should
    be the split's (other people's photos are the distractors)."""
    d = np.where(allowed, cross_distances(queries, gallery), np.inf)  # Q, G
    nearest = d.argmin(axis=1) if d.shape[1] else np.zeros(len(d), int)
    gid = np.asarray(gallery_identity, object)
    qid = np.asarray(query_identity, object)
    own = (gid[None, :] == qid[:, None]) & allowed & (qid[:, None] != None)  # noqa: E711 (elementwise)
    eligible = own.any(axis=1)
    found = np.isfinite(d[np.arange(len(d)), nearest]) if d.shape[1] else np.zeros(len(d), bool)
    predicted = [gid[j] if ok else None for j, ok in zip(nearest, found)]
    hit = np.array([ok and p == q for ok, p, q in zip(found, predicted, qid)], bool) & eligible
    return Rank1(hit=hit, eligible=eligible, predicted=predicted)


@dataclass(frozen=True)
class Drift:
    """Per face, the restored face against its references (photos of other people).

    ref_distance: N, distance to the nearest reference (NaN: the face had no reference).
    nearest: N, index of that reference (-1: none).
    drifted: N bool, it verifies as that reference rather than as its own HR:
        d(x, ref) < threshold and d(x, ref) < d(x, own HR).
    """

    ref_distance: np.ndarray
    nearest: np.ndarray
    drifted: np.ndarray


def drift(own_distance: np.ndarray, ref_distances: np.ndarray, threshold: float = THRESHOLD) -> Drift:
    """own_distance N (to the face's own HR), ref_distances N, K (to each reference; NaN where a face
    has fewer than K) -> `Drift`."""
    own = np.asarray(own_distance, np.float64)
    refs = np.asarray(ref_distances, np.float64).reshape(len(own), -1)  # N, K
    has = ~np.isnan(refs).all(axis=1) if refs.shape[1] else np.zeros(len(own), bool)
    filled = np.where(np.isnan(refs), np.inf, refs)
    nearest = np.where(has, filled.argmin(axis=1) if refs.shape[1] else -1, -1)
    ref_d = np.where(has, filled.min(axis=1) if refs.shape[1] else np.nan, np.nan)
    drifted = has & (np.nan_to_num(ref_d, nan=np.inf) < threshold) & (np.nan_to_num(ref_d, nan=np.inf) < own)
    return Drift(ref_distance=ref_d, nearest=nearest.astype(int), drifted=drifted)


def _mean(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def method_summary(face_ids: list[str], own_distance: np.ndarray, r1: Rank1, dr: Drift | None,
                   ref_identity: list[list] | None = None, threshold: float = THRESHOLD) -> dict:
    """One method's (SR, bicubic or HR) figures for summary.json["identity"][method].

    distance / distance_median: to the own HR; verified: the fraction below the threshold; rank1: the
    fraction of eligible queries identified; with references: ref_distance (mean distance to the
    nearest reference), ref_verified (faces within the threshold of a reference), drifted (count)
    and drifted_faces ([{face_id, ref_identity, ref_distance, own_distance}], by face id)."""
    own = np.asarray(own_distance, np.float64)
    out: dict = {"distance": _mean(own), "distance_median": float(np.median(own)) if len(own) else None,
                 "verified": float(verified(own, threshold).mean()) if len(own) else None,
                 "rank1": r1.rate, "rank1_hits": int((r1.hit & r1.eligible).sum())}
    if dr is not None:
        listed = []
        for i in np.flatnonzero(dr.drifted):
            ident = ref_identity[i][dr.nearest[i]] if ref_identity is not None else None
            listed.append({"face_id": face_ids[i], "ref_identity": ident,
                           "ref_distance": round(float(dr.ref_distance[i]), 4),
                           "own_distance": round(float(own[i]), 4)})
        listed.sort(key=lambda r: r["face_id"])
        out.update({"ref_distance": _mean(dr.ref_distance),
                    "ref_verified": int((np.nan_to_num(dr.ref_distance, nan=np.inf) < threshold).sum()),
                    "drifted": len(listed), "drifted_faces": listed})
    return out
