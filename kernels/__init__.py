"""Pallas kernels, each beside the plain-JAX reference it is tested against.

Importing the package runs nothing (the names load on first use): a bare `import kernels`
must stay cheap and side-effect free, since other libraries probe for a top-level
`kernels` module (transformers looks for Hugging Face's `kernels` package that way).
"""

import importlib

__all__ = ["flash_attention", "reference_attention"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module("kernels.attention"), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
