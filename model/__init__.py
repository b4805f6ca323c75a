"""MSRNet: face super-resolution from multi-source references.

`create_model(name, **kw)` builds a registered variant (`list_models()`).
"""
from .errors import CheckpointError, MsrError
from .registry import create_model, list_models

# The model families: importing each registers its variants (timm's layout; the registry imports none of them).
from . import msrnet, msrnet2, sparnet, swinir  # noqa: F401

__all__ = ["create_model", "list_models", "MsrError", "CheckpointError"]
