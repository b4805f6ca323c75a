"""Tampering: a library or manifest edited after the fact is caught by `refbuild audit`
(exit 1, a violation line naming the problem, no traceback); an untouched copy passes."""
from __future__ import annotations

import pytest

from rb_helpers import build, invoke
from rel_helpers import record
from tampering import TAMPERS, clone


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    b = build(tmp_path_factory.mktemp("pristine"))
    return b.lib, b.manifests


def test_untouched_clone_passes(pristine, tmp_path):
    lib, _ = clone(*pristine, tmp_path)
    res = invoke("audit", lib)
    assert "audit passed" in res.output


@pytest.mark.parametrize("name", list(TAMPERS))
def test_audit_catches(pristine, tmp_path, name):
    tamper, says, _ = TAMPERS[name]
    lib, man = clone(*pristine, tmp_path)
    tamper(lib, man)
    res = invoke("audit", lib, ok=False)
    assert res.exit_code == 1, f"{name}: audit exited {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit), f"{name}: crashed: {res.exception!r}"
    flat = " ".join(res.output.split())
    assert "violation" in flat and "audit failed" in flat, res.output
    assert says in flat, f"{name}: audit output lacks {says!r}:\n{res.output}"
    record("tamperings", name)
