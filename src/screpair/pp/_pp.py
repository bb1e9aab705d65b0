"""Functional preprocessing (scanpy-style AnnData contract, sparse-preserving)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._norm import CP10K, library_size
from .._norm import log1p as log1p_matrix
from .._norm import normalize as normalize_rows
from .._norm import size_factors as _size_factors
from .._utils import Data, check_output_keys, get_counts, prepare_adata


def _finish(adata: AnnData, copy: bool):
    return adata if copy else None


def _to_layer(
    data: Data,
    compute,
    *,
    layer: str | None,
    key_added: str,
    copy: bool,
    overwrite: bool,
    require_integer: bool = True,
):
    """The body of the matrix-to-layer functions (:func:`normalize`, :func:`log1p`): check the
    output key, read the matrix, ``compute`` it, then return the result for a bare matrix or
    write it to ``layers[key_added]`` of an AnnData (``None``, or the copy)."""
    if isinstance(data, AnnData):
        check_output_keys(data, [key_added], layer=layer, overwrite=overwrite)
    x = get_counts(data, layer, require_integer=require_integer, warn_empty=False)
    out = compute(x)
    if not isinstance(data, AnnData):
        return out
    adata = prepare_adata(data, copy, "screpair.pp")
    adata.layers[key_added] = out
    return _finish(adata, copy)


def size_factors(
    data: Data, *, layer: str | None = None, key_added: str = "size_factor", copy: bool = False
) -> AnnData | np.ndarray | None:
    """Per-cell size factors: library size divided by the mean library size (SAVER's definition).

    Returns
    -------
    For an AnnData: ``None`` (or a copy), writing ``.obs[key_added]``. For a matrix: the factors.
    """
    x = get_counts(data, layer, warn_empty=False)
    sf = _size_factors(library_size(x))
    if not isinstance(data, AnnData):
        return sf
    adata = prepare_adata(data, copy, "screpair.pp")
    adata.obs[key_added] = sf
    return _finish(adata, copy)


def normalize(
    data: Data,
    *,
    target_sum: float | None = CP10K,
    layer: str | None = None,
    key_added: str = "normalized",
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | np.ndarray | sp.csr_matrix | None:
    """Scale every cell to ``target_sum`` total counts (``None``: median library size).

    ``layers[key_added]`` may replace an existing layer only with ``overwrite=True``, and never
    the input ``layer``.

    Returns
    -------
    For an AnnData: ``None`` (or a copy), writing ``.layers[key_added]``. For a matrix: the result.
    """
    return _to_layer(
        data,
        lambda x: normalize_rows(x, target_sum),
        layer=layer,
        key_added=key_added,
        copy=copy,
        overwrite=overwrite,
    )


def log1p(
    data: Data,
    *,
    base: float | None = None,
    layer: str | None = None,
    key_added: str = "log1p",
    copy: bool = False,
    overwrite: bool = False,
) -> AnnData | np.ndarray | sp.csr_matrix | None:
    """``log(1 + x)`` of a (normalized) layer; does not require integer input.

    ``layers[key_added]`` may replace an existing layer only with ``overwrite=True``, and never
    the input ``layer``.

    Returns
    -------
    For an AnnData: ``None`` (or a copy), writing ``.layers[key_added]``. For a matrix: the result.
    """
    return _to_layer(
        data,
        lambda x: log1p_matrix(x, base),
        layer=layer,
        key_added=key_added,
        copy=copy,
        overwrite=overwrite,
        require_integer=False,
    )


def _filter_mask(x, axis: int, min_counts: float | None, min_nonzero: int | None) -> np.ndarray:
    counts = np.asarray(x.sum(axis=axis)).ravel()
    nnz = np.asarray((x != 0).sum(axis=axis)).ravel()
    keep = np.ones(len(counts), dtype=bool)
    if min_counts is not None:
        keep &= counts >= min_counts
    if min_nonzero is not None:
        keep &= nnz >= min_nonzero
    return keep


def filter_genes(
    adata: AnnData,
    *,
    min_cells: int | None = None,
    min_counts: float | None = None,
    layer: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Keep genes detected in at least ``min_cells`` cells and/or with ``min_counts`` counts.

    Returns
    -------
    ``None`` (subsets ``adata`` in place) or the filtered copy. ``.var["n_cells"]`` records the
    number of cells each kept gene is detected in.
    """
    x = get_counts(adata, layer, require_integer=False, warn_empty=False)
    keep = _filter_mask(x, 0, min_counts, min_cells)
    n_cells = np.asarray((x != 0).sum(axis=0)).ravel()
    if copy:
        out = adata[:, keep].copy()
        out.var["n_cells"] = n_cells[keep]
        return out
    adata._inplace_subset_var(keep)
    adata.var["n_cells"] = n_cells[keep]
    return None


def filter_cells(
    adata: AnnData,
    *,
    min_genes: int | None = None,
    min_counts: float | None = None,
    layer: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Keep cells with at least ``min_genes`` detected genes and/or ``min_counts`` counts.

    Returns
    -------
    ``None`` (subsets ``adata`` in place) or the filtered copy. ``.obs["n_genes"]`` records the
    number of detected genes of each kept cell.
    """
    x = get_counts(adata, layer, require_integer=False, warn_empty=False)
    keep = _filter_mask(x, 1, min_counts, min_genes)
    n_genes = np.asarray((x != 0).sum(axis=1)).ravel()
    if copy:
        out = adata[keep].copy()
        out.obs["n_genes"] = n_genes[keep]
        return out
    adata._inplace_subset_obs(keep)
    adata.obs["n_genes"] = n_genes[keep]
    return None


def hvg_dispersion(x, n_top_genes: int, n_bins: int = 20) -> pd.DataFrame:
    """Seurat-style highly-variable genes on library-normalized (1e4) counts.

    Mean and dispersion (variance / mean) of the normalized values per gene; the log dispersion is
    z-scored within ``n_bins`` bins of log mean expression; the ``n_top_genes`` with the largest
    normalized dispersion are selected (ties broken by gene order). Genes with zero mean are never
    selected. :func:`hvg_from_moments` does the selection from the moments (e.g. those of a
    streaming pass over a file, ``screpair._chunks.gene_stats``).
    """
    xn = normalize_rows(x, CP10K)
    mean = np.asarray(xn.mean(axis=0)).ravel()
    sq = xn.multiply(xn).mean(axis=0) if sp.issparse(xn) else (xn**2).mean(axis=0)
    return hvg_from_moments(mean, np.asarray(sq).ravel(), x.shape[0], n_top_genes, n_bins)


def hvg_from_moments(mean: np.ndarray, mean_sq: np.ndarray, n_obs: int, n_top_genes: int,
                     n_bins: int = 20) -> pd.DataFrame:
    """:func:`hvg_dispersion` from the per-gene mean and mean square of the normalized values
    over ``n_obs`` cells."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(mean_sq, dtype=np.float64) - mean**2
    var *= n_obs / max(n_obs - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(np.where(mean > 0, var / np.where(mean > 0, mean, 1), np.nan) + 1e-12)
        logm = np.log1p(mean)
    df = pd.DataFrame({"mean": mean, "dispersion": disp})
    ok = mean > 0
    bins = pd.cut(logm[ok], bins=n_bins) if ok.sum() > 1 else np.zeros(ok.sum())
    grp = pd.Series(disp[ok]).groupby(np.asarray(pd.Categorical(bins).codes), observed=True)
    mu, sd = grp.transform("mean").to_numpy(), grp.transform("std").to_numpy()
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    norm = np.full(len(mean), -np.inf)
    norm[ok] = np.nan_to_num((disp[ok] - mu) / sd, nan=0.0)
    df["dispersion_norm"] = norm
    n = min(int(n_top_genes), int(ok.sum()))
    order = np.argsort(-norm, kind="stable")[:n]
    hv = np.zeros(len(mean), dtype=bool)
    hv[order] = True
    df["highly_variable"] = hv
    return df


def highly_variable_genes(
    data: Data,
    *,
    n_top_genes: int = 2000,
    layer: str | None = None,
    key_added: str = "highly_variable",
    copy: bool = False,
) -> AnnData | np.ndarray | None:
    """Select highly-variable genes from raw counts (dispersion-based, Seurat flavour).

    Returns
    -------
    For an AnnData: ``None`` (or a copy), writing ``.var[key_added]`` (bool), ``.var["means"]``,
    ``.var["dispersions"]`` and ``.var["dispersions_norm"]``. For a matrix: the boolean mask.
    """
    x = get_counts(data, layer, warn_empty=False)
    df = hvg_dispersion(x, n_top_genes)
    if not isinstance(data, AnnData):
        return df["highly_variable"].to_numpy()
    adata = prepare_adata(data, copy, "screpair.pp")
    adata.var[key_added] = df["highly_variable"].to_numpy()
    adata.var["means"] = df["mean"].to_numpy()
    adata.var["dispersions"] = df["dispersion"].to_numpy()
    adata.var["dispersions_norm"] = df["dispersion_norm"].to_numpy()
    return _finish(adata, copy)
