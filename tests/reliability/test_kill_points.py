"""Interruptions: every stage SIGKILLed at seeded random points, then rerun, ends
byte-identical to an uninterrupted run, with no temp file left.

The reference run and the interrupted runs use the same library path (the
manifests hold absolute hr_root/ref_root), so whole folders compare byte for
byte: the Parquet outputs, the manifests, the crops, the configs and the work
shards.
"""
from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rb_helpers import invoke
from rel_helpers import (PHASES, STAGES, Reference, assert_no_temps, assert_same, build_reference,
                         ensure_killed_or_done, killed, record, run_killed, stage_args)

pytestmark = pytest.mark.slow

CHAIN = 3  # successive kills of one stage before a rerun may finish
KILLS_PER_STAGE = {"detect": 5, "embed": 4, "split": 6, "pair": 5}  # split has only 2 writes: 6 = all its points


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Reference:
    return build_reference(tmp_path_factory.mktemp("kill"))


def _parquet_files_whole(base: Path) -> None:
    """After a kill, every Parquet file in place is a whole, readable file (old or new, never partial)."""
    for p in base.rglob("*.parquet"):
        pq.read_metadata(p)


def _points(stage: str, n_writes: int) -> list[tuple[int, str]]:
    every = [(at, ph) for at in range(1, n_writes + 1) for ph in PHASES]
    rng = random.Random(f"kill-points-{stage}")
    chosen = rng.sample(every, min(KILLS_PER_STAGE[stage], len(every)))
    return sorted(chosen, key=lambda p: (p[0], PHASES.index(p[1])))


@pytest.mark.parametrize("stage", STAGES)
def test_kill_at_random_points_then_rerun(ref, stage):
    points = _points(stage, ref.writes[stage])
    for at, phase in points:
        ref.reset_to(ref.before[stage])
        proc = run_killed(stage_args(stage, ref.base), at, phase, ref.base)
        assert killed(proc), f"{stage} at write {at}/{phase}: not killed (exit {proc.returncode})\n{proc.stderr}"
        _parquet_files_whole(ref.base)
        invoke(*stage_args(stage, ref.base))  # the rerun
        assert_same(ref.now(), ref.after[stage], f"{stage} killed at write {at} ({phase}), rerun")
        assert_no_temps(ref.lib, ref.man)
        record("kill_points", (stage, at, phase))
        record(f"kill_points:{stage}", (at, phase))
    assert len(points) == KILLS_PER_STAGE[stage]


@pytest.mark.parametrize("stage", ["detect", "pair"])
def test_killed_again_and_again(ref, stage):
    """Each rerun is killed too, CHAIN times at seeded random points, then one rerun finishes."""
    rng = random.Random(f"kill-chain-{stage}")
    ref.reset_to(ref.before[stage])
    kills = 0
    for _ in range(CHAIN):
        at, phase = rng.randint(1, max(1, ref.writes[stage] // 3)), rng.choice(PHASES)
        proc = run_killed(stage_args(stage, ref.base), at, phase, ref.base)
        if not ensure_killed_or_done(proc, f"{stage} chained run"):
            break
        kills += 1
        record("kill_points", (stage, "chain", kills, at, phase))
        record(f"kill_points:{stage}", ("chain", kills, at, phase))
    assert kills >= 2, f"{stage}: only {kills} kills before a run finished"
    invoke(*stage_args(stage, ref.base))
    assert_same(ref.now(), ref.after[stage], f"{stage} after {kills} successive kills")
    assert_no_temps(ref.lib, ref.man)


def test_kill_then_next_stage_is_refused_not_fooled(ref):
    """A library whose embed was killed has no features.parquet: pair refuses with
    a clear message instead of working on half a stage."""
    ref.reset_to(ref.before["embed"])
    proc = run_killed(stage_args("embed", ref.base), 3, "written", ref.base)  # inside the hr view
    assert killed(proc)
    invoke(*stage_args("split", ref.base))
    res = invoke(*stage_args("pair", ref.base), ok=False)
    assert res.exit_code == 1 and "refbuild embed" in res.output, res.output
    assert not (ref.lib / "features.parquet").exists()
