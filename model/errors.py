"""The one exception the model package raises for user mistakes.

Library code raises `MsrError` with a message that says how to fix the problem;
only `model.cli` turns it into a one-line red message and exit code 1. It derives from
the project's one error base, `data_manifests.MsrfaceError`, as refbuild's and the manifests' do.
"""
from __future__ import annotations

from data_manifests import MsrfaceError


class MsrError(MsrfaceError):
    """A user-fixable problem: bad path, bad option, bad or foreign checkpoint."""


class CheckpointError(MsrError):
    """A checkpoint is missing, truncated, or holds another architecture."""
