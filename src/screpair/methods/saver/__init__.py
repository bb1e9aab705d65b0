"""SAVER: Poisson-gamma empirical Bayes expression recovery with posterior uncertainty."""

from ._model import (
    VAR_MODELS,
    SaverImputer,
    fit_variance_model,
    gamma_posterior,
    prior_shape_rate,
    saver_sample,
    size_factors,
)

__all__ = [
    "VAR_MODELS",
    "SaverImputer",
    "fit_variance_model",
    "gamma_posterior",
    "prior_shape_rate",
    "saver_sample",
    "size_factors",
]
