"""Simulators with ground truth.

- :func:`splat`: the Splat model of Splatter (Zappia et al. 2017), with named :data:`PRESETS`;
- :func:`degrade`: RNA-degradation damage (3' bias, dropout, noise) of clean counts, as in the
  DiffRepairer paper; :func:`degrade_counts` is its matrix core (count matrix in, counts and
  dropout mask out) and :func:`degrade_log` the same damage on log-normalized arrays;
- :func:`mask`: the masked-value protocol of cnnImpute/DeepImpute;
- :func:`mcv_split`: molecular cross-validation by binomial thinning (Batson et al. 2019).

:func:`splat`, :func:`degrade` and :func:`mask` return an AnnData with the same layers: ``counts``
(observed, also in ``X``), ``true_counts`` (truth) and ``dropout_mask`` (entries whose true count
was zeroed).
"""

from ._degrade import (
    DegradeCountsOutput,
    DegradeOutput,
    default_gene_length,
    degrade,
    degrade_counts,
    degrade_log,
    log_normalize,
)
from ._mask import mask, mcv_split
from ._splat import PRESETS, SplatParams, dropout_probability, simulate_splat, splat

#: Alias following the style guide's name.
splat_like = splat

__all__ = [
    "PRESETS",
    "DegradeOutput",
    "DegradeCountsOutput",
    "SplatParams",
    "default_gene_length",
    "degrade",
    "degrade_counts",
    "degrade_log",
    "dropout_probability",
    "log_normalize",
    "mask",
    "mcv_split",
    "simulate_splat",
    "splat",
    "splat_like",
]
