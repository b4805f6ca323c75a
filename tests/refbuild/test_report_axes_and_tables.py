"""Histogram axes of both HTML reports, and summary tables that never cut a path."""
from __future__ import annotations

import io
import re

from rich.console import Console

import refbuild.progress
from refbuild.report import nice_step, svg_histogram


def _ticks(svg: str) -> tuple[list[str], list[str]]:
    ticks = re.findall(r"class='tick' x='[^']*' y='([^']*)'[^>]*>([^<]*)<", svg)
    bottom = max(float(y) for y, _ in ticks)
    return [t for y, t in ticks if float(y) != bottom], [t for y, t in ticks if float(y) == bottom]


def test_count_axis_is_whole_numbers_rising_from_zero():
    ys, _ = _ticks(svg_histogram([1.0, 2.0], "t", "x"))  # peak count 1: was "0, 0, 1"
    assert ys == ["0", "1"]
    ys, _ = _ticks(svg_histogram([0.0] * 5 + [1.0], "t", "x"))
    assert ys == ["0", "2", "4", "6"]


def test_probability_axis_stays_within_its_bounds():
    _, xs = _ticks(svg_histogram([1.0] * 7, "t", "p", bounds=(0.0, 1.0)))  # was 0.5 .. 1.5
    assert xs and max(float(x) for x in xs) == 1.0 and min(float(x) for x in xs) >= 0.97
    _, xs = _ticks(svg_histogram([0.991, 0.999, 1.0], "t", "p", bounds=(0.0, 1.0)))
    assert all(0.99 <= float(x) <= 1.0 for x in xs) and len(xs) >= 3


def test_x_ticks_are_round_values_and_steps_are_nice():
    _, xs = _ticks(svg_histogram([-1.2, 0.1, 2.3], "t", "dB"))
    assert xs == ["-1", "0", "1", "2"]
    assert [nice_step(s, 5) for s in (1.0, 7.0, 0.013, 230)] == [0.2, 2, 0.005, 50]


def test_summary_table_never_cuts_a_long_path(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(refbuild.progress, "console", Console(file=buf, width=60, color_system=None))
    path = "/very/long/" + "x" * 120 + "/data_manifests/celeba_wild_lr/test.parquet"
    refbuild.progress.summary("pair", [("faces", 12), ("manifest", path)])
    text = buf.getvalue()
    assert "…" not in text
    assert path in re.sub(r"[\s│┃┌┐└┘─┬┴]", "", text), text  # every character there, in order (folded)
