"""Shared helpers for the simulators: the ground-truth AnnData schema and parameter checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import __version__
from .._utils import jsonable

#: Layer names every simulator in :mod:`screpair.simulate` writes.
COUNTS, TRUTH, MASK = "counts", "true_counts", "dropout_mask"


def truth_adata(
    counts: sp.csr_matrix,
    truth: sp.csr_matrix,
    mask: sp.csr_matrix,
    *,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    uns_key: str,
    params: dict,
) -> AnnData:
    """Build the ground-truth AnnData shared by all simulators.

    ``X`` and ``layers['counts']`` hold the observed (damaged) counts, ``layers['true_counts']`` the
    truth and ``layers['dropout_mask']`` the entries whose true count was zeroed.
    """
    ad = AnnData(X=counts.copy(), obs=obs, var=var)
    ad.layers[COUNTS] = counts
    ad.layers[TRUTH] = truth
    ad.layers[MASK] = mask
    ad.uns[uns_key] = {"params": jsonable(params), "version": __version__}
    return ad


def truth_uns(method: str, params: dict) -> dict:
    """The ``uns['simulate']`` record of a simulation written to a file (as :func:`truth_adata`
    and the simulator store it in memory)."""
    return {"params": jsonable(params), "version": __version__, "method": method}


def csr(x: np.ndarray | sp.spmatrix, dtype=np.float32) -> sp.csr_matrix:
    """CSR copy of ``x`` with explicit zeros removed."""
    out = sp.csr_matrix(x, dtype=dtype)
    out.eliminate_zeros()
    return out


def check_range(name: str, value, low: float, high: float = np.inf) -> None:
    """Raise ``ValueError`` unless every value lies in ``[low, high]`` and is finite."""
    arr = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr < low) | (arr > high)
    if arr.size and bad.any():
        bounds = f"[{low}, {high}]" if np.isfinite(high) else f">= {low}"
        if arr.size == 1:
            got = repr(value)
        else:  # one value per cell: say which, not the whole array
            i = int(np.flatnonzero(bad.ravel())[0])
            got = f"{int(bad.sum())} of {arr.size} values outside (first: {arr.ravel()[i]:g} at {i})"
        msg = f"{name} must be finite and {bounds}, got {got}."
        raise ValueError(msg)
