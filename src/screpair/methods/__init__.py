"""Imputation methods: estimators, the registry, the AnnData wrapper and :class:`TrainConfig`
(the training settings of the neural methods).

Names are imported on first use (``__getattr__``), so that the registry can be read without
importing anndata or scikit-learn (the CLI lists the methods in its help).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "impute": "._api",
    "impute_file": "._file",
    "make_estimator": "._api",
    "BaseImputer": "._base",
    "DataContext": "._base",
    "Posterior": "._base",
    "TrainConfig": "._torch",
    "available_methods": "._registry",
    "get_method": "._registry",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
