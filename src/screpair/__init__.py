"""screpair: repair single-cell RNA-seq count matrices.

Dropout detection, imputation (cnnImpute, SAVER, baselines) and profile reconstruction
(DiffRepairer), with simulators and a benchmark. ``import screpair`` is light: submodules and
torch-based methods are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself); nothing heavy (anndata,
# scikit-learn, torch) is imported until a name is used, so the CLI starts fast
_LAZY: dict[str, tuple[str, str | None]] = {
    "available_methods": ("screpair.methods._registry", "available_methods"),
    "get_method": ("screpair.methods._registry", "get_method"),
    "impute": ("screpair.methods._api", "impute"),
    "impute_file": ("screpair.methods._file", "impute_file"),
    "read": ("screpair.io", "read"),
    "write": ("screpair.io", "write"),
    "io": ("screpair.io", None),
    "pp": ("screpair.pp", None),
    "datasets": ("screpair.datasets", None),
    "simulate": ("screpair.simulate", None),
    "evaluate": ("screpair.evaluate", None),
    "dropout": ("screpair.dropout", None),
    "cluster": ("screpair.dropout", "cluster"),
    "dropout_probability": ("screpair.dropout", "dropout_probability"),
    "saver_sample": ("screpair.methods.saver", "saver_sample"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    msg = f"module 'screpair' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
