"""Stage 4, `refbuild pair LIB -m 4`: top-m non-identity references (Eqs. 2-3).

D(Q, R) = sum_l w_l |F_Q^l - F_R^l|_1 over the layers embed stored (Eq. 2 with
per-layer weights, `--layer-weights`, 1 each by default): `weight_vector` scales each
layer's slice by w_l (w_l > 0), so D is one L1 distance between the scaled
concatenations. It is searched exactly by `refbuild.knn.L1Index` (on CPU a blocked
numba L1 kernel, `refbuild.l1kernel`; on GPU FAISS's flat METRIC_L1 index when
faiss-gpu and CUDA are there), or approximately by `IVFL1Index` (`--index ivf`,
its recall@m against exact search measured).

Exclusions are per query (`search_chunk`): the same identity label, the same identity
group (within one library), the same photo (sha256, or a near-duplicate crop:
`refbuild.dupes`), a distance below DUP_EPS per dimension, and a second reference
from one photo. So we search k = m + 2 x the largest excluded set any query can
have (group, identity, sha256 or photo) + 8, filter, and search again with the
index's largest k for the rare query left short. This is also what works on GPU,
where FAISS ignores IDSelector.

`--same-person` (an experiment, `refbuild.same_person`) inverts the identity rule: the
references are the nearest other photos of the query's own identity, a positive control.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pyarrow as pa

from data_manifests import PAIRS, TRAINING_MANIFEST, metadata, read_table
from refbuild import shards
from refbuild.dupes import library_photo_keys
from refbuild.errors import RefbuildError
from refbuild.knn import IVFL1Index, L1Index, auto_nlist, gpu_wanted, recall_at_m
from refbuild.io import library_lock, outputs_together, remove_orphan_temps, resolved_config, write_json, write_table
from refbuild.library import Library
from refbuild.progress import bar, summary
from refbuild.runners import make_runner
from refbuild import same_person as sp
from refbuild.stale import copied_from, fingerprints, stamp

DUP_EPS = 1e-4  # distances below this (per dimension, mean) count as the same photo


@dataclass(frozen=True)
class PairConfig:
    lib: Path
    m: int = 4
    queries: Path | None = None  # another library whose faces are paired against this one
    query_view: Literal["hr", "lr"] = "hr"
    pool: Literal["train", "all", "own_split"] = "train"  # train: leak-free; all: the paper's whole library
    # (own_split: what --same-person uses, set by `run`)
    layer_weights: tuple[float, ...] | None = None  # one per layer; default all 1
    name: str | None = None  # manifest name; default: the library's folder name (with --queries: the query library's)
    manifest_dir: Path | None = None  # default: LIB/manifests, so manifests belong to their library
    query_chunk: int = 2048
    pool_chunk: int = 0  # pool rows searched at a time, top-k lists merged (0: all at once); bounds GPU memory
    index: Literal["exact", "ivf"] = "exact"  # ivf: FAISS IndexIVFFlat(METRIC_L1) on CPU, approximate
    nlist: int = 0  # ivf: inverted lists (0: ~4 sqrt(pool))
    nprobe: int = 16  # ivf: lists visited per query
    recall_sample: int = 500  # ivf: queries whose references are also found exactly, for recall@m
    device: str = "auto"
    engine: str = "local"  # local: this process; ray: query chunks as tasks over actors that each hold the pool
    workers: int = 0  # ray actors (0: one)
    same_person: bool = False  # experiment: other photos of the query's own identity (refbuild.same_person)
    quiet: bool = False
    overwrite: bool = False


RUNTIME_FIELDS = ("device", "quiet", "overwrite", "name", "manifest_dir", "lib", "pool_chunk", "engine", "workers")


@dataclass
class Side:
    """The faces of one library joined with their splits and features."""

    lib: Library
    face_ids: list[str]
    identity: list[str | None]
    sha: list[str]
    group: list[str | None]
    split: list[str]
    crop: list[str]
    feats: np.ndarray  # N, D float32
    meta: dict[str, str]
    photo: list[str] | None = None  # near-duplicate key per face (refbuild.dupes), set by `run`


def load_side(lib: Library, view: str, need_splits: bool) -> Side:
    faces = read_table(lib.require(lib.faces, "detect"), "faces")
    fpath = lib.features(view)
    if not fpath.is_file():
        flag = "--views hr,lr" if view == "lr" else ""
        raise RefbuildError(f"{fpath}: missing; run `refbuild embed {lib.root} {flag}` first".replace("  ", " "))
    feats = read_table(fpath, "features")
    fids = faces.column("face_id").to_pylist()
    if feats.column("face_id").to_pylist() != fids:
        raise RefbuildError(f"{fpath}: faces changed since embedding; rerun `refbuild embed {lib.root} --overwrite`")
    if lib.splits.is_file():
        sp = read_table(lib.splits, "splits")
        if sp.column("face_id").to_pylist() != fids:
            raise RefbuildError(f"{lib.splits}: faces changed since splitting; rerun `refbuild split {lib.root}`")
        split, group = sp.column("split").to_pylist(), sp.column("group").to_pylist()
    elif need_splits:
        raise RefbuildError(f"{lib.splits}: missing; run `refbuild split {lib.root}` first")
    else:
        split, group = ["test"] * len(fids), [None] * len(fids)
    col = feats.column("features").combine_chunks()
    dim = col.type.list_size
    mat = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return Side(lib, fids, faces.column("identity").to_pylist(), faces.column("src_sha256").to_pylist(), group, split,
                faces.column("crop_path").to_pylist(), mat, metadata(fpath))


def weight_vector(meta: dict[str, str], weights: tuple[float, ...] | None) -> np.ndarray:
    slices = json.loads(meta["slices"])
    w = np.ones(slices[-1][1], np.float32)
    if weights is None:
        return w
    if len(weights) != len(slices) or any(x <= 0 for x in weights):
        raise RefbuildError(f"--layer-weights needs {len(slices)} positive numbers (layers {meta['layers']})")
    for (a, b), x in zip(slices, weights):
        w[a:b] = x
    return w


def search_chunk(index: L1Index, q: np.ndarray, qi: list[int], query: Side, pool: Side, pool_rows: np.ndarray, m: int,
                 k0: int, cross: bool) -> list[dict]:
    """Top-m valid references for the queries `qi` (rows of `query`)."""
    k_max = index.k_max
    k = min(k0, k_max)
    eps = DUP_EPS * q.shape[1]

    def pick(i: int, dist: np.ndarray, idx: np.ndarray) -> list[tuple[int, float]]:
        chosen = []
        for d, j in zip(dist, idx):
            if j < 0:
                break
            p = int(pool_rows[j])
            same_person = (query.identity[i] is not None and pool.identity[p] == query.identity[i]) or (
                not cross and query.group[i] is not None and pool.group[p] == query.group[i])
            if d <= eps or pool.sha[p] == query.sha[i] or same_person or pool.photo[p] == query.photo[i] \
                    or pool.photo[p] in {pool.photo[c] for c, _ in chosen}:  # the query's photo, or one already given
                continue
            chosen.append((p, float(d)))
            if len(chosen) == m:
                break
        return chosen

    dist, idx = index.search(q, k)
    rows = []
    for r, i in enumerate(qi):
        chosen = pick(i, dist[r], idx[r])
        if len(chosen) < m and k < k_max:  # rare: many excluded neighbours; search wider
            d2, i2 = index.search(q[r : r + 1], k_max)
            chosen = pick(i, d2[0], i2[0])
        rows.append({
            "query_face_id": query.face_ids[i], "query_library": str(query.lib.root.resolve()) if cross else "self",
            "query_split": query.split[i], "query_identity": query.identity[i], "n_refs": len(chosen),
            "ref_face_ids": [pool.face_ids[p] for p, _ in chosen],
            "ref_identities": [pool.identity[p] for p, _ in chosen],
            "ref_distances": [d for _, d in chosen],
        })
    return rows


@dataclass(frozen=True)
class PairJob:
    """Everything a search task needs: both sides, the weighted pool and where shards go."""

    query: Side
    pool: Side
    pool_rows: np.ndarray
    pool_mat: np.ndarray  # P, D weighted pool features
    w: np.ndarray  # D layer weights
    cfg: PairConfig
    k0: int
    cross: bool
    wdir: Path
    people: dict | None = None  # --same-person: pool positions per (identity, split)


class PairSearch:
    """The worker both engines run: builds the index once, then turns one query chunk
    (shard index, query rows) into one shard of pairs and its done-marker."""

    def __init__(self, job: PairJob):
        self.job, cfg = job, job.cfg
        self.index = None if cfg.same_person else IVFL1Index(job.pool_mat, cfg.nlist, cfg.nprobe) \
            if cfg.index == "ivf" else L1Index(job.pool_mat, cfg.device, cfg.pool_chunk)

    def __call__(self, task: tuple[int, list[int]]) -> int:
        s, qi = task
        j = self.job
        q = np.ascontiguousarray(j.query.feats[qi] * j.w)
        rows = sp.search_chunk(j.pool_mat, q, qi, j.query, j.pool_rows, j.people, j.cfg.m, DUP_EPS * q.shape[1]) \
            if j.cfg.same_person else search_chunk(self.index, q, qi, j.query, j.pool, j.pool_rows, j.cfg.m, j.k0, j.cross)
        write_table(shards.shard_file(j.wdir, s, "pairs"), pa.Table.from_pylist(rows, schema=PAIRS), "pairs")
        shards.mark_done(j.wdir, s)
        return len(qi)


def measure_recall(pairs: pa.Table, q_rows: list[int], query: Side, pool: Side, pool_rows: np.ndarray,
                   pool_mat: np.ndarray, w: np.ndarray, cfg: PairConfig, k0: int, cross: bool) -> dict:
    """recall@m of the approximate references against exact search, on an evenly spread sample of queries."""
    n = min(cfg.recall_sample, len(q_rows))
    take = np.linspace(0, len(q_rows) - 1, n).round().astype(int) if n else np.zeros(0, int)
    qi = [q_rows[j] for j in take]
    exact = search_chunk(L1Index(pool_mat, "cpu"), np.ascontiguousarray(query.feats[qi] * w), qi, query, pool,
                         pool_rows, cfg.m, k0, cross) if qi else []
    got = {fid: refs for fid, refs in zip(pairs.column("query_face_id").to_pylist(),
                                          pairs.column("ref_face_ids").to_pylist())}
    approx = [got.get(query.face_ids[i], []) for i in qi]
    nlist = cfg.nlist or auto_nlist(len(pool_rows))
    return {"recall": round(recall_at_m(approx, [r["ref_face_ids"] for r in exact]), 4), "queries": len(qi),
            "m": cfg.m, "nlist": nlist, "nprobe": max(1, min(cfg.nprobe, nlist))}


def manifest_folder(cfg: PairConfig, cross: bool) -> Path:
    """Where this pairing's manifests go: MANIFEST_DIR/<name>/, by default LIB/manifests/<name>/."""
    name = cfg.name or (cfg.queries if cross else cfg.lib).resolve().name + (f"_{sp.TAG}" if cfg.same_person else "")
    return (cfg.manifest_dir if cfg.manifest_dir is not None else cfg.lib / "manifests") / name


def check_owner(out_dir: Path, hr_root: str, ref_root: str, pairing: str = "") -> None:
    """Refuse to overwrite manifests that another library (or another query library) made, or another kind
    of pairing (`pairing`: "" or same_person's); those of the library this one is a copy of
    (`refbuild.stale.copied_from`) are remade here."""
    for split in ("train", "val", "test"):
        p = out_dir / f"{split}.parquet"
        if not p.is_file():
            continue
        try:
            meta = metadata(p)
        except Exception:  # unreadable: ours to replace
            continue
        if (meta.get("hr_root"), meta.get("ref_root")) != (hr_root, ref_root) and not copied_from(p, Path(ref_root)):
            raise RefbuildError(f"{p}: made from library {meta.get('ref_root')} (queries from {meta.get('hr_root')}), "
                                f"not {ref_root} (queries from {hr_root}); pick another --name or --manifest-dir")
        if meta.get("pairing", "") != pairing:
            raise RefbuildError(f"{p}: made by a {meta.get('pairing') or 'normal'} pairing, not "
                                f"{pairing or 'a normal one'}; pick another --name or --manifest-dir")


def pair_command(cfg: PairConfig, cross: bool, manifest_dir: bool) -> str:
    """The command that remakes this pairing (`{lib}`: the library's folder, see refbuild.stale)."""
    cmd = f"refbuild pair {{lib}} -m {cfg.m}" + (" --same-person" if cfg.same_person else f" --pool {cfg.pool}") \
        + f" --query-view {cfg.query_view}"
    if cross:
        cmd += f" --queries {cfg.queries.resolve()}"
    if cfg.layer_weights:
        cmd += " --layer-weights " + ",".join(str(w) for w in cfg.layer_weights)
    if cfg.name:
        cmd += f" --name {cfg.name}"
    if manifest_dir and cfg.manifest_dir is not None:
        cmd += f" --manifest-dir {cfg.manifest_dir.resolve()}"
    return cmd


def write_manifests(pairs: pa.Table, query: Side, pool: Side, cfg: PairConfig, meta: dict[str, str],
                    out_dir: Path, cross: bool) -> dict[str, Path]:
    crop_of_q = dict(zip(query.face_ids, query.crop))
    crop_of_p = dict(zip(pool.face_ids, pool.crop))
    rows = pairs.to_pylist()
    written = {}
    for split in ("train", "val", "test"):
        sel = [r for r in rows if r["query_split"] == split and r["n_refs"] == cfg.m]
        t = pa.Table.from_pylist([{
            "face_id": r["query_face_id"], "hr_path": crop_of_q[r["query_face_id"]], "identity": r["query_identity"],
            "split": split, "ref_face_ids": r["ref_face_ids"], "ref_paths": [crop_of_p[f] for f in r["ref_face_ids"]],
            "ref_identities": r["ref_identities"], "ref_distances": r["ref_distances"], "schema_version": 1,
        } for r in sel], schema=TRAINING_MANIFEST)
        path = out_dir / f"{split}.parquet"
        write_table(path, t, "training_manifest", meta | {
            "hr_root": str(query.lib.root.resolve()), "ref_root": str(pool.lib.root.resolve()), "m": str(cfg.m), "split": split,
            "command": pair_command(cfg, cross, manifest_dir=True),
            "inputs": json.dumps({str((pool.lib.root / k).resolve()): v for k, v in json.loads(meta["inputs"]).items()}
                                 | json.loads(meta.get("query_inputs", "{}")), sort_keys=True)})
        written[split] = path
    return written


def run(cfg: PairConfig) -> dict:
    if not 1 <= cfg.m <= 64:
        raise RefbuildError(f"-m {cfg.m}: need 1 to 64 references per query")
    lib = Library(cfg.lib)
    cross = cfg.queries is not None and cfg.queries.resolve() != cfg.lib.resolve()
    if cfg.same_person:
        sp.check_config(cfg, cross)
        cfg = replace(cfg, pool=sp.POOL)
    pool_side = load_side(lib, "hr", need_splits=cfg.pool == "train" or cfg.same_person)
    query = load_side(Library(cfg.queries), cfg.query_view, need_splits=False) if cross else (
        load_side(lib, cfg.query_view, need_splits=True) if cfg.query_view != "hr" else pool_side)
    for key in ("backbone", "weights_id", "slices", "grid", "layer_norm"):
        if query.meta.get(key) != pool_side.meta.get(key):
            raise RefbuildError(f"{query.lib.features(cfg.query_view)}: {key} differs from {lib.features('hr')}; "
                                "embed both with the same backbone, weights and options")
    if cross:
        pool_side.photo, query.photo = library_photo_keys([(lib, pool_side.crop), (query.lib, query.crop)])
    else:
        pool_side.photo = query.photo = library_photo_keys([(lib, pool_side.crop)])[0]
    pool_rows = sp.pool_rows(pool_side.identity, pool_side.split) if cfg.same_person else \
        np.array([i for i, s in enumerate(pool_side.split) if cfg.pool == "all" or s == "train"], dtype=np.int64)
    q_rows = [i for i, s in enumerate(query.split) if s != "unused"]
    if len(pool_rows) == 0:
        raise RefbuildError(f"{lib.root}: the reference pool ({cfg.pool}) is empty; run `refbuild split` with a train share")
    w = weight_vector(pool_side.meta, cfg.layer_weights)
    pool_mat = np.ascontiguousarray(pool_side.feats[pool_rows] * w)
    group_sizes: dict = {}
    for p in pool_rows:
        for key in (("g", pool_side.group[p]), ("i", pool_side.identity[p]), ("s", pool_side.sha[p]), ("p", pool_side.photo[p])):
            if key[1] is not None:
                group_sizes[key] = group_sizes.get(key, 0) + 1
    k0 = cfg.m + 2 * max(group_sizes.values(), default=0) + 8
    settings = resolved_config(cfg)
    for k in RUNTIME_FIELDS + ("used", "provenance"):
        settings.pop(k)
    inputs = fingerprints(lib.root, [lib.faces, lib.features("hr"), lib.splits] + ([] if cross else [lib.features(cfg.query_view)]))
    query_inputs = fingerprints(query.lib.root, [query.lib.faces, query.lib.features(cfg.query_view)], absolute=True) if cross else {}
    out_dir = manifest_folder(cfg, cross)
    pairing = sp.PAIRING if cfg.same_person else ""
    check_owner(out_dir, str(query.lib.root.resolve()), str(lib.root.resolve()), pairing)
    # a cross-library or same-person pairing is its own output, beside its manifests: LIB's own pairs.parquet stays
    apart = cross or cfg.same_person
    pairs_path = out_dir / "pairs.parquet" if apart else lib.pairs
    config_path = out_dir / "pair.config.json" if apart else lib.config("pair")
    t0 = time.perf_counter()
    with library_lock(lib.root, "pair"):
        wdir = shards.work_dir(lib.root, f"pair-cross-{out_dir.name}" if cross else
                               f"pair-{sp.TAG}-{out_dir.name}" if cfg.same_person else "pair")
        shards.prepare(wdir, settings, cfg.overwrite, inputs=inputs | query_inputs)
        if cfg.index == "ivf" and cfg.device == "cuda":
            raise RefbuildError("--index ivf runs on CPU (FAISS has no IVF with L1 on GPU); drop --device cuda "
                                "or use --index exact")
        gpu = cfg.index == "exact" and gpu_wanted(cfg.device)
        parts = shards.chunks(len(q_rows), cfg.query_chunk)
        tasks = [(s, [q_rows[j] for j in r]) for s, r in enumerate(parts) if not shards.is_done(wdir, s)]
        job = PairJob(query, pool_side, pool_rows, pool_mat, w, cfg, k0, cross, wdir,
                      sp.by_person(pool_side.identity, pool_side.split, pool_rows) if cfg.same_person else None)
        if not tasks:
            counts: Iterable[int] = ()
        elif cfg.engine == "local":  # in this process, the search kernel on every core
            search = PairSearch(job)
            counts = (search(t) for t in tasks)
        else:
            counts = make_runner(cfg.engine, max(1, cfg.workers), cfg.device).map(PairSearch, (job,), tasks)
        with bar(cfg.quiet) as prog:
            task = prog.add_task("pair", total=len(q_rows))
            prog.advance(task, len(q_rows) - sum(len(qi) for _, qi in tasks))
            for n in counts:
                prog.advance(task, n)
        tables = [read_table(shards.shard_file(wdir, s, "pairs"), "pairs") for s in range(len(parts))]
        pairs = pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema=PAIRS)
        recall = None
        if cfg.index == "ivf":  # every approximate run measures itself against exact search
            recall = measure_recall(pairs, q_rows, query, pool_side, pool_rows, pool_mat, w, cfg, k0, cross)
        meta = {k: pool_side.meta.get(k, "") for k in ("backbone", "weights_id", "note", "layers", "grid")} | {
            "m": str(cfg.m), "pool": cfg.pool, "query_view": cfg.query_view,
            **({"pairing": sp.PAIRING} if cfg.same_person else {}),  # named so in every output
            # the LR view chose the references: the degradation they match (a model of another scale does not)
            **({"lr_scale": query.meta.get("lr_scale", "")} if cfg.query_view == "lr" else {}),
            "query_library": str(query.lib.root.resolve()) if cross else "self",
            "index": cfg.index} | ({"recall_at_m": json.dumps(recall)} if recall else {}) | stamp(inputs, pair_command(cfg, cross, manifest_dir=False)) | (
            {"query_inputs": json.dumps(query_inputs, sort_keys=True)} if cross else {})
        remove_orphan_temps(out_dir)  # left by a killed run; the library lock covers only LIB
        with outputs_together():  # pairs, manifests and config: all or none
            write_table(pairs_path, pairs, "pairs", meta)
            manifests = write_manifests(pairs, query, pool_side, cfg, meta, out_dir, cross)
            write_json(config_path, resolved_config(cfg, device="cuda" if gpu else "cpu", k0=k0, gpu=gpu,
                                                   manifest_dir=str(out_dir.resolve()), recall_at_m=recall) | {
                "manifests": {k: str(v.resolve()) for k, v in manifests.items()}, "inputs": inputs | query_inputs})
        shards.finish(wdir)
    elapsed = time.perf_counter() - t0
    n_refs = pairs.column("n_refs").to_numpy() if pairs.num_rows else np.zeros(0)
    short = int((n_refs < cfg.m).sum())
    if pairs.num_rows and short == pairs.num_rows:
        raise RefbuildError(f"{lib.root}: no query has {cfg.m} valid references in a pool of {len(pool_rows)} faces; "
                            + ("lower -m (--same-person: a query needs m other photos of its identity)"
                               if cfg.same_person else "lower -m or add faces of more identities"))
    stats = {**({"pairing": f"{sp.PAIRING}: other photos of the query's own identity, from its own split "
                            "(a positive control, not a deployable pairing)",
                 "queries without another photo of their identity": int((n_refs == 0).sum())}
                if cfg.same_person else {}),
             "queries": pairs.num_rows, "pool_faces": len(pool_rows), "m": cfg.m,
             **({} if cfg.same_person else {"k_searched": k0}),
             "short_of_m (left out of manifests)": short, "index": "exact CPU L1 (refbuild.l1kernel) per identity"
             if cfg.same_person else ("faiss GPU flat L1" if gpu else "exact CPU L1 (refbuild.l1kernel)") + (f", pool chunks of {cfg.pool_chunk}" if cfg.pool_chunk else ""),
             "engine": cfg.engine + (f" ({max(1, cfg.workers)} actors)" if cfg.engine == "ray" else ""),
             **({"recall@m vs exact": f"{recall['recall']:.4f} on {recall['queries']} queries "
                                         f"(nlist {recall['nlist']}, nprobe {recall['nprobe']})"} if recall else {}),
             "seconds": round(elapsed, 1), "queries_per_s": round(pairs.num_rows / elapsed, 1) if elapsed > 0 else None,
             "features": pool_side.meta.get("note", "")}
    for split, path in manifests.items():
        stats[f"manifest {split}"] = f"{path} ({pq_rows(path)} rows)"
    summary(f"refbuild pair{' --same-person (experiment)' if cfg.same_person else ''} -> {pairs_path}",
            list(stats.items()), cfg.quiet)
    return stats


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows
