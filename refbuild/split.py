"""Stage 3, `refbuild split LIB`: identity-disjoint train/val/test.

Paper (Sec. III): 14,000 train / 3,000 val / 1,000 test, "with no identity
duplication between the three datasets". Identities are not trusted blindly:
identities that share a photo (same sha256, a known CelebA label error) are
joined into one group, and groups, not labels, are assigned to splits.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from data_manifests import read_table
from refbuild.errors import RefbuildError
from refbuild.io import config_dict, library_lock, outputs_together, write_json, write_table
from refbuild.library import Library
from refbuild.progress import summary

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    lib: Path
    ratios: tuple[float, float, float] = (14.0, 3.0, 1.0)  # normalised; the paper's 14k/3k/1k
    counts: tuple[int, int, int] | None = None  # face counts; faces left over go to "unused"
    seed: int = 0
    unlabeled: Literal["singleton", "exclude"] = "singleton"
    quiet: bool = False


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


def identity_groups(identities: list[str | None], shas: list[str], unlabeled: str) -> list[str | None]:
    """Group key per face. Labelled faces: their identity, joined with every identity
    that shares a photo (sha256). Unlabelled faces: one group per source photo
    ("singleton"), or None ("exclude")."""
    uf = _UnionFind()
    by_sha: dict[str, str] = {}
    for ident, sha in zip(identities, shas):
        key = f"id:{ident}" if ident is not None else (f"photo:{sha}" if unlabeled == "singleton" else None)
        if key is None:
            continue
        uf.find(key)
        if sha in by_sha:
            uf.union(key, by_sha[sha])
        else:
            by_sha[sha] = key
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
    return out


def run(cfg: SplitConfig) -> dict:
    lib = Library(cfg.lib)
    faces = read_table(lib.require(lib.faces, "detect"), "faces", columns=["face_id", "identity", "src_sha256"])
    ids = faces.column("face_id").to_pylist()
    groups = identity_groups(faces.column("identity").to_pylist(), faces.column("src_sha256").to_pylist(), cfg.unlabeled)
    sizes = Counter(g for g in groups if g is not None)
    if not sizes:
        raise RefbuildError(f"{lib.faces}: no faces to split (all unlabelled and --unlabeled exclude)")
    if cfg.counts is not None:
        targets = np.array(cfg.counts, dtype=float)
        if targets.sum() > sum(sizes.values()):
            raise RefbuildError(f"--counts {cfg.counts} ask for {int(targets.sum())} faces; the library has {sum(sizes.values())}")
    else:
        r = np.array(cfg.ratios, dtype=float)
        if (r < 0).any() or r.sum() <= 0:
            raise RefbuildError(f"--ratios {cfg.ratios}: need three non-negative numbers, not all zero")
        targets = r / r.sum() * sum(sizes.values())
    by_group = assign(dict(sizes), targets, cfg.seed, fill_all=cfg.counts is None)
    splits = [by_group[g] if g is not None else "unused" for g in groups]
    table = pa.table({"face_id": ids, "split": splits, "group": groups}, schema=pa.schema([
        ("face_id", pa.string()), ("split", pa.string()), ("group", pa.string())]))
    with library_lock(lib.root, "split"):
        with outputs_together():
            write_table(lib.splits, table, "splits")
            write_json(lib.config("split"), config_dict(cfg))
    idents = faces.column("identity").to_pylist()
    joined = len({i for i in idents if i is not None}) - len({g for g, i in zip(groups, idents) if i is not None})
    stats: dict = {"faces": len(ids), "groups": len(sizes), "identities_joined_by_shared_photos": joined}
    for name in SPLIT_NAMES + ("unused",):
        n = splits.count(name)
        g = len({gr for gr, s in zip(groups, splits) if s == name and gr is not None})
        stats[name] = f"{n} faces / {g} groups"
    summary(f"refbuild split -> {lib.splits}", list(stats.items()), cfg.quiet)
    return stats
