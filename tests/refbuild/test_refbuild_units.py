"""Pure functions of refbuild: identity groups, split assignment, boxes, ids, SQL guard."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from refbuild.db import run_query
from refbuild.detect import face_id, square_box
from refbuild.errors import RefbuildError
from refbuild.library import Library
from refbuild.split import assign, identity_groups


# -- split.identity_groups ------------------------------------------------------

def test_identities_sharing_a_photo_are_joined():
    ids = ["a", "a", "b", "b", "c"]
    shas = ["s1", "s2", "s3", "s2", "s4"]  # b's second photo is a's second photo
    g = identity_groups(ids, shas, "singleton")
    assert g[0] == g[1] == g[2] == g[3]
    assert g[4] != g[0]


def test_joins_are_transitive():
    ids = ["a", "b", "b", "c", "d"]
    shas = ["x", "x", "y", "y", "z"]  # a~b by x, b~c by y
    g = identity_groups(ids, shas, "singleton")
    assert g[0] == g[1] == g[2] == g[3] != g[4]


def test_unlabelled_faces_singleton_or_excluded():
    ids = [None, None, None, "a"]
    shas = ["p", "q", "p", "r"]  # two faces of photo p (all-faces mode)
    g = identity_groups(ids, shas, "singleton")
    assert g[0] == g[2] and len({g[0], g[1], g[3]}) == 3
    assert identity_groups(ids, shas, "exclude") == [None, None, None, g[3]]


def test_unlabelled_copy_of_labelled_photo_joins_its_identity():
    g = identity_groups(["a", None], ["s", "s"], "singleton")
    assert g[0] == g[1]


def test_group_key_does_not_depend_on_order():
    ids = ["a", "b", "c", "b"]
    shas = ["1", "2", "3", "1"]
    g1 = identity_groups(ids, shas, "singleton")
    g2 = identity_groups(ids[::-1], shas[::-1], "singleton")[::-1]
    assert g1 == g2


# -- split.assign -----------------------------------------------------------------

def _sizes(n: int = 60, seed: int = 1) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {f"id:{i}": int(rng.integers(1, 30)) for i in range(n)}


def test_assign_is_deterministic_per_seed():
    sizes = _sizes()
    targets = np.array([14, 3, 1], float) / 18 * sum(sizes.values())
    a = assign(sizes, targets, seed=0, fill_all=True)
    assert a == assign(dict(reversed(list(sizes.items()))), targets, seed=0, fill_all=True)
    assert a != assign(sizes, targets, seed=1, fill_all=True)


def test_assign_each_group_one_split_near_ratios():
    sizes = _sizes(200)
    total = sum(sizes.values())
    targets = np.array([14, 3, 1], float) / 18 * total
    a = assign(sizes, targets, seed=0, fill_all=True)
    assert set(a) == set(sizes)  # every group exactly once: identity-disjoint by construction
    assert set(a.values()) == {"train", "val", "test"}
    for j, name in enumerate(("train", "val", "test")):
        got = sum(sizes[k] for k, s in a.items() if s == name)
        assert abs(got - targets[j]) <= 30, (name, got, targets[j])  # within one group of the target


def test_assign_counts_leave_rest_unused():
    sizes = {f"g{i}": 1 for i in range(20)}
    a = assign(sizes, np.array([5, 3, 2], float), seed=0, fill_all=False)
    counts = {s: list(a.values()).count(s) for s in ("train", "val", "test", "unused")}
    assert counts == {"train": 5, "val": 3, "test": 2, "unused": 10}


# -- detect helpers -----------------------------------------------------------------

@pytest.mark.parametrize("box,margin,want", [
    ((10, 20, 30, 60), 0.0, (0, 20, 40, 60)),  # 20x40 -> 40x40 around centre (20, 40)
    ((0, 0, 10, 10), 0.0, (0, 0, 10, 10)),
    ((0, 0, 10, 10), 1.0, (-5, -5, 15, 15)),  # margin may run outside the image
    ((5.4, 5.4, 5.6, 5.6), 0.0, (5, 5, 6, 6)),  # never a zero-size box
])
def test_square_box(box, margin, want):
    got = square_box(np.array(box, np.float32), margin)
    assert got == want
    assert got[2] - got[0] == got[3] - got[1] >= 1


def test_face_id_stable_and_distinct():
    assert face_id("a/b.jpg", 0) == face_id("a/b.jpg", 0)
    # pinned to the documented formula: ids are stored in every manifest and must not drift
    h = hashlib.sha256(b"a/b.jpg").hexdigest()[:16]
    assert face_id("a/b.jpg", 0) == f"{h}-0"
    assert face_id("a/b.jpg", 1) == f"{h}-1"
    assert face_id("a/c.jpg", 0) != face_id("a/b.jpg", 0)


# -- db.run_query -----------------------------------------------------------------

def test_query_selects(built):
    cols, rows = run_query(Library(built.lib), "select count(*) as n from faces")
    assert cols == ["n"] and rows == [(41,)]
    cols, rows = run_query(Library(built.lib), "with s as (select split from splits) select count(distinct split) from s")
    assert rows[0][0] >= 2


@pytest.mark.parametrize("sql", [
    "COPY faces TO '/tmp/refbuild-test-out.csv'",
    "CREATE TABLE t AS SELECT 1",
    "select 1; select 2",
    "INSERT INTO faces VALUES (1)",
    "ATTACH '/tmp/refbuild-test.db'",
    "SET enable_external_access = true",
    "PRAGMA version",
    "select from where",
])
def test_query_refuses_non_select(built, sql):
    with pytest.raises(RefbuildError):
        run_query(Library(built.lib), sql)


@pytest.mark.parametrize("sql", [
    "select * from read_csv('/etc/passwd')",
    "select * from read_text('/etc/hostname')",
    "select * from glob('/etc/*')",
    "select * from read_parquet('{lib}/../src/id00/img0.png')",
    "select * from read_csv('{cwd}/.tmp/secret.csv')",  # DuckDB's default temp dir
])
def test_query_cannot_read_outside_library(built, sql, tmp_path, monkeypatch):
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("a,b\nsecret,1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RefbuildError):
        run_query(Library(built.lib), sql.format(lib=built.lib.resolve(), cwd=tmp_path))


def test_query_unknown_view_names_views(built):
    with pytest.raises(RefbuildError, match="views in .*faces"):
        run_query(Library(built.lib), "select * from nosuch")
