"""Imputation methods: estimators, the registry and the AnnData wrapper."""

from ._api import impute, make_estimator
from ._base import BaseImputer, Posterior
from ._registry import available_methods, get_method

__all__ = ["BaseImputer", "Posterior", "available_methods", "get_method", "impute", "make_estimator"]
