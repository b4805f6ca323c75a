"""Fixtures of the reliability suite; the helpers live in rel_helpers.py.

The suite counts what it tried (distinct bad inputs, kill points, tamperings,
disk-full points) in `rel_helpers.TALLY`; at the end of the session the counts
are printed and written to `<pytest basetemp>/reliability_counts.json` (and to
$MSRFACE_RELIABILITY_COUNTS when set), the numbers RELIABILITY.md quotes.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # rel_helpers, whatever pytest's import mode
sys.path.insert(0, str(HERE.parent / "refbuild"))  # rb_helpers and the bad-image generators

import rel_helpers  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    counts = rel_helpers.tally_counts()
    if not counts:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    targets = [Path(os.environ["MSRFACE_RELIABILITY_COUNTS"])] if os.environ.get("MSRFACE_RELIABILITY_COUNTS") else []
    if factory is not None:
        targets.append(factory.getbasetemp() / "reliability_counts.json")
    for t in targets:
        t.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter):
    counts = rel_helpers.tally_counts()
    if counts:
        terminalreporter.section("reliability: what was tried")
        for k, v in sorted(counts.items()):
            terminalreporter.write_line(f"{k}: {v}")
