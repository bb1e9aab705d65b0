"""Preprocessing: size factors, normalization, log1p, filters and highly-variable genes.

Every function takes an AnnData (writes the result into a slot named by ``key_added``, never over
``X``; returns ``None`` or a copy with ``copy=True``) or a bare matrix (returns the result). Sparse
input stays sparse.

The matrix-level helpers behind them, for code that has already validated its counts (no checks,
no AnnData): :func:`normalize_rows` and :func:`log1p_matrix` (``screpair._norm.normalize`` and
``screpair._norm.log1p``, re-exported) and :func:`hvg_dispersion` (:func:`hvg_from_moments`: the same from per-gene moments).
"""

from ._pp import (
    filter_cells,
    filter_genes,
    highly_variable_genes,
    hvg_dispersion,
    hvg_from_moments,
    log1p,
    log1p_matrix,
    normalize,
    normalize_rows,
    size_factors,
)

__all__ = [
    "filter_cells",
    "filter_genes",
    "highly_variable_genes",
    "hvg_dispersion",
    "hvg_from_moments",
    "log1p",
    "log1p_matrix",
    "normalize",
    "normalize_rows",
    "size_factors",
]
