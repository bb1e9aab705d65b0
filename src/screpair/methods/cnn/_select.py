"""cnnImpute's target / input-gene selection (numpy and scipy only, no torch).

Targets are the genes with at least one missing entry (dropout probability above the threshold).
They are split into subsets; each subset gets its own network (one group of the batched CNN) whose
inputs are, for every target of the subset, the ``n_top`` genes most correlated with it that are
**not in the subset** and whose missing fraction is at most ``max_missing_frac``, in target order with
duplicates removed (Zhang et al. 2024, Methods).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Group:
    """One subset network: the genes it predicts, the genes it reads, and the cells it serves.

    Attributes
    ----------
    targets
        Column indices of the target genes (at most ``subset_size``).
    inputs
        Column indices of the input genes, in the order they are fed to the convolution.
    cluster
        Cluster id of the cells this network is trained on and predicts for; ``-1`` means all cells
        (global correlation).
    """

    targets: np.ndarray
    inputs: np.ndarray
    cluster: int = -1


def pearson_columns(x, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between columns ``a`` and columns ``b`` of ``x`` (cells x genes).

    Works on CSR or dense ``x`` without densifying it. Constant columns get correlation ``nan``.

    Returns
    -------
    ``len(a) x len(b)`` float64 array.
    """
    n = x.shape[0]
    xa, xb = x[:, a], x[:, b]
    if sp.issparse(x):
        xa, xb = sp.csc_matrix(xa), sp.csc_matrix(xb)
        cross = np.asarray((xa.T @ xb).todense(), dtype=np.float64)
        ma = np.asarray(xa.mean(0), dtype=np.float64).ravel()
        mb = np.asarray(xb.mean(0), dtype=np.float64).ravel()
        sa = np.asarray(xa.multiply(xa).mean(0), dtype=np.float64).ravel() - ma**2
        sb = np.asarray(xb.multiply(xb).mean(0), dtype=np.float64).ravel() - mb**2
    else:
        xa, xb = np.asarray(xa, np.float64), np.asarray(xb, np.float64)
        cross = xa.T @ xb
        ma, mb = xa.mean(0), xb.mean(0)
        sa, sb = xa.var(0), xb.var(0)
    cov = cross / n - np.outer(ma, mb)
    sa = np.where(sa > 1e-12 * np.maximum(ma**2, 1.0), sa, np.nan)
    sb = np.where(sb > 1e-12 * np.maximum(mb**2, 1.0), sb, np.nan)
    with np.errstate(invalid="ignore"):
        return np.clip(cov / np.sqrt(np.outer(sa, sb)), -1.0, 1.0)


def top_inputs(
    corr: np.ndarray, candidates: np.ndarray, subset: np.ndarray, n_top: int = 5
) -> np.ndarray:
    """Input genes of one subset from a (targets x candidates) correlation matrix.

    Parameters
    ----------
    corr
        ``len(subset) x len(candidates)`` correlations (``nan`` = undefined, never chosen).
    candidates
        Gene indices of the columns of ``corr`` (genes eligible as inputs).
    subset
        Gene indices of the rows of ``corr`` (the subset's targets). Candidates that are in the
        subset are excluded.
    n_top
        Inputs per target.

    Returns
    -------
    Unique gene indices: each target's ``n_top`` best candidates (highest correlation first; ties
    broken by gene index), concatenated in target order, keeping the first occurrence of duplicates.
    """
    corr = np.array(corr, dtype=np.float64, copy=True)
    candidates = np.asarray(candidates)
    if corr.shape != (len(subset), len(candidates)):
        msg = f"corr has shape {corr.shape}, expected ({len(subset)}, {len(candidates)})."
        raise ValueError(msg)
    corr[:, np.isin(candidates, subset)] = np.nan
    corr = np.where(np.isnan(corr), -np.inf, corr)
    # stable sort on (-corr, gene index): sort candidates by index first
    order_idx = np.argsort(candidates, kind="stable")
    corr, candidates = corr[:, order_idx], candidates[order_idx]
    chosen: list[int] = []
    seen: set[int] = set()
    k = min(n_top, len(candidates))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = np.argsort(-corr, axis=1, kind="stable")[:, :k]
    for row, rank in enumerate(ranks):
        for j in rank:
            if not np.isfinite(corr[row, j]):
                break
            g = int(candidates[j])
            if g not in seen:
                seen.add(g)
                chosen.append(g)
    return np.asarray(chosen, dtype=np.int64)


def split_targets(
    targets: np.ndarray, subset_size: int, min_subsets: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Split target genes into subsets of at most ``subset_size`` (at least ``min_subsets`` of them).

    With ``rng`` the targets are shuffled first (a different partition per ensemble member);
    subsets are as equal in size as possible, so padding is at most one gene per subset.
    """
    targets = np.asarray(targets)
    if rng is not None:
        targets = rng.permutation(targets)
    n_sub = max(int(np.ceil(len(targets) / subset_size)), min_subsets)
    n_sub = max(1, min(n_sub, len(targets)))
    return [np.sort(s) for s in np.array_split(targets, n_sub) if len(s)]


def build_groups(
    xlog,
    missing_frac: np.ndarray,
    targets: np.ndarray,
    *,
    subset_size: int = 512,
    min_subsets: int = 4,
    n_top: int = 5,
    max_missing_frac: float = 0.5,
    cells: np.ndarray | None = None,
    cluster: int = -1,
    rng: np.random.Generator | None = None,
) -> list[Group]:
    """Subsets and their input genes, with correlations computed on ``xlog[cells]``.

    Parameters
    ----------
    xlog
        Normalized (log) expression, cells x genes, CSR or dense.
    missing_frac
        Fraction of missing entries per gene (over the same cells).
    targets
        Target gene indices.
    cells
        Rows used for the correlations (``None``: all).
    cluster
        Stored in each :class:`Group` (``-1``: global).
    """
    sub = xlog if cells is None else xlog[cells]
    nz = np.asarray((sub != 0).sum(0)).ravel() > 0
    candidates = np.flatnonzero((missing_frac <= max_missing_frac) & nz)
    groups = []
    for subset in split_targets(targets, subset_size, min_subsets, rng):
        if len(candidates):
            corr = pearson_columns(sub, subset, candidates)
            inputs = top_inputs(corr, candidates, subset, n_top)
        else:
            inputs = np.zeros(0, dtype=np.int64)
        groups.append(Group(targets=subset.astype(np.int64), inputs=inputs, cluster=cluster))
    return groups
