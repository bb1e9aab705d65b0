"""Name -> estimator class registry. Entries are imported lazily so that ``import screpair``
stays light (the torch methods import torch only when used)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._base import BaseImputer

_METHODS: dict[str, str] = {
    "knn": "screpair.methods.knn:KNNImputer",
    "alra": "screpair.methods.alra:ALRAImputer",
    "saver": "screpair.methods.saver:SaverImputer",
    "cnn": "screpair.methods.cnn:CNNImputer",
    "diffusion": "screpair.methods.diffusion:DiffusionImputer",
    "dae": "screpair.methods.autoencoder:DAEImputer",
    "vae": "screpair.methods.autoencoder:VAEImputer",
}


def available_methods() -> list[str]:
    """Names accepted by :func:`screpair.impute` and ``screpair impute --method``."""
    return sorted(_METHODS)


def get_method(name: str) -> type[BaseImputer]:
    """The estimator class registered under ``name``."""
    if name not in _METHODS:
        msg = f"unknown method {name!r}; available methods: {', '.join(available_methods())}."
        raise ValueError(msg)
    module, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
