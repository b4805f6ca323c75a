"""The one exception the model package raises for user mistakes.

Library code raises `MsrError` with a message that says how to fix the problem;
only `model.cli` turns it into a one-line red message and exit code 1.
"""
from __future__ import annotations


class MsrError(Exception):
    """A user-fixable problem: bad path, bad option, bad or foreign checkpoint."""


class CheckpointError(MsrError):
    """A checkpoint is missing, truncated, or holds another architecture."""
