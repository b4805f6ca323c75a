"""Stage 3, `refbuild split LIB`: identity-disjoint train/val/test.

Paper (Sec. III): 14,000 train / 3,000 val / 1,000 test, "with no identity
duplication between the three datasets". Identities are not trusted blindly:
identities that share a photo (same sha256, a known CelebA label error) are
joined into one group, and groups, not labels, are assigned to splits.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from data_manifests import SPLITS, read_table
from refbuild.dupes import library_photo_keys
from refbuild.errors import RefbuildError
from refbuild.io import library_lock, outputs_together, resolved_config, write_json, write_table
from refbuild.library import Library
from refbuild.progress import summary
from refbuild.stale import fingerprints, stamp

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    lib: Path
    ratios: tuple[float, float, float] = (14.0, 3.0, 1.0)  # normalised; the paper's 14k/3k/1k
    counts: tuple[int, int, int] | None = None  # face counts; faces left over go to "unused"
    seed: int = 0
    unlabeled: Literal["singleton", "exclude"] = "singleton"
    allow_empty: bool = False  # let a split with a non-zero share end with no face
    quiet: bool = False
    overwrite: bool = False  # replace a split made with other settings

    def settings(self) -> dict:
        return {"ratios": list(self.ratios) if self.counts is None else None,
                "counts": list(self.counts) if self.counts is not None else None,
                "seed": self.seed, "unlabeled": self.unlabeled}

    def command(self) -> str:
        share = f"--counts {','.join(map(str, self.counts))}" if self.counts is not None else \
            f"--ratios {','.join(f'{r:g}' for r in self.ratios)}"
        return f"refbuild split {{lib}} {share} --seed {self.seed} --unlabeled {self.unlabeled}"


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def identity_groups(identities: list[str | None], shas: list[str], unlabeled: str,
                    near: list[str] | None = None) -> list[str | None]:
    """Group key per face. Labelled faces: their identity, joined with every identity
    that shares a photo (same sha256, or a near-duplicate crop: `near`, from
    refbuild.dupes). Unlabelled faces: one group per source photo ("singleton"), or
    None ("exclude")."""
    uf = _UnionFind()
    by_photo: dict[str, str] = {}
    for n, (ident, sha) in enumerate(zip(identities, shas)):
        key = f"id:{ident}" if ident is not None else (f"photo:{sha}" if unlabeled == "singleton" else None)
        if key is None:
            continue
        uf.find(key)
        for photo in (sha, near[n] if near else None):
            if photo is None:
                continue
            if photo in by_photo:
                uf.union(key, by_photo[photo])
            else:
                by_photo[photo] = key
    out = []
    for ident, sha in zip(identities, shas):
        if ident is not None:
            out.append(uf.find(f"id:{ident}"))
        elif unlabeled == "singleton":
            out.append(uf.find(f"photo:{sha}"))
        else:
            out.append(None)
    return out


def assign(group_sizes: dict[str, int], targets: np.ndarray, seed: int, fill_all: bool) -> dict[str, str]:
    """Shuffle groups (seeded) and give each to the split furthest below its target."""
    keys = sorted(group_sizes)
    order = np.random.default_rng(seed).permutation(len(keys))
    have = np.zeros(3)
    out = {}
    for i in order:
        k = keys[i]
        deficit = targets - have
        j = int(np.argmax(deficit))  # ties -> train, val, test order
        if deficit[j] <= 0 and not fill_all:
            out[k] = "unused"
            continue
        out[k] = SPLIT_NAMES[j]
        have[j] += group_sizes[k]
    for j in np.flatnonzero(targets > 0):  # a small share left empty by the greedy pass: give it
        if SPLIT_NAMES[j] in out.values():  # the smallest group of the split with the most groups
            continue
        per = {n: [g for g in keys if out[g] == n] for n in SPLIT_NAMES}
        donor = max(SPLIT_NAMES, key=lambda n: len(per[n]))
        if len(per[donor]) < 2:
            break  # too few groups: check_not_empty reports it
        out[min(per[donor], key=lambda g: (group_sizes[g], g))] = SPLIT_NAMES[j]
    return out


def check_settings(lib: Library, cfg: SplitConfig) -> None:
    """Refuse to replace a split made with other settings unless --overwrite: the
    manifests paired from it would go stale."""
    if cfg.overwrite or not lib.splits.is_file() or not lib.config("split").is_file():
        return
    try:
        old = json.loads(lib.config("split").read_text())
    except ValueError:
        return  # not ours to trust: replaced
    old_settings = {"ratios": old.get("ratios") if old.get("counts") is None else None, "counts": old.get("counts"),
                    "seed": old.get("seed"), "unlabeled": old.get("unlabeled")}
    changed = [k for k, v in cfg.settings().items() if old_settings.get(k) != v]
    if changed:
        raise RefbuildError(f"{lib.splits}: made with other settings ({', '.join(changed)}: "
                            f"{', '.join(f'{old_settings[k]} -> {cfg.settings()[k]}' for k in changed)}); "
                            "add --overwrite to replace it (then rerun `refbuild pair`)")


def check_not_empty(splits: list[str], groups: list, targets: np.ndarray, cfg: SplitConfig) -> None:
    """A split asked for (non-zero share) that got no face is an error, unless --allow-empty."""
    per_split = Counter(splits)
    counts = {n: per_split[n] for n in SPLIT_NAMES}
    empty = [n for n, t in zip(SPLIT_NAMES, targets) if t > 0 and counts[n] == 0]
    if empty and not cfg.allow_empty:
        n_groups = len({g for g in groups if g is not None})
        asked = f"--counts {cfg.counts}" if cfg.counts is not None else \
            f"--ratios {','.join(f'{r:g}' for r in cfg.ratios)}"
        raise RefbuildError(f"{asked} on {n_groups} identity groups ({sum(counts.values())} faces) leaves "
                            f"{' and '.join(empty)} empty (train {counts['train']}, val {counts['val']}, "
                            f"test {counts['test']} faces); add identities, "
                            "change the ratios, or pass --allow-empty")


def run(cfg: SplitConfig) -> dict:
    lib = Library(cfg.lib)
    check_settings(lib, cfg)
    faces = read_table(lib.require(lib.faces, "detect"), "faces",
                       columns=["face_id", "identity", "src_sha256", "crop_path"])
    ids = faces.column("face_id").to_pylist()
    near = library_photo_keys([(lib, faces.column("crop_path").to_pylist())])[0]  # re-encodings are one photo
    groups = identity_groups(faces.column("identity").to_pylist(), faces.column("src_sha256").to_pylist(),
                             cfg.unlabeled, near)
    sizes = Counter(g for g in groups if g is not None)
    if not sizes:
        raise RefbuildError(f"{lib.faces}: no faces to split (all unlabelled and --unlabeled exclude)")
    if cfg.counts is not None:
        targets = np.array(cfg.counts, dtype=float)
        if targets.sum() > sum(sizes.values()):
            raise RefbuildError(f"--counts {cfg.counts} ask for {int(targets.sum())} faces; "
                                f"the library has {sum(sizes.values())}")
    else:
        r = np.array(cfg.ratios, dtype=float)
        if (r < 0).any() or r.sum() <= 0:
            raise RefbuildError(f"--ratios {cfg.ratios}: need three non-negative numbers, not all zero")
        targets = r / r.sum() * sum(sizes.values())
    by_group = assign(dict(sizes), targets, cfg.seed, fill_all=cfg.counts is None)
    splits = [by_group[g] if g is not None else "unused" for g in groups]
    check_not_empty(splits, groups, targets, cfg)
    inputs = fingerprints(lib.root, [lib.faces])
    table = pa.table({"face_id": ids, "split": splits, "group": groups}, schema=SPLITS)
    with library_lock(lib.root, "split"):
        with outputs_together():
            write_table(lib.splits, table, "splits", stamp(inputs, cfg.command()))
            write_json(lib.config("split"), resolved_config(cfg) | {"inputs": inputs})
    idents = faces.column("identity").to_pylist()
    joined = len({i for i in idents if i is not None}) - len({g for g, i in zip(groups, idents) if i is not None})
    stats: dict = {"faces": len(ids), "groups": len(sizes), "identities_joined_by_shared_photos": joined}
    faces_in = Counter(splits)
    groups_in = Counter(s for g, s in set(zip(groups, splits)) if g is not None)  # distinct groups per split
    for name in SPLIT_NAMES + ("unused",):
        stats[name] = f"{faces_in[name]} faces / {groups_in[name]} groups"
    summary(f"refbuild split -> {lib.splits}", list(stats.items()), cfg.quiet)
    return stats
