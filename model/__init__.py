"""MSRNet: face super-resolution from multi-source references.

`create_model(name, **kw)` builds a registered variant (`list_models()`).
"""
from .errors import CheckpointError, MsrError
from .registry import create_model, list_models

__all__ = ["create_model", "list_models", "MsrError", "CheckpointError"]
