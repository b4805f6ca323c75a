"""`refbuild audit LIB`: check every invariant of a library and its manifests.

Each check reports how many items it looked at and the violations it found;
the CLI exits non-zero when any check has a violation.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_manifests import ManifestError, metadata, read_table
from refbuild.dupes import library_photo_keys
from refbuild.errors import RefbuildError
from refbuild.io import sha256_file
from refbuild.library import Library
from refbuild.pair import DUP_EPS
from refbuild.same_person import is_same_person, manifest_checks
from refbuild.stale import copied_from, stale_reason


@dataclass(frozen=True)
class AuditConfig:
    lib: Path
    hashes: bool = True  # re-hash source images against faces.src_sha256
    manifests: tuple[Path, ...] | None = None  # default: those pair.config.json lists


@dataclass
class Check:
    name: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.violations.append(msg)


def _safe(root: Path, rel: str | None) -> Path | None:
    if not isinstance(rel, str) or not rel:  # null or empty in a tampered file
        return None
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return None
    p = root / p
    return p if p.resolve().is_relative_to(root.resolve()) else None  # a symlink pointing out escapes too


def _crop_paths(root: Path) -> set[str] | None:
    """The crop paths of the library at `root`; None when it holds no readable faces.parquet."""
    try:
        return set(read_table(Library(root).faces, "faces", columns=["crop_path"]).column("crop_path").to_pylist())
    except (ManifestError, OSError):
        return None


def _read(path: Path, name: str, checks: list[Check], columns=None):
    c = Check(f"schema {path.name}", 1)
    checks.append(c)
    try:
        return read_table(path, name, columns)
    except ManifestError as e:
        c.fail(str(e))
        return None


def audit_library(lib: Library, hashes: bool, checks: list[Check]) -> dict:
    """Checks on the library's own files; returns lookups the manifest checks use."""
    info: dict = {}
    if not lib.faces.is_file():
        checks.append(Check("faces.parquet present", 1, [f"{lib.faces}: missing; run `refbuild detect`"]))
        return info
    faces = _read(lib.faces, "faces", checks)
    if faces is None:
        return info
    rows = faces.to_pylist()
    info["faces"] = {r["face_id"]: r for r in rows}
    try:  # near-duplicate photos (refbuild.dupes): a re-encoding is the same photo
        keys = library_photo_keys([(lib, [r["crop_path"] for r in rows])])[0]
        info["photo"] = dict(zip((r["face_id"] for r in rows), keys))
    except RefbuildError:  # a crop missing or unreadable: "crop files present" reports it
        info["photo"] = {}
    c = Check("face ids unique", len(rows))
    dup = [f for f, n in Counter(r["face_id"] for r in rows).items() if n > 1]
    c.violations += [f"face_id {f} appears more than once" for f in dup]
    checks.append(c)
    c = Check("crop files present", len(rows))
    for r in rows:
        p = _safe(lib.root, r["crop_path"])
        if p is None or not p.is_file():
            c.fail(f"{r['face_id']}: crop {r['crop_path']} missing or outside the library")
    checks.append(c)
    if hashes:
        audit_crop_hashes(lib, rows, checks)
        src_root = Path(metadata(lib.faces).get("src_root", ""))
        c = Check("source files present, sha256 matches", 0)
        if not src_root.is_dir():  # moved or deleted: one line, not one per photo
            c.fail(f"{src_root}: source folder of faces.parquet not found (moved?); "
                   "pass --no-hashes to skip this check")
        sources = sorted({(r["src_path"], r["src_sha256"]) for r in rows}) if src_root.is_dir() else []
        for src, sha in sources:
            c.checked += 1
            p = _safe(src_root, src)
            if p is None or not p.is_file():
                c.fail(f"{src_root / src}: source image missing or outside {src_root}")
            elif sha256_file(p) != sha:
                c.fail(f"{src_root / src}: sha256 changed since detect")
        checks.append(c)
    if lib.rejects.is_file():
        _read(lib.rejects, "rejects", checks)
    fids = [r["face_id"] for r in rows]
    for view in ("hr", "lr"):
        if lib.features(view).is_file():
            t = _read(lib.features(view), "features", checks)
            if t is not None:
                c = Check(f"features_{view} match faces", len(fids))
                if t.column("face_id").to_pylist() != fids:
                    c.fail(f"{lib.features(view)}: face ids differ from faces.parquet; rerun `refbuild embed`")
                vals = t.column("features").combine_chunks().values.to_numpy(zero_copy_only=False)
                if not np.isfinite(vals).all():
                    c.fail(f"{lib.features(view)}: NaN or infinite values")
                checks.append(c)
    if lib.splits.is_file():
        sp = _read(lib.splits, "splits", checks)
        if sp is not None:
            info["split"] = dict(zip(sp.column("face_id").to_pylist(), sp.column("split").to_pylist()))
            c = Check("every face has one split", len(fids))
            if sp.column("face_id").to_pylist() != fids:
                c.fail(f"{lib.splits}: face ids differ from faces.parquet; rerun `refbuild split`")
            checks.append(c)
            c = Check("splits disjoint by identity and by photo", 0)
            for key in ("identity", "src_sha256"):
                where = defaultdict(set)
                for r in rows:
                    s = info["split"].get(r["face_id"])
                    if r[key] is not None and s not in (None, "unused"):
                        where[r[key]].add(s)
                c.checked += len(where)
                c.violations += [f"{key} {k} is in splits {sorted(v)}" for k, v in sorted(where.items()) if len(v) > 1]
            checks.append(c)
    if lib.pairs.is_file():
        pairs = _read(lib.pairs, "pairs", checks)
        if pairs is not None:
            meta = metadata(lib.pairs)
            info["pairs_meta"] = meta
            if meta.get("index") == "ivf":  # approximate references: say how good, every time
                rec = json.loads(meta["recall_at_m"]) if meta.get("recall_at_m") else None
                c = Check(f"approximate pairing (ivf): recall@m {rec['recall']:.4f} against exact search on "
                          f"{rec['queries']} queries" if rec else "approximate pairing (ivf): recall@m measured", 1)
                if rec is None:
                    c.fail(f"{lib.pairs}: made with --index ivf but no recall@m recorded; rerun `refbuild pair`")
                checks.append(c)
            _check_refs(pairs.to_pylist(), info, meta, checks, lib)
    return info


def _check_refs(pairs: list[dict], info: dict, meta: dict, checks: list[Check], lib: Library) -> None:
    faces, split = info["faces"], info.get("split", {})
    dim_eps = DUP_EPS
    c_id = Check("references are other identities", 0)
    c_dup = Check("references are not the same photo", 0)
    c_pool = Check(f"references come from the pool ({meta.get('pool', '?')})", 0)
    photo = info.get("photo", {})
    c_one = Check("no two references of one photo (near-duplicates included)", 0)
    for p in pairs:
        q = faces.get(p["query_face_id"]) if p["query_library"] == "self" else None
        c_one.checked += 1
        keys = [photo.get(f) for f in p["ref_face_ids"] if photo.get(f) is not None]
        if len(set(keys)) < len(keys):
            c_one.fail(f"{p['query_face_id']}: two of its references {p['ref_face_ids']} are one photo")
        for fid, ident, d in zip(p["ref_face_ids"], p["ref_identities"], p["ref_distances"]):
            ref = faces.get(fid)
            c_id.checked += 1
            c_dup.checked += 1
            c_pool.checked += 1
            if ref is None:
                c_pool.fail(f"{p['query_face_id']}: reference {fid} is not in faces.parquet")
                continue
            if p["query_identity"] is not None and ref["identity"] == p["query_identity"]:
                c_id.fail(f"{p['query_face_id']}: reference {fid} has the same identity {ident}")
            near = q is not None and photo.get(fid) is not None and photo.get(fid) == photo.get(q["face_id"])
            if (q is not None and ref["src_sha256"] == q["src_sha256"]) or d <= dim_eps or near:
                c_dup.fail(f"{p['query_face_id']}: reference {fid} is the same photo (distance {d:.3g})")
            if meta.get("pool") == "train" and split.get(fid) != "train":
                c_pool.fail(f"{p['query_face_id']}: reference {fid} is in split {split.get(fid)}, not train (leak)")
    checks += [c_id, c_dup, c_pool, c_one]


def audit_crop_hashes(lib: Library, rows: list[dict], checks: list[Check]) -> None:
    """Every crop still has the bytes detect wrote (a crop overwritten with another face is caught)."""
    c = Check("crop files unchanged (sha256 matches)", 0)
    for r in rows:
        p = _safe(lib.root, r["crop_path"])
        if r.get("crop_sha256") is None or p is None or not p.is_file():  # not recorded (older refbuild), or missing
            continue
        c.checked += 1
        if sha256_file(p) != r["crop_sha256"]:
            c.fail(f"{lib.root / r['crop_path']}: sha256 changed since detect; rerun `refbuild detect` with the "
                   "same options to restore it")
    checks.append(c)


def audit_stale(lib: Library, checks: list[Check], manifests: list[Path]) -> None:
    """Every output whose recorded inputs changed since it was made (a re-split, a re-embed)."""
    c = Check("no stale stage (inputs unchanged since each output was made)", 0)
    for path in [lib.splits, lib.features("hr"), lib.features("lr"), lib.pairs]:
        if path.is_file():
            c.checked += 1
            if (why := stale_reason(path, lib.root)) is not None:
                c.fail(why)
    for path in manifests:
        if path.is_file():
            c.checked += 1
            if (why := stale_reason(path)) is not None:
                c.fail(why)
    checks.append(c)
    if lib.pairs.is_file():  # a deleted input, reported even where pairs.parquet recorded no fingerprints
        try:
            meta = metadata(lib.pairs)
        except Exception:
            meta = {}  # unreadable: the schema check reports it
        view = meta.get("query_view", "hr")
        ups = {lib.features("hr"): "embed", lib.features(view): "embed"}
        if meta.get("pool", "train") == "train" or view != "hr":  # what pair needed splits for
            ups[lib.splits] = "split"
        c = Check("inputs of pairs.parquet present", len(ups))
        for up, stage in ups.items():
            if not up.is_file():
                c.fail(f"{up}: missing, yet pairs.parquet and its manifests were made from it; rerun "
                       f"`refbuild {stage} {lib.root}` and the stages after it")
        checks.append(c)


def audit_owner(path: Path, lib: Library, checks: list[Check]) -> None:
    """The manifest was made from this library (its references are this library's faces)."""
    c = Check(f"{path.parent.name}/{path.name}: made from this library", 1)
    try:
        meta = metadata(path)
    except Exception:
        return  # reported by the schema check
    if meta.get("ref_root") != str(lib.root.resolve()):
        c.fail(f"{path}: made from library {meta.get('ref_root')!r}, not {lib.root.resolve()}; audit it with that "
               "library, or rerun `refbuild pair` for this one")
    checks.append(c)


def audit_manifest(path: Path, checks: list[Check], holdout_ids: set[str], train_ids: set[str],
                   root: Path | None = None, info: dict | None = None) -> None:
    """root: the library the manifest's roots stand for (a moved library), else its metadata's.
    info: what `audit_library` found (a same-person manifest's photos are checked against it)."""
    t = _read(path, "training_manifest", checks)
    if t is None:
        return
    meta = metadata(path)
    cross = meta.get("hr_root") != meta.get("ref_root")
    same = is_same_person(meta)  # the experiment: references are the query's own identity (refbuild.same_person)
    rows = t.to_pylist()
    c_s = Check(f"{path.parent.name}/{path.name}: every row of split {meta.get('split')!r}", len(rows))
    c_s.violations += [f"{r['face_id']}: split {r['split']!r} in a manifest of split {meta.get('split')!r}"
                       for r in rows if r["split"] != meta.get("split")]
    checks.append(c_s)
    try:
        m = int(meta.get("m", "0"))
    except ValueError:
        m = -1
    c_m = Check(f"{path.parent.name}/{path.name}: m={m} references per row", len(rows))
    if m < 1:
        c_m.fail(f"{path}: metadata m={meta.get('m')!r} is not a positive number")
    hr_root, ref_root = (root, root) if root else (Path(meta.get("hr_root", "")), Path(meta.get("ref_root", "")))
    crops = {d: _crop_paths(d) for d in (hr_root, ref_root)}  # what each root's library holds
    c_r = Check(f"{path.parent.name}/{path.name}: hr_root and ref_root are refbuild libraries", 2)
    for key, d in (("hr_root", hr_root), ("ref_root", ref_root)):
        if crops[d] is None:
            c_r.fail(f"{path}: {key} {str(d)!r} is not a refbuild library (no faces.parquet there); "
                     "rerun `refbuild pair` to remake the manifest")
    checks.append(c_r)
    c_f = Check(f"{path.parent.name}/{path.name}: files present inside their roots", 0)
    c_l = Check(f"{path.parent.name}/{path.name}: no held-out identity as reference or in train", 0)
    c_i = Check(f"{path.parent.name}/{path.name}: " + ("references are other photos of the same identity "
                "(same-person experiment)" if same else "references are other faces and identities"), 0)
    for r in rows:
        for k in ("ref_face_ids", "ref_paths", "ref_identities", "ref_distances"):
            if r[k] is None:
                c_m.fail(f"{r['face_id']}: {k} is null")
                r[k] = []
        if not (len(r["ref_paths"]) == len(r["ref_face_ids"]) == len(r["ref_identities"])
                == len(r["ref_distances"]) == m):
            c_m.fail(f"{r['face_id']}: {len(r['ref_paths'])} references, expected {m}")
        for fid, ident in zip(r["ref_face_ids"], r["ref_identities"]):
            c_i.checked += 1
            if fid == r["face_id"]:
                c_i.fail(f"{r['face_id']}: references itself")
            elif same and (r["identity"] is None or ident != r["identity"]):
                c_i.fail(f"{r['face_id']}: reference {fid} has identity {ident}, not the query's {r['identity']}")
            elif not same and r["identity"] is not None and ident == r["identity"]:
                c_i.fail(f"{r['face_id']}: reference {fid} has the same identity {ident}")
        for root, rel in [(hr_root, r["hr_path"])] + [(ref_root, p) for p in r["ref_paths"]]:
            c_f.checked += 1
            p = _safe(root, rel)
            if p is None:
                c_f.fail(f"{r['face_id']}: path {rel!r} escapes its root")
            elif not p.is_file():
                c_f.fail(f"{r['face_id']}: {p} missing")
            elif crops[root] is not None and rel not in crops[root]:
                c_f.fail(f"{r['face_id']}: {p} is not a crop of the library {root}")
        for ident in r["ref_identities"]:
            c_l.checked += 1
            if ident is not None and ident in holdout_ids and not (same and ident == r["identity"]):
                c_l.fail(f"{r['face_id']}: reference identity {ident} is a val/test identity")
        if r["split"] == "train" and r["identity"] in holdout_ids:
            c_l.fail(f"{r['face_id']}: train row of val/test identity {r['identity']}")
        if r["split"] in ("val", "test") and r["identity"] is not None and r["identity"] in train_ids and not cross:
            c_l.fail(f"{r['face_id']}: {r['split']} row of train identity {r['identity']}")
    checks += [c_m, c_f, c_l, c_i]
    if same and info and not cross:
        checks += [Check(*c) for c in manifest_checks(f"{path.parent.name}/{path.name}", rows, info.get("faces", {}),
                                                      info.get("photo", {}), info.get("split", {}))]


def run(cfg: AuditConfig) -> list[Check]:
    lib = Library(cfg.lib)
    checks: list[Check] = []
    info = audit_library(lib, cfg.hashes, checks)
    manifests = list(cfg.manifests or [])
    if cfg.manifests is None and lib.config("pair").is_file():
        try:
            pcfg = json.loads(lib.config("pair").read_text())
            manifests = [_relocated(Path(p), pcfg.get("lib"), lib) for p in pcfg.get("manifests", {}).values()]
        except (ValueError, AttributeError, TypeError) as e:
            checks.append(Check("pair.config.json readable", 1, [
                f"{lib.config('pair')}: not the JSON `pair` wrote ({e}); rerun `refbuild pair` or pass --manifest"]))
    if cfg.manifests is None:  # and every manifest the library holds (LIB/manifests/<name>/)
        seen = {p.resolve() for p in manifests}
        manifests += [p for p in sorted((lib.root / "manifests").glob("*/*.parquet"))
                      if p.stem in ("train", "val", "test") and p.resolve() not in seen]
    moved = {p: old for p in manifests if (old := _moved_from(p, lib)) is not None}
    if moved:
        old = next(iter(moved.values()))
        checks.append(Check("library where its manifests say", len(moved), [
            f"{lib.root}: this library moved from {old}, or is a copy of it ({len(moved)} manifest(s) still name "
            f"that folder, and would read its images there); pass "
            f"`--data-root {lib.root.resolve()}` to `model train`/`model eval`, or rerun `refbuild pair {lib.root}`"]))
    audit_stale(lib, checks, [p for p in manifests if p not in moved])
    idents = defaultdict(set)
    for path in manifests:
        try:
            if _is_cross(path):
                continue  # another library's labels name other people: only references are checked
            for r in read_table(path, "training_manifest", columns=["identity", "split"]).to_pylist():
                if r["identity"] is not None:
                    idents[r["split"]].add(r["identity"])
        except (ManifestError, OSError):
            pass  # reported by audit_manifest
    holdout = idents["val"] | idents["test"]
    for path in manifests:
        if path.is_file() and path not in moved:
            audit_owner(path, lib, checks)
        audit_manifest(path, checks, holdout, idents["train"], lib.root if path in moved else None, info)
    return checks


def _relocated(path: Path, made_in: str | None, lib: Library) -> Path:
    """A manifest path pair.config.json recorded inside the library's old folder (it moved, or this is
    a copy), seen in this one: a copy's audit is about the copy's manifests, not the original's."""
    if not made_in or Path(made_in) == lib.root.resolve() or not path.is_relative_to(made_in):
        return path
    here = lib.root / path.relative_to(made_in)
    return here if here.exists() or not path.exists() else path


def _moved_from(path: Path, lib: Library) -> str | None:
    """The folder a manifest of this library names when the library has moved or been copied since:
    that folder is gone (or this library holds the faces.parquet the manifest was made from) and every
    file the manifest lists is under this library instead."""
    try:
        meta = metadata(path)
        rows = read_table(path, "training_manifest", columns=["hr_path", "ref_paths"]).to_pylist()
    except Exception:
        return None  # reported by the schema check
    old = meta.get("ref_root")
    if not old or meta.get("hr_root") != old or old == str(lib.root.resolve()):
        return None
    if Path(old).exists() and copied_from(path, lib.root) is None:  # there still, and this is not a copy of it
        return None
    rels = [r["hr_path"] for r in rows] + [p for r in rows for p in (r["ref_paths"] or [])]
    return old if rels and all((p := _safe(lib.root, rel)) is not None and p.is_file() for rel in rels) else None


def _is_cross(path: Path) -> bool:
    """A manifest of another library's queries (`pair --queries`)."""
    try:
        meta = metadata(path)
    except Exception:
        return False
    return meta.get("hr_root") != meta.get("ref_root")

