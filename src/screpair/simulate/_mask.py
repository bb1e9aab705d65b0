"""Evaluation splits on real counts: masked values and molecular cross-validation."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .. import __version__
from .._logging import get_logger
from .._utils import RNGLike, as_rng, get_counts, jsonable
from ._common import check_range, csr, truth_adata

logger = get_logger(__name__)


def _csr_counts(adata: AnnData, layer: str | None) -> sp.csr_matrix:
    x = get_counts(adata, layer, warn_empty=False)
    return csr(x, dtype=np.float64) if not sp.issparse(x) else x


def mask(
    adata: AnnData,
    *,
    layer: str | None = None,
    frac: float = 0.1,
    min_frac_cells: float = 0.5,
    rng: RNGLike = None,
) -> tuple[AnnData, sp.csr_matrix]:
    """Hide a random fraction of the observed non-zero values (the cnnImpute/DeepImpute protocol).

    Genes detected (count > 0) in at least ``min_frac_cells`` of the cells are eligible; exactly
    ``round(frac * n)`` of the ``n`` non-zero entries of the eligible genes, drawn uniformly
    without replacement, are set to zero. An imputation method is then scored on how well it
    recovers the hidden values.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` or ``layers[layer]``. Not modified.
    layer
        Layer with the counts; ``None`` reads ``X``.
    frac
        Fraction of the eligible non-zero entries to hide, in ``[0, 1]``.
    min_frac_cells
        Minimum fraction of cells in which a gene must be detected to be eligible.
    rng
        Seed or :class:`numpy.random.Generator`; the same seed gives the same mask.

    Returns
    -------
    ``(masked, mask)``. ``mask`` is a CSR bool matrix, ``True`` at the hidden entries. ``masked`` is
    a new AnnData with ``obs``/``var`` copied from ``adata`` and

    - ``.X`` and ``.layers['counts']``: the counts with the hidden entries set to 0;
    - ``.layers['true_counts']``: the input counts (the truth at the hidden entries);
    - ``.layers['dropout_mask']``: the mask;
    - ``.var['mask_eligible']``: whether the gene could be masked;
    - ``.uns['mask']``: ``{"params": ..., "version": ..., "n_masked": ...}``.

    Examples
    --------
    >>> from screpair import simulate
    >>> sim = simulate.splat(n_obs=50, n_vars=30, lib_loc=8, rng=0)
    >>> masked, m = simulate.mask(sim, layer="counts", frac=0.1, rng=0)
    >>> masked.layers["counts"].multiply(m).nnz
    0
    """
    check_range("frac", frac, 0.0, 1.0)
    check_range("min_frac_cells", min_frac_cells, 0.0, 1.0)
    rng = as_rng(rng)
    x = _csr_counts(adata, layer)
    x.sort_indices()
    n_obs, n_vars = x.shape
    detected = np.bincount(x.indices, minlength=n_vars) / n_obs
    eligible = detected >= min_frac_cells
    candidates = np.flatnonzero(eligible[x.indices])  # positions in x.data
    n_mask = int(round(frac * candidates.size))
    chosen = np.sort(rng.choice(candidates, size=n_mask, replace=False))
    if n_mask == 0:
        logger.warning("mask: no entry was masked (%d eligible non-zero entries)", candidates.size)
    hide = np.zeros(x.nnz, dtype=bool)
    hide[chosen] = True
    # copies: eliminate_zeros compacts the arrays a CSR matrix was built from, in place
    m = sp.csr_matrix((hide.copy(), x.indices.copy(), x.indptr.copy()), shape=x.shape)
    m.eliminate_zeros()
    masked_x = x.copy()
    masked_x.data[hide] = 0
    masked_x.eliminate_zeros()
    var = adata.var.copy()
    var["mask_eligible"] = eligible
    params = {"layer": layer, "frac": frac, "min_frac_cells": min_frac_cells}
    out = truth_adata(
        csr(masked_x), csr(x), m, obs=adata.obs.copy(), var=var, uns_key="mask", params=params
    )
    out.uns["mask"]["n_masked"] = n_mask
    return out, m


def mcv_split(
    adata: AnnData,
    *,
    layer: str | None = None,
    train_frac: float = 0.9,
    rng: RNGLike = None,
) -> tuple[AnnData, AnnData]:
    """Molecular cross-validation split by binomial thinning (Batson, Royer & Webber 2019).

    Each molecule goes to the training half with probability ``train_frac``, independently:
    ``train = Binomial(x, train_frac)`` and ``test = x - train``, so ``train + test == x`` exactly.
    This is the split of the Open Problems denoising task: fit on ``train``, then compare the
    denoised ``train`` (rescaled by ``(1 - train_frac) / train_frac``) with ``test``.

    Parameters
    ----------
    adata
        Cells x genes with raw integer counts in ``X`` or ``layers[layer]``. Not modified.
    layer
        Layer with the counts; ``None`` reads ``X``.
    train_frac
        Probability that a molecule is in the training split, in ``(0, 1)``.
    rng
        Seed or :class:`numpy.random.Generator`; the same seed gives the same split.

    Returns
    -------
    ``(train, test)``: two new AnnData with ``obs``/``var`` copied from ``adata``; ``.X`` and
    ``.layers['counts']`` hold each split's counts (CSR float32), ``.uns['mcv']`` the parameters
    and which split it is.

    Examples
    --------
    >>> from screpair import simulate
    >>> sim = simulate.splat(n_obs=50, n_vars=30, lib_loc=8, rng=0)
    >>> train, test = simulate.mcv_split(sim, layer="counts", rng=0)
    >>> bool(((train.X + test.X) != sim.layers["counts"]).nnz == 0)
    True
    """
    if not 0.0 < train_frac < 1.0:
        msg = f"train_frac must be in (0, 1), got {train_frac!r}."
        raise ValueError(msg)
    rng = as_rng(rng)
    x = _csr_counts(adata, layer)
    n = np.rint(x.data).astype(np.int64)
    k = rng.binomial(n, train_frac)
    train = sp.csr_matrix((k.astype(np.float32), x.indices, x.indptr), shape=x.shape)
    test = sp.csr_matrix(
        ((n - k).astype(np.float32), x.indices.copy(), x.indptr.copy()), shape=x.shape
    )
    out = []
    for name, m in (("train", train), ("test", test)):
        m.eliminate_zeros()
        ad = AnnData(X=m.copy(), obs=adata.obs.copy(), var=adata.var.copy())
        ad.layers["counts"] = m
        ad.uns["mcv"] = {
            "params": jsonable({"layer": layer, "train_frac": train_frac}),
            "split": name,
            "version": __version__,
        }
        out.append(ad)
    return out[0], out[1]
