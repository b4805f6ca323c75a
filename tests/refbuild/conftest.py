"""Fixtures of the refbuild tests; the helpers themselves live in rb_helpers.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # rb_helpers, whatever pytest's import mode

from rb_helpers import Built, build  # noqa: E402


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    """One finished synthetic library, shared read-only by the tests that only look."""
    return build(tmp_path_factory.mktemp("built"))
