"""Identity in `model eval`: the recogniser's embeddings of every evaluated face, then `model.identity`.

`IdentityEval.add` is a `visit` callback of `evaluate.evaluate_dataset`: it sees each face's bicubic,
SR and HR (3, S, S in [0, 1]) and embeds them in batches with dlib's face recogniser
(`refbuild.nets.dlib_resnet`) on chips cut by the fixed aligned-crop template
(`refbuild.nets.chips.chips_from_aligned`): the library's aligned crops and the model's outputs share
one framing. `finish` then embeds what the pass does not hand over, by path:

- the references each face was given (`ds`'s own draw for that face: matched, shuffled before the
  grid shuffle, or random), each loaded and sized as the dataset loads it, for the drift figures;
- the gallery: every photo of the split's identities in the library the manifest points at
  (`<hr_root>/faces.parquet`), else the manifest's own HR photos, sized as HR targets are; with
  `gallery="library"` every labelled photo of the library (all its people: the other splits' are
  distractors, a gallery the size of a held-out benchmark's).

Why and how: docs/DESIGN.md "Identity in evaluation".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_manifests import metadata, read_table

from . import identity as idm
from .data import ManifestDataset, degrade, load_rgb, to_tensor
from .errors import MsrError

log = logging.getLogger(__name__)

RECOGNISER = "dlib_face_recognition_resnet_model_v1 (refbuild.nets.dlib_resnet)"
CHIPS = "150x150 chips by the fixed aligned-crop template (refbuild.nets.chips.chips_from_aligned)"


GALLERIES = ("split", "library")


def gallery_photos(ds: ManifestDataset, data_root: Path | None = None, gallery: str = "split"
                   ) -> tuple[str, list[str], list, list[Path]]:
    """(source, face ids, identities, paths) of every photo of the manifest's identities (`gallery`
    "split"), or of every identity in the library ("library"): from the library at the manifest's
    hr_root when it has a faces table, else ("split" only) the manifest's own rows."""
    if gallery not in GALLERIES:
        raise ValueError(f"gallery {gallery!r}: choose one of {GALLERIES}")
    ids = {r.identity for r in ds.rows if r.identity is not None}
    root = Path(data_root) if data_root is not None else Path(metadata(ds.manifest).get("hr_root") or ".")
    faces = root / "faces.parquet"
    if faces.is_file():
        t = read_table(faces, "faces", ["face_id", "identity", "crop_path"]).to_pydict()
        wanted = (lambda ident: ident is not None) if gallery == "library" else (lambda ident: ident in ids)
        keep = [i for i, ident in enumerate(t["identity"]) if wanted(ident) and t["crop_path"][i]]
        paths = [root / t["crop_path"][i] for i in keep]
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return (f"library {faces}", [t["face_id"][i] for i in keep], [t["identity"][i] for i in keep], paths)
        if gallery == "library":
            raise MsrError(f"{missing[0]}: no such crop ({len(missing)} of the library's {len(paths)} missing), so no "
                           "library-wide gallery; restore the library's crops/ or score with --gallery split")
        log.warning("%s: some crops are missing; the gallery is the manifest's own photos", faces)
    elif gallery == "library":
        raise MsrError(f"{faces}: no such file, so no library-wide gallery; give --data-root LIB (the library the "
                       "manifest was paired from) or score with --gallery split")
    rows = [r for r in ds.rows if r.identity is not None]
    return f"manifest {ds.manifest}", [r.face_id for r in rows], [r.identity for r in rows], [r.hr for r in rows]


def references_used(ds: ManifestDataset) -> tuple[list[list[Path]], list[list]]:
    """Per row, the reference photos `ds[i]` draws for it in evaluation (no flip, no jitter) and
    their identities (manifest's ref_identities; a random reference is another row's HR)."""
    if ds.ref_mode in ("none", "oracle") or ds.num_refs == 0:
        return [[] for _ in ds.rows], [[] for _ in ds.rows]
    if ds.flip or ds.jitter:
        raise ValueError("identity drift needs an evaluation dataset (no flip, no jitter)")
    ident: dict[Path, Any] = {r.hr: r.identity for r in ds.rows}
    ref_ids = read_table(ds.manifest, "training_manifest", ["ref_identities"]).column("ref_identities").to_pylist()
    for r, rid in zip(ds.rows, ref_ids):
        ident.update({p: i for p, i in zip(r.refs, rid or [])})
    paths = [ds._ref_paths(r, ds._rng(i)) for i, r in enumerate(ds.rows)]  # the dataset's own draw for row i
    return paths, [[ident.get(p) for p in ps] for ps in paths]


class IdentityEval:
    """Collects the recogniser's embeddings during an evaluation, then computes the identity figures.

    Args:
        ds: the evaluated dataset (rows, scale, reference mode).
        net: the recogniser (`refbuild.nets.dlib_resnet.load_recogniser`), on `device`.
        device: where the recogniser runs.
        data_root: the manifest's --data-root override, if any (where the library is).
        batch: faces embedded per forward.
        gallery: rank-1's gallery, "split" (the manifest's people) or "library" (everyone in it).
    """

    def __init__(self, ds: ManifestDataset, net: torch.nn.Module, device: torch.device,
                 data_root: Path | None = None, batch: int = 32, gallery: str = "split"):
        from refbuild.nets.chips import chips_from_aligned

        self.ds, self.net, self.device, self.data_root, self.batch = ds, net, device, data_root, batch
        self.gallery = gallery
        self.photos = gallery_photos(ds, data_root, gallery)  # read once; one that cannot be had fails before the pass
        self.chips = chips_from_aligned
        self.face_ids: list[str] = []
        self.n_refs_seen: list[int] = []
        self.emb: dict[str, list[np.ndarray]] = {"bicubic": [], "sr": [], "hr": []}
        self.pending: dict[str, list[torch.Tensor]] = {"bicubic": [], "sr": [], "hr": []}
        self.cache: dict[Path, np.ndarray] = {}

    @classmethod
    def load(cls, ds: ManifestDataset, device: torch.device, data_root: Path | None = None,
             gallery: str = "split") -> "IdentityEval":
        """Load the recogniser. Raises RefbuildError (with the pip command) when its weights are absent."""
        from refbuild.nets.dlib_resnet import load_recogniser

        return cls(ds, load_recogniser(device), device, data_root, gallery=gallery)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        """B, 3, S, S in [0, 1] (aligned crops) -> B, 128 float64 descriptors (rounded to 8-bit levels
        first: what a saved PNG would give)."""
        x = (x.float().clamp(0, 1) * 255).round().to(self.device)
        return self.net(self.chips(x)).double().cpu().numpy()

    def add(self, face_id: str, lr: torch.Tensor, bicubic: torch.Tensor, refs: torch.Tensor,
            sr: torch.Tensor, hr: torch.Tensor) -> None:
        """The `visit` callback: one face, all 3, S, S in [0, 1] on CPU (refs M, 3, S, S)."""
        self.face_ids.append(face_id)
        self.n_refs_seen.append(int(refs.shape[0]))
        for k, x in (("bicubic", bicubic), ("sr", sr), ("hr", hr)):
            self.pending[k].append(x)
        if len(self.pending["sr"]) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        for k, xs in self.pending.items():
            if xs:
                self.emb[k].append(self.embed(torch.stack(xs)))
            self.pending[k] = []

    def _embed_paths(self, paths: list[Path]) -> np.ndarray:
        """N, 128 for image files sized as the dataset sizes HR targets (cached per path)."""
        todo = list(dict.fromkeys(p for p in paths if p not in self.cache))
        for i in range(0, len(todo), self.batch):
            part = todo[i:i + self.batch]
            x = torch.stack([to_tensor(degrade(load_rgb(p), self.ds.scale)[0]) for p in part])
            for p, e in zip(part, self.embed(x)):
                self.cache[p] = e
        return np.stack([self.cache[p] for p in paths]) if paths else np.zeros((0, 128))

    def _gallery(self, rows: list, hr: np.ndarray) -> tuple[np.ndarray, dict[str, Any], list, np.ndarray]:
        """(allowed Q, G; summary["gallery"]; gallery identities; gallery embeddings G, 128)."""
        from refbuild.dupes import NEAR_DUP_CORR, thumbnails

        source, g_ids, g_identity, g_paths = self.photos
        g = self._embed_paths(g_paths)
        hr_to_g = idm.cross_distances(hr, g)  # Q, G
        corr = thumbnails([r.hr for r in rows]) @ thumbnails(g_paths).T if g_paths else np.zeros((len(rows), 0))
        allowed = idm.gallery_allowed(self.face_ids, g_ids, hr_to_g, corr, idm.DUP_DISTANCE, NEAR_DUP_CORR)
        other = np.asarray(self.face_ids, object)[:, None] != np.asarray(g_ids, object)[None, :]  # not the HR itself
        info = {"scope": self.gallery, "source": source, "identities": len(set(g_identity)), "photos": len(g_ids),
                "excluded_near_duplicates": int((~allowed & other).sum()),  # (face, gallery photo) pairs
                "excluded_by_descriptor": int(((hr_to_g < idm.DUP_DISTANCE) & other).sum()),
                "excluded_by_pixels": int(((corr >= NEAR_DUP_CORR) & other).sum()),
                "dup_distance": idm.DUP_DISTANCE, "dup_corr": NEAR_DUP_CORR}
        return allowed, info, g_identity, g

    def _drift(self, order: list[int], e: dict[str, np.ndarray], own: dict[str, np.ndarray]
               ) -> tuple[dict[str, idm.Drift] | None, list[list], list[list[Path]]]:
        """(per method the drift toward the references or None without any, reference identities, paths)."""
        ref_paths, ref_ident = references_used(self.ds)
        ref_paths, ref_ident = [ref_paths[i] for i in order], [ref_ident[i] for i in order]
        if self.ds.ref_mode != "oracle" and [len(p) for p in ref_paths] != self.n_refs_seen:
            raise RuntimeError("identity drift: the references drawn again differ from those the model saw")
        k = max((len(p) for p in ref_paths), default=0)
        if not k:
            return None, ref_ident, ref_paths
        ref_e = self._embed_paths([p for ps in ref_paths for p in ps])
        at = np.cumsum([0] + [len(ps) for ps in ref_paths])  # face i's references: rows at[i]:at[i+1] of ref_e
        out = {}
        for m in ("bicubic", "sr", "hr"):
            d = np.full((len(ref_paths), k), np.nan)  # N, K
            for i in range(len(ref_paths)):
                d[i, :at[i + 1] - at[i]] = idm.cross_distances(e[m][i:i + 1], ref_e[at[i]:at[i + 1]])[0]
            out[m] = idm.drift(own[m], d)
        return out, ref_ident, ref_paths

    def finish(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(per face id: the per_image.csv columns, summary.json["identity"])."""
        self._flush()
        e = {k: np.concatenate(v) if v else np.zeros((0, 128)) for k, v in self.emb.items()}
        index = {r.face_id: i for i, r in enumerate(self.ds.rows)}
        order = [index[f] for f in self.face_ids]  # the pass's order of faces
        rows = [self.ds.rows[i] for i in order]
        methods = ("bicubic", "sr", "hr")
        own = {m: idm.pair_distances(e[m], e["hr"]) for m in methods}
        allowed, gallery, g_identity, g = self._gallery(rows, e["hr"])
        r1 = {m: idm.rank1(e[m], [r.identity for r in rows], g, g_identity, allowed) for m in methods}
        gallery["queries"] = int(r1["hr"].eligible.sum())  # faces with another photo of their person left
        drift, ref_ident, ref_paths = self._drift(order, e, own)

        summary: dict[str, Any] = {"recogniser": RECOGNISER, "chips": CHIPS, "threshold": idm.THRESHOLD, "n": len(rows)}
        for m in methods:
            summary[m] = idm.method_summary(self.face_ids, own[m], r1[m], drift[m] if drift else None, ref_ident)
        summary["gallery"] = gallery
        with_refs = [i for i, ps in enumerate(ref_paths) if ps]
        summary["drift"] = {"refs": self.ds.ref_mode, "faces_with_refs": len(with_refs)}
        if drift:
            shift = drift["bicubic"].ref_distance[with_refs] - drift["sr"].ref_distance[with_refs]
            summary["drift"].update({"sr_nearer_refs_than_bicubic": int((shift > 0).sum()),
                                     "ref_distance_shift": float(shift.mean())})  # > 0: SR moved toward its refs

        def num(x: float) -> float | None:
            return None if np.isnan(x) else round(float(x), 5)

        per_face: dict[str, dict[str, Any]] = {}
        for i, fid in enumerate(self.face_ids):
            c: dict[str, Any] = {"bicubic_id_dist": num(own["bicubic"][i]), "sr_id_dist": num(own["sr"][i]),
                                 "id_gain": num(own["bicubic"][i] - own["sr"][i]),
                                 "bicubic_verified": int(own["bicubic"][i] < idm.THRESHOLD),
                                 "sr_verified": int(own["sr"][i] < idm.THRESHOLD)}
            c.update({f"{m}_rank1": int(r1[m].hit[i]) if r1[m].eligible[i] else None for m in methods})
            c.update({f"{m}_ref_dist": num(drift[m].ref_distance[i]) if drift else None for m in methods})
            c.update({f"{m}_drifted": int(drift[m].drifted[i]) if drift else 0 for m in ("bicubic", "sr")})
            c["sr_drift_ref"] = ref_ident[i][drift["sr"].nearest[i]] if drift and drift["sr"].drifted[i] else None
            per_face[fid] = c
        return per_face, summary


def summary_lines(s: dict[str, Any]) -> list[str]:
    """summary.md lines for summary["identity"]."""
    g = s["gallery"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    num = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["", f"Identity ({s['recogniser']}; {s['chips']}): distance to the own HR, verified as the own HR "
                 f"(distance < {s['threshold']}), rank-1 identification among {g['identities']} identities against "
                 f"a gallery of {g['photos']} photos ({g['source']}; each face's own HR photo and its near-duplicates "
                 f"left out: {g['excluded_near_duplicates']} more; {g['queries']} faces have another photo of "
                 "their person to be found by).", "",
             "| method | distance | verified | rank-1 | distance to nearest ref | ref verified | drifted to a ref |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in ("hr", "bicubic", "sr"):
        x = s[m]
        lines.append(f"| {m} | {num(x['distance'])} | {pct(x['verified'])} | {pct(x['rank1'])} | "
                     f"{num(x.get('ref_distance'))} | {x.get('ref_verified', 'n/a')} | "
                     f"{x.get('drifted', 'n/a') if m != 'hr' else ''} |")
    d = s["drift"]
    if d.get("faces_with_refs"):
        ids = [f["face_id"] for f in s["sr"]["drifted_faces"]]
        listed = (": " + ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else "")) if ids else ""
        lines += ["", f"Drift (refs {d['refs']}): SR nearer its nearest reference than bicubic on "
                      f"{d['sr_nearer_refs_than_bicubic']} of {d['faces_with_refs']} faces (mean distance to it, "
                      f"bicubic minus SR: {d['ref_distance_shift']:+.3f}); SR verifies as a reference rather than "
                      f"as its own HR on {s['sr']['drifted']} faces{listed} (bicubic: {s['bicubic']['drifted']}; "
                      "all listed in summary.json)."]
    else:
        lines += ["", f"Drift: not measured (refs {d['refs']}: no reference photos of other people)."]
    return lines
