"""Dropout probabilities from scImpute's gamma-normal mixture, fitted by a vectorised EM.

For every cell cluster and gene, the log-expression ``x = log10(CPM + 1.01)`` of the cluster's cells
is modelled as in scImpute (Li & Li, Nat Commun 2018, functions ``get_mix`` /
``update_gmm_pars`` / ``calculate_weight`` / ``find_va_genes``), which cnnImpute (Zhang et al.
2024) uses for its dropout step::

    f(x) = eta * Gamma(x; alpha, rate=beta) + (1 - eta) * Normal(x; mu, sigma)

The gamma component holds the dropouts (all observed zeros sit at ``x = log10(1.01)``), the normal
component the actual expression. The posterior weight of the gamma component at ``x`` is the
dropout probability (cnnImpute Eq. 2).

The EM follows scImpute step by step:

- initial values: ``eta`` = fraction of zeros (0.01 if there are none), ``alpha = 0.5``,
  ``beta = 1``, ``mu`` and ``sigma`` = mean and standard deviation (``ddof=1``) of the non-zero
  values;
- E-step: ``w = eta Gamma / (eta Gamma + (1 - eta) Normal)``, and ``w = 0`` where the weighted gamma
  density is exactly 0;
- M-step in scImpute's order: ``eta = mean(w)``, ``mu`` and ``sigma`` weighted by ``1 - w`` (``sigma``
  about the new ``mu``), then ``alpha`` solving ``log(alpha) - digamma(alpha) = v`` with
  ``v = log(sum w x / sum w) - sum w log x / sum w`` (``alpha = 20`` when ``v <= 0`` or when the
  closed-form start value is ``>= 20``) and ``beta = alpha sum w / sum w x``;
- stop when the squared change of the log10-likelihood is ``<= 0.5`` or after 101 updates.

Differences from the R code, all tiny: the digamma equation is solved by Newton's method to
machine precision (R's ``uniroot`` stops at a tolerance of 1.2e-4), and sums are accumulated
in a different order.

The EM runs on all (cluster, gene) units at once: entries are stored sorted by unit, every unit's
observed zeros collapse into one entry with a multiplicity (they share one value), and the
per-unit sums use :func:`numpy.add.reduceat`. Units are processed in blocks that fit in cache, and
converged units leave the active set. There is no Python loop over genes.

Degenerate units (explicit, and following what scImpute ends up doing) get no parameters (NaN) and
a status code (see :data:`STATUS`):

- ``"all_zero"``: no non-zero count in the cluster (scImpute: ``null_genes``, NA);
- ``"constant"``: fewer than two distinct non-zero values (sample sd <= 1e-12 * max(1, |mean|)),
  so the normal component has zero variance (scImpute's ``get_mix`` errors, which its ``tryCatch`` turns into NA);
- ``"failed"``: numerical failure during EM, i.e. the gamma weights all vanish, ``sigma`` reaches
  0, a parameter or the likelihood change is not finite (scImpute: an error, then NA);
- ``"small_cluster"``: the cluster has a single cell (scImpute skips it);
- ``"invalid"``: fitted, but rejected by scImpute's ``find_va_genes`` (``mu <= log10(2.01)``,
  or the gamma density beats the normal one at ``mu + 1`` while ``mu <= 1``);
- ``"few_valid"``: the cluster has at most 10 valid genes, so scImpute skips the whole cluster;
- ``"empty_gene"``: the gene has no count in any cell.

Fitted units are ``"converged"`` or ``"max_iter"`` (stopped by the iteration limit; kept, as in
scImpute).

Zeros of these units get the dropout probability ``invalid_fill``, 0 by default: scImpute leaves
them as they are, and so does cnnImpute (its ``droprate`` file holds 1 for them, but it only reads
the rows of the valid genes listed in its ``rowname`` file, so they are never imputed). Genes with
no count in any cell and cells with no count at all are set aside: their probability is 0
(cnnImpute excludes all-zero genes, ``geneall0``).

Because every zero of a cluster sits at the same value, far below the non-zero values (one count
is already ``log10(1e6 / library + 1.01)``, about 1.2 to 2.7), the posterior for a zero of a valid
gene is usually within 1e-7 of 1. ``DropoutFit.zero_logit`` keeps the exact log-odds, for ranking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import digamma, gammaln, polygamma

from .. import _norm
from .._logging import get_logger, log_task
from .._parallel import map_blocks
from .._utils import get_counts

logger = get_logger(__name__)

#: scImpute's pseudocount: its scale is ``log10(CPM + 1.01)``.
PSEUDOCOUNT = 1.01
#: The value of a zero count on scImpute's scale, ``log10(0 + 1.01)``.
POINT = float(np.log10(PSEUDOCOUNT))

#: Status codes of a (cluster, gene) fit, indexed by the integer stored in ``DropoutFit.status``.
STATUS: tuple[str, ...] = (
    "converged",
    "max_iter",
    "all_zero",
    "constant",
    "failed",
    "small_cluster",
    "invalid",
    "few_valid",
    "empty_gene",
)
_CONVERGED, _MAX_ITER, _ALL_ZERO, _CONSTANT, _FAILED, _SMALL, _INVALID, _FEW_VALID, _EMPTY = range(
    len(STATUS)
)

_ALPHA_MAX = 20.0
_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)
_PARAM_NAMES = ("eta", "alpha", "beta", "mu", "sigma")


# --------------------------------------------------------------------------- gamma M-step


def solve_alpha(v: np.ndarray, *, n_newton: int = 50) -> np.ndarray:
    """Solve ``log(alpha) - digamma(alpha) = v`` for every element, as scImpute's ``update_gmm_pars``.

    ``alpha = 20`` where ``v <= 0`` (no solution) or where the closed-form start value
    ``(3 - v + sqrt((v - 3)^2 + 24 v)) / (12 v)`` is ``>= 20``; elsewhere Newton's method on
    ``log(alpha)`` from that start value, to machine precision. NaN stays NaN.
    """
    v = np.asarray(v, dtype=np.float64)
    alpha = np.full(v.shape, np.nan)
    finite = np.isfinite(v)
    alpha[finite & (v <= 0)] = _ALPHA_MAX
    pos = finite & (v > 0)
    vp = v[pos]
    a0 = (3.0 - vp + np.sqrt((vp - 3.0) ** 2 + 24.0 * vp)) / (12.0 * vp)
    big = a0 >= _ALPHA_MAX
    a = np.where(big, _ALPHA_MAX, a0)
    todo = ~big
    if todo.any():
        vt, at = vp[todo], a[todo]
        y = np.log(at)
        for _ in range(n_newton):
            # g(y) = log a - digamma(a) - v is decreasing in y = log a; g'(y) = 1 - a trigamma(a) < 0
            g = y - digamma(at) - vt
            dg = 1.0 - at * polygamma(1, at)
            step = g / dg
            y = y - step
            at = np.exp(y)
            if np.all(np.abs(step) <= 1e-13 * np.maximum(1.0, np.abs(y))):
                break
        a[todo] = at
    alpha[pos] = a
    return alpha


# --------------------------------------------------------------------------- densities


def _log_densities(x, logx, unit_len, eta, alpha, beta, mu, sigma):
    """Log of the weighted gamma and normal densities at every entry (per-unit params repeated)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c1 = np.log(eta) + alpha * np.log(beta) - gammaln(alpha)
        c2 = np.log1p(-eta) - np.log(sigma) - _LOG_SQRT_2PI
        inv = 1.0 / sigma
        rep = np.repeat
        l1 = rep(c1, unit_len) + rep(alpha - 1.0, unit_len) * logx - rep(beta, unit_len) * x
        z = (x - rep(mu, unit_len)) * rep(inv, unit_len)
        l2 = rep(c2, unit_len) - 0.5 * z * z
    return l1, l2


def mixture_density(x, eta, alpha, beta, mu, sigma) -> np.ndarray:
    """scImpute's ``dmix``: the mixture density at ``x`` (broadcasting over parameters)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lg = (alpha - 1.0) * np.log(x) - beta * x + alpha * np.log(beta) - gammaln(alpha)
        ln = -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - _LOG_SQRT_2PI
        return eta * np.exp(lg) + (1.0 - eta) * np.exp(ln)


def dropout_weight(x, eta, alpha, beta, mu, sigma) -> np.ndarray:
    """scImpute's ``calculate_weight``: posterior probability of the gamma (dropout) component.

    Broadcasts over ``x`` and the parameters; 0 where the weighted gamma density is exactly 0.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lg = (alpha - 1.0) * np.log(x) - beta * x + alpha * np.log(beta) - gammaln(alpha)
        ln = -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - _LOG_SQRT_2PI
        pz1 = eta * np.exp(lg)
        pz2 = (1.0 - eta) * np.exp(ln)
        pz = pz1 / (pz1 + pz2)
    return np.where(pz1 == 0, 0.0, pz)


# --------------------------------------------------------------------------- EM core


@dataclass
class MixtureFit:
    """Per-unit result of :func:`fit_mixture` (arrays of length ``n_units``)."""

    eta: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    loglik: np.ndarray


def fit_mixture(
    x: np.ndarray,
    unit_len: np.ndarray,
    *,
    mult: np.ndarray | None = None,
    point: float = POINT,
    max_iter: int = 100,
    tol: float = 0.5,
    block_size: int = 131_072,
) -> MixtureFit:
    """Fit scImpute's gamma-normal mixture to many units (e.g. genes) at once.

    Parameters
    ----------
    x
        Values of every unit, concatenated unit after unit (all ``> 0``).
    unit_len
        Number of entries of each unit (``x`` holds ``unit_len[0]`` values of unit 0, then unit 1, …).
        Units with no entries are allowed (status ``"all_zero"``).
    mult
        Multiplicity of each entry (default 1): a value repeated ``m`` times can be one entry.
    point
        Value of a zero count: entries equal to it give the initial ``eta``, entries above it the
        initial ``mu`` and ``sigma``.
    max_iter
        scImpute stops after the update that makes the iteration count exceed ``max_iter`` (so at most
        ``max_iter + 1`` updates; scImpute uses 100).
    tol
        Stop when ``(loglik - loglik_old)^2 <= tol`` (log10-likelihood; scImpute uses 0.5, and
        ``loglik_old = 0`` before the first update).
    block_size
        Approximate number of entries processed together (memory/cache trade-off only).

    Returns
    -------
    Fitted parameters, iteration counts, status codes (indices into :data:`STATUS`; only
    ``"converged"``, ``"max_iter"``, ``"all_zero"``, ``"constant"`` and ``"failed"`` occur here) and
    the final log10-likelihood of every unit.
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    unit_len = np.asarray(unit_len, dtype=np.int64)
    m = np.ones_like(x) if mult is None else np.ascontiguousarray(mult, dtype=np.float64)
    n_units = unit_len.size
    if x.ndim != 1 or m.shape != x.shape or unit_len.sum() != x.size:
        msg = "x and mult must be 1-D of length unit_len.sum()."
        raise ValueError(msg)
    if x.size and not np.all(x > 0):
        msg = "all values must be > 0 (the gamma component lives on the positive axis)."
        raise ValueError(msg)
    out = _empty_fit(n_units)
    starts = np.concatenate([[0], np.cumsum(unit_len)])
    for lo, hi in _unit_blocks(unit_len, block_size):
        sl = slice(starts[lo], starts[hi])
        _fit_block(x[sl], m[sl], unit_len[lo:hi], out, lo, point, max_iter, tol)
    return out


def _empty_fit(n_units: int) -> MixtureFit:
    return MixtureFit(
        *(np.full(n_units, np.nan) for _ in _PARAM_NAMES),
        n_iter=np.zeros(n_units, dtype=np.int64),
        status=np.full(n_units, _FAILED, dtype=np.int8),
        loglik=np.full(n_units, np.nan),
    )


def _unit_blocks(unit_len: np.ndarray, block_size: int) -> list[tuple[int, int]]:
    """``(lo, hi)``: blocks of consecutive units with about ``block_size`` entries each (at
    least one unit). Each block is fitted on its own (:func:`_fit_block`), so its units'
    results do not depend on the other blocks."""
    starts = np.concatenate([[0], np.cumsum(unit_len)])
    n_units = unit_len.size
    out = []
    lo = 0
    while lo < n_units:
        hi = int(np.searchsorted(starts, starts[lo] + block_size, side="right")) - 1
        hi = min(max(hi, lo + 1), n_units)
        out.append((lo, hi))
        lo = hi
    return out


def _segment_sum(values: np.ndarray, seg_start: np.ndarray) -> np.ndarray:
    return np.add.reduceat(values, seg_start) if values.size else np.zeros(seg_start.size)


def _fit_block(x, m, unit_len, out: MixtureFit, offset: int, point, max_iter, tol) -> None:
    """Fit the units of one block (consecutive units ``offset, offset + 1, ...`` of ``out``).

    scImpute's start values and the degenerate units first (:func:`_initial_values`), then the
    EM on the other units (:func:`_run_em`), then the results into ``out`` (parameters and
    likelihood NaN for units without a fit).
    """
    pars, status = _initial_values(x, m, unit_len, point)
    n_iter = np.zeros(unit_len.size, dtype=np.int64)
    loglik = np.full(unit_len.size, np.nan)
    _run_em(x, m, unit_len, pars, status, n_iter, loglik, max_iter=max_iter, tol=tol)
    units = np.arange(offset, offset + unit_len.size)
    fitted = (status == _CONVERGED) | (status == _MAX_ITER)
    for name, arr in zip(_PARAM_NAMES, pars, strict=True):
        getattr(out, name)[units] = np.where(fitted, arr, np.nan)
    out.n_iter[units] = n_iter
    out.status[units] = status
    out.loglik[units] = np.where(fitted, loglik, np.nan)


def _initial_values(x, m, unit_len, point) -> tuple[np.ndarray, np.ndarray]:
    """scImpute's start values (``get_mix``) and the units the EM cannot fit.

    Returns the parameters (a ``5 x n_units`` array in the order of ``_PARAM_NAMES``) and the
    status of every unit: ``"all_zero"`` (no entry, or none above ``point``), ``"constant"``
    (the values above ``point`` have no spread), else ``"failed"`` until the EM says otherwise.
    """
    n = unit_len.size
    idx = np.repeat(np.arange(n), unit_len)
    is_zero = x == point
    above = x > point
    n_tot = np.bincount(idx, weights=m, minlength=n)
    n_zero = np.bincount(idx, weights=m * is_zero, minlength=n)
    n_above = np.bincount(idx, weights=m * above, minlength=n)
    s_above = np.bincount(idx, weights=m * x * above, minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = n_zero / n_tot
        mu = s_above / n_above
        dev = np.where(above, x - mu[idx], 0.0)
        ss = np.bincount(idx, weights=m * dev * dev, minlength=n)
        sigma = np.sqrt(ss / (n_above - 1.0))
    eta = np.where(eta == 0, 0.01, eta)
    pars = np.stack([eta, np.full(n, 0.5), np.ones(n), mu, sigma])  # alpha 0.5, beta 1
    status = np.full(n, _FAILED, dtype=np.int8)
    all_zero = n_above == 0
    constant = ~all_zero & ~(sigma > 1e-12 * np.maximum(1.0, np.abs(mu)))
    status[(unit_len == 0) | all_zero] = _ALL_ZERO
    status[constant] = _CONSTANT
    return pars, status


def _run_em(x, m, unit_len, pars, status, n_iter, loglik, *, max_iter, tol) -> None:
    """scImpute's EM on every unit whose status is still ``"failed"`` (the fittable ones).

    The entries of the active units are kept in compact arrays; after each update
    (:func:`_em_update`) the units that failed, converged (squared log10-likelihood change
    ``<= tol``) or passed ``max_iter`` leave them. ``pars``, ``status``, ``n_iter`` and ``loglik``
    are updated in place (parameters and likelihood only for units that did not fail).
    """
    act = np.flatnonzero(status == _FAILED)  # block-local ids of the active units, in order
    sel = np.repeat(status == _FAILED, unit_len)
    x_c, m_c = x[sel], m[sel]
    lx_c = np.log(x_c)
    len_c = unit_len[act]
    l1, l2 = _log_densities(x_c, lx_c, len_c, *pars[:, act])
    loglik_old = np.zeros(unit_len.size)
    it = 0
    while act.size:
        it += 1
        new, s1, ll, l1, l2 = _em_update(x_c, lx_c, m_c, len_c, l1, l2)
        with np.errstate(over="ignore", invalid="ignore"):
            eps = (ll - loglik_old[act]) ** 2
        failed = ~np.all(np.isfinite(new), axis=0) | ~(new[4] > 0) | ~(s1 > 0) | np.isnan(eps)
        done_conv = ~failed & (eps <= tol)
        done_max = ~failed & ~done_conv & (it > max_iter)
        loglik_old[act] = ll
        finished = failed | done_conv | done_max
        if not finished.any():
            continue
        fin = act[finished]
        status[fin] = np.where(failed, _FAILED, np.where(done_conv, _CONVERGED, _MAX_ITER))[
            finished
        ]
        ok = finished & ~failed
        pars[:, act[ok]] = new[:, ok]
        loglik[act[ok]] = ll[ok]
        n_iter[fin] = it
        keep = ~finished
        keep_e = np.repeat(keep, len_c)
        x_c, lx_c, m_c = x_c[keep_e], lx_c[keep_e], m_c[keep_e]
        l1, l2 = l1[keep_e], l2[keep_e]
        len_c = len_c[keep]
        act = act[keep]


def _em_update(x_c, lx_c, m_c, len_c, l1, l2):
    """One EM update of the active units from their current log densities ``l1``, ``l2``.

    E-step: the gamma weight ``w`` of every entry (0 where the weighted gamma density is 0).
    M-step in scImpute's order: ``eta``, then ``mu`` and ``sigma`` weighted by ``1 - w``, then
    ``alpha`` (:func:`solve_alpha`) and ``beta``. Returns the new parameters (``5 x n_active``),
    the gamma weight sums ``s1``, the new log10-likelihoods and the new log densities.
    """
    seg = np.concatenate([[0], np.cumsum(len_c)[:-1]])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        pz1 = np.exp(l1)
        pz2 = np.exp(l2)
        w1 = pz1 / (pz1 + pz2)
        w1[pz1 == 0] = 0.0
        mw1 = m_c * w1
        mw2 = m_c * (1.0 - w1)
        s1 = _segment_sum(mw1, seg)
        eta = s1 / _segment_sum(m_c, seg)
        s2 = _segment_sum(mw2, seg)
        mu = _segment_sum(mw2 * x_c, seg) / s2
        d = x_c - np.repeat(mu, len_c)
        sigma = np.sqrt(_segment_sum(mw2 * d * d, seg) / s2)
        t1 = _segment_sum(mw1 * x_c, seg)
        u1 = _segment_sum(mw1 * lx_c, seg)
        v = -u1 / s1 - np.log(s1 / t1)
        alpha = solve_alpha(v)
        beta = s1 / t1 * alpha
        l1, l2 = _log_densities(x_c, lx_c, len_c, eta, alpha, beta, mu, sigma)
        ll = _segment_sum(m_c * np.log10(np.exp(l1) + np.exp(l2)), seg)
    return np.stack([eta, alpha, beta, mu, sigma]), s1, ll, l1, l2


# --------------------------------------------------------------------------- cells x genes


@dataclass
class DropoutFit:
    """Result of :func:`fit_dropout`.

    Attributes
    ----------
    prob
        Dropout probability of every zero entry of the counts (cells x genes CSR). Observed non-zero
        counts are never missing: their probability is 0 and they are not stored (nor are zeros whose
        probability is exactly 0).
    clusters
        Cluster ids, in the row order of the per-cluster arrays below.
    eta, alpha, beta, mu, sigma
        Fitted mixture parameters (n_clusters x n_genes): dropout rate, gamma shape and rate,
        normal mean and standard deviation, on the ``log10(CPM + 1.01)`` scale. NaN where no fit
        exists (see ``status``).
    zero_prob
        The probability given to a zero count of each gene in each cluster (n_clusters x n_genes):
        all zeros of a cluster share the value ``log10(1.01)``, so they share one probability.
    zero_logit
        Log-odds ``log(eta Gamma) - log((1 - eta) Normal)`` at a zero (n_clusters x n_genes; NaN
        where there is no fit): ``zero_prob`` of valid units rounds to 1 where this exceeds ~37, so
        use it to rank zeros.
    valid
        Whether scImpute would use the fit (n_clusters x n_genes); zeros of other units get
        ``invalid_fill``.
    status
        Index into :data:`STATUS` for every (cluster, gene).
    n_iter
        EM updates per (cluster, gene).
    cell_cluster
        Row of ``clusters`` for every cell (-1 for cells without counts, which are set aside).
    """

    prob: sp.csr_matrix
    clusters: np.ndarray
    eta: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    zero_prob: np.ndarray
    zero_logit: np.ndarray
    valid: np.ndarray
    status: np.ndarray
    n_iter: np.ndarray
    cell_cluster: np.ndarray
    params: dict = field(default_factory=dict)

    def status_counts(self) -> dict[str, int]:
        """Number of (cluster, gene) units in each status."""
        counts = np.bincount(self.status.ravel(), minlength=len(STATUS))
        return {name: int(c) for name, c in zip(STATUS, counts, strict=True) if c}


def _labels_codes(labels, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    lab = labels.to_numpy() if isinstance(labels, (pd.Series, pd.Categorical)) else labels
    lab = np.asarray(lab)
    if lab.ndim != 1 or lab.shape[0] != n_cells:
        msg = f"labels must be 1-D with one entry per cell ({n_cells}), got shape {lab.shape}."
        raise ValueError(msg)
    missing = pd.isna(lab)
    if missing.any():
        msg = (
            f"{int(missing.sum())} cell(s) have no cluster label (NaN/None); give them a label "
            "(e.g. 'unknown') or drop them."
        )
        raise ValueError(msg)
    if lab.dtype == object:
        lab = lab.astype(str)
    return np.unique(lab, return_inverse=True)


def fit_dropout(
    x,
    labels,
    *,
    max_iter: int = 100,
    tol: float = 0.5,
    invalid_fill: float = 0.0,
    min_valid_genes: int = 11,
    dtype: np.dtype | type = np.float32,
    batch_size: int = 1024,
) -> DropoutFit:
    """Dropout probability of every zero count, per cell cluster, as in scImpute / cnnImpute.

    Parameters
    ----------
    x
        Raw counts (cells x genes), CSR or ndarray.
    labels
        Cluster label of every cell (any hashable values; e.g. ``cluster_cells(x).labels``).
    max_iter, tol
        EM stopping rule of scImpute (see :func:`fit_mixture`).
    invalid_fill
        Probability given to the zeros of (cluster, gene) units without a usable fit (all zero in
        the cluster, degenerate, rejected by scImpute's validity check, or in a cluster of one cell
        or with fewer than ``min_valid_genes`` valid genes). 0.0: they are not missing, as in
        scImpute and cnnImpute (which never imputes them); 1.0: every such zero is missing.
    min_valid_genes
        A cluster with fewer valid genes is skipped as a whole (scImpute: ``<= 10``).
    dtype
        Floating dtype of ``prob``.
    batch_size
        Cells per block when assembling ``prob`` (memory only).

    Returns
    -------
    :class:`DropoutFit`. Genes without any count and cells without any count are set aside:
    their probability is 0 and their status ``"empty_gene"`` (genes).
    """
    x = get_counts(x, warn_empty=False)
    x = x if sp.issparse(x) else sp.csr_matrix(x)
    n_cells, n_genes = x.shape
    clusters, codes = _labels_codes(labels, n_cells)
    k = clusters.size
    lib = _norm.library_size(x)
    codes = np.where(lib > 0, codes, -1)
    gene_empty = np.bincount(x.indices, minlength=n_genes) == 0
    vals = _scimpute_log(x, lib)

    shape = (k, n_genes)
    pars = {name: np.full(shape, np.nan) for name in _PARAM_NAMES}
    status = np.full(shape, _SMALL, dtype=np.int8)
    n_iter = np.zeros(shape, dtype=np.int64)
    with log_task(f"fitting the dropout mixture ({k} clusters x {n_genes} genes)", logger):
        # cluster x gene blocks (fit_mixture's own blocks of genes within each cluster), fitted
        # independently (screpair._parallel.map_blocks: on a Dask cluster, one task each)
        blocks = []
        for c in range(k):
            rows = np.flatnonzero(codes == c)
            if rows.size <= 1:
                continue
            unit_len, _ = _cluster_unit_len(vals, rows)
            blocks += [(c, rows, lo, hi) for lo, hi in _unit_blocks(unit_len, _EM_BLOCK)]
        for (c, _, lo, hi), fit in zip(blocks, map_blocks(_cluster_block_task, blocks, vals,
                                                          (max_iter, tol)), strict=True):
            for name in _PARAM_NAMES:
                pars[name][c, lo:hi] = getattr(fit, name)
            status[c, lo:hi] = fit.status
            n_iter[c, lo:hi] = fit.n_iter

    fitted = (status == _CONVERGED) | (status == _MAX_ITER)
    mu, sigma = pars["mu"], pars["sigma"]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lg = (
            (pars["alpha"] - 1.0) * np.log(mu + 1.0)
            - pars["beta"] * (mu + 1.0)
            + pars["alpha"] * np.log(pars["beta"])
            - gammaln(pars["alpha"])
        )
        ln = -0.5 / sigma**2 - np.log(sigma) - _LOG_SQRT_2PI  # density of N(mu, sigma) at mu + 1
        gamma_wins = (np.exp(lg) >= np.exp(ln)) & (mu <= 1.0)
        valid = fitted & (mu > np.log10(2.01)) & ~gamma_wins
    status[fitted & ~valid] = _INVALID
    few = valid.sum(axis=1) < min_valid_genes
    status[few[:, None] & valid] = _FEW_VALID
    valid &= ~few[:, None]
    status[:, gene_empty] = _EMPTY
    valid[:, gene_empty] = False

    zero_prob = dropout_weight(POINT, *(pars[n] for n in _PARAM_NAMES))
    zero_logit = _zero_logit(*(pars[n] for n in _PARAM_NAMES))
    zero_prob = np.where(valid, zero_prob, invalid_fill)
    zero_prob[:, gene_empty] = 0.0
    prob = _assemble_prob(x, codes, zero_prob, dtype=dtype, batch_size=batch_size)
    return DropoutFit(
        prob=prob,
        clusters=clusters,
        **pars,
        zero_prob=zero_prob,
        zero_logit=zero_logit,
        valid=valid,
        status=status,
        n_iter=n_iter,
        cell_cluster=codes,
        params={
            "max_iter": max_iter,
            "tol": tol,
            "invalid_fill": invalid_fill,
            "min_valid_genes": min_valid_genes,
        },
    )


def _scimpute_log(x: sp.csr_matrix, lib: np.ndarray | None = None) -> sp.csr_matrix:
    """scImpute's log-expression ``log10(CPM + 1.01)`` at the non-zero counts of ``x`` (CSR).

    The CPM scaling is :func:`screpair._norm.normalize`; only the stored (non-zero) entries are
    transformed, so the implicit zeros of the result stand for :data:`POINT`, not 0.
    """
    vals = _norm.normalize(x, _norm.CPM, lib)
    vals.data = np.log10(vals.data + PSEUDOCOUNT)
    return vals


def _zero_logit(eta, alpha, beta, mu, sigma) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        lg = np.log(eta) + (alpha - 1.0) * np.log(POINT) - beta * POINT + alpha * np.log(beta)
        lg = lg - gammaln(alpha)
        ln = np.log1p(-eta) - 0.5 * ((POINT - mu) / sigma) ** 2 - np.log(sigma) - _LOG_SQRT_2PI
    return lg - ln


#: entries per block of units in the dropout mixture's EM (fit_mixture's default block_size)
_EM_BLOCK = 131_072


def _cluster_unit_len(vals: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of every gene's unit in the cluster of the cells ``rows`` (its non-zero values,
    plus one for its zeros when it has any) and its zeros."""
    nnz = np.bincount(vals[rows].indices, minlength=vals.shape[1]).astype(np.int64)
    n0 = rows.size - nnz
    return nnz + (n0 > 0), n0


def _cluster_units(vals: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The EM's input for the cells of one cluster (``vals``): every gene's values (its zeros
    as one entry of value :data:`POINT` with their number as multiplicity), unit lengths and
    multiplicities (see :func:`fit_mixture`)."""
    n_cells, n_genes = vals.shape
    csc = vals.tocsc()
    csc.sort_indices()
    nnz = np.diff(csc.indptr)
    n0 = n_cells - nnz
    has0 = (n0 > 0).astype(np.int64)
    unit_len = nnz + has0
    starts = np.concatenate([[0], np.cumsum(unit_len)[:-1]])
    values = np.empty(int(unit_len.sum()))
    mult = np.ones_like(values)
    zpos = starts[has0 == 1]
    values[zpos] = POINT
    mult[zpos] = n0[has0 == 1]
    within = np.arange(csc.nnz) - np.repeat(csc.indptr[:-1], nnz)
    values[np.repeat(starts + has0, nnz) + within] = csc.data
    return values, unit_len, mult


def _cluster_block_task(vals: sp.csr_matrix, em: tuple, block: tuple) -> MixtureFit:
    """The EM of one cluster x gene block ``(cluster, rows, lo, hi)``: the units (genes)
    ``lo:hi`` of the cluster of the cells ``rows``, fitted as :func:`fit_mixture` fits that
    block of the whole cluster (the same :func:`_fit_block` on the same entries), so the
    blocks together give ``fit_mixture(*_cluster_units(cluster))``'s result bit for bit. A
    gene's unit depends on its own column only, so the units of the block's genes are built
    from those columns alone (not from the whole cluster, once per block)."""
    max_iter, tol = em
    _, rows, lo, hi = block
    values, unit_len, mult = _cluster_units(vals[rows][:, lo:hi])
    out = _empty_fit(hi - lo)
    _fit_block(values, mult, unit_len, out, 0, POINT, max_iter, tol)
    return out


def _assemble_prob(x: sp.csr_matrix, codes, zero_prob, *, dtype, batch_size) -> sp.csr_matrix:
    """CSR holding ``zero_prob[cluster, gene]`` at every zero of ``x`` (0 for set-aside cells)."""
    n_cells, n_genes = x.shape
    table = np.vstack([zero_prob, np.zeros((1, n_genes))]).astype(dtype)  # row -1: set aside
    indices, data, counts = [], [], []
    for start in range(0, n_cells, batch_size):
        stop = min(start + batch_size, n_cells)
        block = table[codes[start:stop]]
        sub = x[start:stop]
        block[np.repeat(np.arange(stop - start), np.diff(sub.indptr)), sub.indices] = 0
        keep = block > 0
        counts.append(keep.sum(axis=1))
        indices.append(np.nonzero(keep)[1].astype(np.int32))
        data.append(block[keep])
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), indptr), shape=(n_cells, n_genes)
    )
