"""Preprocessing: size factors, normalization, log1p, filters and highly-variable genes.

Every function takes an AnnData (writes the result into a slot named by ``key_added``, never over
``X``; returns ``None`` or a copy with ``copy=True``) or a bare matrix (returns the result). Sparse
input stays sparse.
"""

from ._pp import (
    filter_cells,
    filter_genes,
    highly_variable_genes,
    log1p,
    normalize,
    size_factors,
)

__all__ = ["filter_cells", "filter_genes", "highly_variable_genes", "log1p", "normalize", "size_factors"]
