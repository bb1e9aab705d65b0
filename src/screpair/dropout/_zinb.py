"""Dropout probabilities from a zero-inflated negative binomial with a logistic dropout curve.

Each observed count ``y_ij`` (cell ``i``, gene ``j``) is modelled as Splatter's Splat model and
DCA's ZINB describe it: a true count ``T_ij`` from a negative binomial, then a technical dropout
``D_ij`` that zeroes it::

    T_ij ~ NB(mean m_ij = s_i mu_kj, dispersion phi_j)      (var = m + phi m^2)
    D_ij ~ Bernoulli(pi_ij),  logit pi_ij = b0 + b1 log m_ij
    y_ij = T_ij (1 - D_ij)

where ``s_i`` is the cell's size factor (library size over the mean library size), ``k`` the cell's
cluster, ``mu_kj`` the gene's expected count in the cluster at size factor 1, ``phi_j`` a per-gene
dispersion and ``(b0, b1)`` one logistic curve on the log expected count (Splatter's
``dropout.type = "experiment"``; a negative slope ``b1`` makes lowly expressed entries drop out more
often).

The probability stored for an observed zero is the probability that it hides a positive true count::

    P(T > 0 | y = 0) = pi (1 - P0) / (pi + (1 - pi) P0),    P0 = (1 + phi m)^(-1 / phi)

so zeros of the same gene and cluster are ranked by the cell's depth: where a deep cell should have
seen the gene, its zero is more likely a dropout than the zero of a shallow cell.

Optionally (``inflation="gene"`` / ``"cluster"``) an entry also drops out by a zero inflation of its
gene (or gene and cluster), independently of the curve (noisy-OR)::

    pi_ij = 1 - (1 - expit(b0 + b1 log m_ij)) (1 - g_j)

so that excess zeros of an otherwise highly expressed gene can become likely dropouts. Measured on
Splat and real data (benchmarks/RESULTS.md, section dropout), it keeps the PR-AUC, worsens the
calibration on two of three Splat settings and does not help cnn on the masked or MCV protocols, so
the default is the curve alone (``inflation="none"``).

Fitting is by EM over all entries at once, cell block by cell block (no Python loop over genes,
never the whole cells x genes matrix dense): the E-step gives every zero its posterior
``z = P(D = 1 | y = 0) = pi / (pi + (1 - pi) P0)``; the M-step updates

- ``mu_kj = (sum_i y_ij + a mu_j) / (sum_i (1 - z_ij) s_i + a)`` over the cluster's cells (the
  zero-inflated Poisson/NB mean, shrunk towards the gene's overall mean ``mu_j`` by ``a =
  shrinkage`` pseudo-cells so that a gene absent from a cluster keeps a tiny positive mean);
- ``phi_j`` by weighted moments, ``sum w ((y - m)^2 - m) / sum w m^2`` with weights ``w = 1 - z``,
  clipped to ``[1e-4, 1e3]``;
- ``(b0, b1)`` by a weighted logistic regression of ``z`` (0 at non-zero counts) on ``log m``,
  with the entries pooled into bins of ``log m`` of width 0.05 (a 1-D covariate loses nothing
  noticeable to such binning, and the regression stays small); with a gene term the regression
  takes the curve's share ``z c / pi`` (``c = expit(b0 + b1 log m)``);
- ``g`` (with a gene term) as the expected gene-term dropouts ``sum z g / pi`` over the zeros,
  divided by the number of cells (plus ``inflation_prior`` pseudo-cells without inflation).

It stops when the log-likelihood gains less than ``tol`` (relative) or after ``max_iter`` updates
(15 by default: early-stopped, see :func:`fit_zinb_dropout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy import optimize
from scipy.special import expit, gammaln, log_expit

from .. import _norm
from .._logging import get_logger, log_task
from .._parallel import Shared, map_blocks
from .._utils import get_counts
from ._em import _labels_codes

logger = get_logger(__name__)

_PHI_MIN, _PHI_MAX = 1e-4, 1e3
_BIN_WIDTH = 0.05
_T_MIN, _T_MAX = -20.0, 15.0  # log expected count range of the curve's bins
_G_MAX = 0.99  # largest gene inflation
INFLATION = ("gene", "cluster", "none")


@dataclass
class ZINBDropoutFit:
    """Result of :func:`fit_zinb_dropout`.

    Attributes
    ----------
    prob
        ``P(true count > 0 | observed 0)`` at every zero of the counts (cells x genes CSR; values
        below ``min_prob`` are not stored). Observed non-zero counts are never missing.
    clusters
        Cluster ids, in the row order of ``mean``.
    mean
        NB mean of every gene in every cluster at size factor 1 (n_clusters x n_genes).
    dispersion
        NB dispersion of every gene (``var = m + phi m^2``; 0 for genes without counts).
    curve
        ``(b0, b1)``: the dropout probability of an entry with expected count ``m`` is
        ``expit(b0 + b1 log m)``.
    inflation
        Gene term ``g`` of the dropout probability ``pi = 1 - (1 - expit(b0 + b1 log m)) (1 - g)``:
        1 x n_genes (``inflation="gene"``), n_clusters x n_genes (``"cluster"``) or 0 x n_genes
        (``"none"``, the curve alone).
    size_factor
        Size factor of every cell (library size over the mean library size of the cells with
        counts; 0 for cells without counts, which are set aside).
    cell_cluster
        Row of ``clusters`` for every cell (-1 for cells without counts).
    n_iter
        EM updates done.
    loglik
        Log-likelihood after each update.
    """

    prob: sp.csr_matrix
    clusters: np.ndarray
    mean: np.ndarray
    dispersion: np.ndarray
    curve: tuple[float, float]
    inflation: np.ndarray
    size_factor: np.ndarray
    cell_cluster: np.ndarray
    n_iter: int
    loglik: np.ndarray
    params: dict = field(default_factory=dict)

    def missing(self, threshold: float = 0.5) -> sp.csr_matrix:
        """Boolean CSR of the entries whose dropout probability exceeds ``threshold``."""
        p = self.prob.copy()
        p.data = p.data > threshold
        p.eliminate_zeros()
        return p.astype(bool)

    @property
    def zero_prob(self) -> np.ndarray:
        """Dropout probability of a zero in a cell of size factor 1 (n_clusters x n_genes)."""
        g = self.inflation if self.inflation.shape[0] else 0.0
        return zero_dropout_prob(self.mean, self.dispersion[None, :], self.curve, g)


def nb_zero_logprob(m, phi) -> np.ndarray:
    """``log P(T = 0)`` for ``T ~ NB(mean m, dispersion phi)``: ``-log1p(phi m) / phi``."""
    m, phi = np.asarray(m, dtype=np.float64), np.asarray(phi, dtype=np.float64)
    return -np.log1p(phi * m) / phi


def zero_dropout_prob(m, phi, curve: tuple[float, float], inflation=0.0) -> np.ndarray:
    """``P(T > 0 | y = 0)`` for expected count ``m``, dispersion ``phi``, curve ``(b0, b1)`` and
    gene inflation ``g`` (dropout probability ``pi = 1 - (1 - expit(b0 + b1 log m)) (1 - g)``).

    Broadcasts over ``m``, ``phi`` and ``inflation``; 0 where ``m == 0`` (a gene that cannot be
    expressed).
    """
    m = np.asarray(m, dtype=np.float64)
    with np.errstate(divide="ignore"):
        t = np.log(m)
    lp0 = nb_zero_logprob(m, phi)
    g = np.asarray(inflation, dtype=np.float64)
    lg1 = None if not np.any(g) else np.log1p(-np.minimum(g, _G_MAX))
    p = _posterior(t, lp0, curve, lg1)[1]
    return np.where(m > 0, p, 0.0)


def _posterior(t, lp0, curve, lg1=None):
    """(z, p, c): ``P(D = 1 | y = 0)``, ``P(T > 0 | y = 0)`` and ``P(curve dropout | D = 1)``,
    the share of ``z`` the curve's logistic regression is fitted to.

    ``lg1`` is ``log(1 - g)`` of the gene inflation (``None``: no gene term, ``c = 1``).
    """
    b0, b1 = curve
    eta = b0 + b1 * np.clip(t, _T_MIN, _T_MAX)
    if lg1 is None:
        # logit z = logit pi - log P0, computed stably
        z = expit(eta - lp0)
        return z, z * -np.expm1(lp0), 1.0
    l1 = log_expit(-eta) + lg1  # log(1 - pi), noisy-OR of the curve and the gene term
    lpi = np.log(-np.expm1(l1))  # log pi (pi > 0: the curve term is positive)
    z = expit(lpi - l1 - lp0)
    c = np.exp(log_expit(eta) - lpi)
    return z, z * -np.expm1(lp0), c


def _logistic_fit(t: np.ndarray, pos: np.ndarray, tot: np.ndarray, start) -> tuple[float, float]:
    """Weighted logistic regression of a binary outcome on ``t``: ``pos`` of ``tot`` are 1."""
    keep = tot > 0
    t, pos, neg = t[keep], pos[keep], tot[keep] - pos[keep]
    scale = tot[keep].sum()

    def f(b):
        eta = b[0] + b[1] * t
        val = -(pos @ log_expit(eta) + neg @ log_expit(-eta)) / scale
        r = (pos - tot[keep] * expit(eta)) / scale
        return val, -np.array([r.sum(), r @ t])

    res = optimize.minimize(f, np.asarray(start, dtype=np.float64), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def fit_zinb_dropout(
    x,
    labels,
    *,
    max_iter: int = 15,
    tol: float = 1e-5,
    shrinkage: float = 1.0,
    min_prob: float = 1e-3,
    inflation: str = "none",
    inflation_prior: float = 0.0,
    inflation_init: float = 0.05,
    dtype: np.dtype | type = np.float32,
    block_size: int = 2**21,
) -> ZINBDropoutFit:
    """Dropout probability of every zero count from a ZINB with a logistic dropout curve.

    See :mod:`screpair.dropout._zinb` for the model and the EM.

    Parameters
    ----------
    x
        Raw counts (cells x genes), CSR or ndarray.
    labels
        Cluster label of every cell (any hashable values; e.g. ``cluster_cells(x).labels``); one
        label for all cells fits one mean per gene.
    max_iter
        EM update limit. The default, 15, was chosen by measurement on Splat simulations (the
        cnnImpute preset and dropout midpoints 0 and 2): there the probabilities after 15 updates
        are better calibrated (expected calibration error 0.01-0.06) than at full convergence
        (0.05-0.10; the Splat model drops entries by the cell's own rate, which an independent
        zero inflation cannot mimic exactly), with the same PR-AUC. On data drawn from this very
        model, full convergence (``max_iter=100``, small ``tol``) recovers the curve and is
        calibrated.
    tol
        Stop when the log-likelihood gains less than ``tol * |loglik|``.
    shrinkage
        Pseudo-cells (at size factor 1) pulling each cluster's gene mean towards the gene's mean
        over all cells.
    min_prob
        Probabilities below this are not stored (most zeros are zeros of lowly expressed genes
        with a probability near 0; storing them would hold nearly cells x genes values).
    inflation
        Gene term of the dropout probability, ``pi_ij = 1 - (1 - expit(b0 + b1 log m_ij))
        (1 - g)`` (noisy-OR: an entry drops out by the curve or by the gene's own zero inflation):
        ``"none"`` (default): no gene term, the curve alone; ``"gene"``: one ``g_j`` per gene;
        ``"cluster"``: one ``g_kj`` per gene and cluster. ``g`` is fitted in the same EM (its
        M-step: the expected gene-term dropouts over the cells). See RESULTS.md (section
        dropout) for why ``"none"`` stays the default.
    inflation_prior
        Pseudo-cells without gene-term dropout added to each ``g`` (a Beta(1, 1 + N) prior
        pulling ``g`` towards 0).
    inflation_init
        Starting value of ``g`` (the EM cannot leave ``g = 0``).
    dtype
        Floating dtype of ``prob``.
    block_size
        Approximate number of entries (cells x genes) processed at once (memory only).

    Returns
    -------
    :class:`ZINBDropoutFit`. Genes without any count and cells without any count are set aside:
    their probability is 0.

    Examples
    --------
    >>> from screpair import simulate
    >>> from screpair.dropout import fit_zinb_dropout
    >>> sim = simulate.splat(n_obs=60, n_vars=200, group_prob=(0.5, 0.5), rng=0)
    >>> fit = fit_zinb_dropout(sim.X, sim.obs["group"])
    >>> fit.mean.shape, fit.curve[1] < 0
    ((2, 200), True)
    """
    if max_iter < 1:
        msg = f"max_iter must be a positive integer, got {max_iter!r}."
        raise ValueError(msg)
    if shrinkage <= 0:
        msg = f"shrinkage must be positive, got {shrinkage!r}."
        raise ValueError(msg)
    if inflation not in INFLATION:
        msg = f"inflation must be one of {INFLATION}, got {inflation!r}."
        raise ValueError(msg)
    if inflation_prior < 0:
        msg = f"inflation_prior must be non-negative, got {inflation_prior!r}."
        raise ValueError(msg)
    if not 0.0 < inflation_init < _G_MAX:
        msg = f"inflation_init must be in (0, {_G_MAX}), got {inflation_init!r}."
        raise ValueError(msg)
    x = get_counts(x, warn_empty=False)
    x = x if sp.issparse(x) else sp.csr_matrix(x)
    x.sort_indices()
    n_cells, n_genes = x.shape
    clusters, codes = _labels_codes(labels, n_cells)
    k = clusters.size
    lib = _norm.library_size(x)
    nonempty = lib > 0
    codes = np.where(nonempty, codes, -1)
    s = np.zeros(n_cells)  # size factors over the cells with counts; 0 for the others
    s[nonempty] = _norm.size_factors(lib[nonempty])
    gene_sum = np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    gene_empty = gene_sum == 0
    onehot = sp.csr_matrix(
        (np.ones(int(nonempty.sum())), (codes[nonempty], np.flatnonzero(nonempty))),
        shape=(k, n_cells),
    )
    y_sum = np.asarray((onehot @ x).todense())  # k x genes
    s_sum = onehot @ s  # k
    mu_all = gene_sum / s.sum()
    rows_per_block = max(1, block_size // max(n_genes, 1))
    blocks = [
        (a, min(a + rows_per_block, n_cells)) for a in range(0, n_cells, rows_per_block)
    ]
    n_bins = int(round((_T_MAX - _T_MIN) / _BIN_WIDTH))

    # ---- initial values: plain cluster means, moment dispersion, a flat curve
    mu = (y_sum + shrinkage * mu_all) / (s_sum[:, None] + shrinkage)
    phi = np.full(n_genes, 0.1)
    curve = (-1.0, -0.5)
    n_cells_k = np.asarray(onehot.sum(axis=1)).ravel()  # cells with counts per cluster
    k_g = {"gene": 1, "cluster": k, "none": 0}[inflation]
    g = np.full((k_g, n_genes), inflation_init)
    logliks: list[float] = []  # one per EM update
    with log_task(f"fitting the ZINB dropout model ({k} clusters x {n_genes} genes)", logger), \
            Shared((x, codes, s, k, n_bins)) as data:  # on a Dask cluster: scattered once
        for _ in range(max_iter):
            stats = _e_step(data, mu, phi, curve, g, blocks, k, n_bins, n_genes)
            zs_sum, num, den, bin_t, bin_z, bin_n, dg_sum, ll = stats
            logliks.append(ll)
            if k_g == 1:  # Beta(1, 1 + inflation_prior) MAP of the gene term
                g = dg_sum.sum(axis=0, keepdims=True) / (n_cells_k.sum() + inflation_prior)
            elif k_g:
                g = dg_sum / (n_cells_k[:, None] + inflation_prior)
            g = np.clip(g, 0.0, _G_MAX)
            # ---- M-step
            mu = (y_sum + shrinkage * mu_all) / (s_sum[:, None] - zs_sum + shrinkage)
            with np.errstate(divide="ignore", invalid="ignore"):
                phi = np.clip(num / den, _PHI_MIN, _PHI_MAX)
            phi = np.where(np.isfinite(phi), phi, _PHI_MIN)
            with np.errstate(divide="ignore", invalid="ignore"):
                t_mid = np.where(bin_n > 0, bin_t / bin_n, 0.0)
            curve = _logistic_fit(t_mid, bin_z, bin_n, curve)
            if len(logliks) > 1 and logliks[-1] - logliks[-2] <= tol * abs(logliks[-1]):
                break
    mu[:, gene_empty] = 0.0
    phi[gene_empty] = 0.0
    g[:, gene_empty] = 0.0
    prob = _assemble(x, codes, s, mu, phi, curve, g, blocks, min_prob=min_prob, dtype=dtype)
    return ZINBDropoutFit(
        prob=prob,
        clusters=clusters,
        mean=mu,
        dispersion=phi,
        curve=curve,
        inflation=g,
        size_factor=s,
        cell_cluster=codes,
        n_iter=len(logliks),
        loglik=np.asarray(logliks),
        params={"max_iter": max_iter, "tol": tol, "shrinkage": shrinkage, "min_prob": min_prob,
                "inflation": inflation, "inflation_prior": inflation_prior,
                "inflation_init": inflation_init},
    )


def _block_means(x, codes, s, mu, phi, start, stop):
    """Dense ``y``, expected counts ``m``, ``log m`` and ``log P0`` of a block of cells."""
    sub = x[start:stop]
    y = sub.toarray()
    c = codes[start:stop]
    ok = c >= 0
    m = s[start:stop, None] * mu[np.where(ok, c, 0)]
    m[~ok] = 0.0
    with np.errstate(divide="ignore"):
        t = np.log(m)
    phi_safe = np.where(phi > 0, phi, _PHI_MIN)
    lp0 = -np.log1p(phi_safe * m) / phi_safe
    return y, m, t, lp0, ok


def _block_lg1(g, codes, start, stop):
    """``log(1 - g)`` of the gene inflation for a block of cells (``None`` without one)."""
    if g.shape[0] == 0:
        return None
    if g.shape[0] == 1:
        return np.log1p(-g)
    c = codes[start:stop]
    return np.log1p(-g[np.where(c >= 0, c, 0)])


def _e_step(data: Shared, mu, phi, curve, g, blocks, k, n_bins, n_genes):
    """The E-step's sums over all cells: each block of cells' terms (:func:`_e_step_block`,
    independent: :func:`screpair._parallel.map_blocks`, on a Dask cluster one task per block)
    added in block order, as one loop over the blocks would add them."""
    zs_sum = np.zeros((k, n_genes))
    num = np.zeros(n_genes)
    den = np.zeros(n_genes)
    bin_t = np.zeros(n_bins)
    bin_z = np.zeros(n_bins)
    bin_n = np.zeros(n_bins)
    dg_sum = np.zeros((k, n_genes))
    ll = 0.0
    for part in map_blocks(_e_step_block, blocks, data, (mu, phi, curve, g)):
        zs_sum += part["zs_sum"]
        if part["dg_sum"] is not None:
            dg_sum += part["dg_sum"]
        num += part["num"]
        den += part["den"]
        bin_t += part["bin_t"]
        bin_z += part["bin_z"]
        bin_n += part["bin_n"]
        ll += part["ll_zero"]
        ll += part["ll_nonzero"]
    return zs_sum, num, den, bin_t, bin_z, bin_n, dg_sum, ll


def _e_step_block(data: tuple, params: tuple, block: tuple[int, int]) -> dict:
    """The E-step's terms of the cells ``start:stop`` (reads its arguments only): what this
    block adds to each of :func:`_e_step`'s sums."""
    x, codes, s, k, n_bins = data
    mu, phi, curve, g = params
    start, stop = block
    b0, b1 = curve
    phi_safe = np.where(phi > 0, phi, _PHI_MIN)
    r = 1.0 / phi_safe
    part: dict = {"dg_sum": None}
    y, m, t, lp0, ok = _block_means(x, codes, s, mu, phi, start, stop)
    live = ok[:, None] & (m > 0)
    zero = (y == 0) & live
    lg1 = _block_lg1(g, codes, start, stop)
    z, _, cshare = _posterior(t, lp0, curve, lg1)
    z = np.where(zero, z, 0.0)
    c = codes[start:stop]
    # per (cluster, gene): sum of z s over the zeros
    ind = sp.csr_matrix(
        (s[start:stop][ok], (c[ok], np.flatnonzero(ok))), shape=(k, stop - start)
    )
    part["zs_sum"] = ind @ z
    if lg1 is not None:
        # E[gene-term dropout | y = 0] = z g / pi; the curve is fitted to z c / pi
        eta = curve[0] + curve[1] * np.clip(t, _T_MIN, _T_MAX)
        gg = -np.expm1(lg1)
        pi = -np.expm1(log_expit(-eta) + lg1)
        one = sp.csr_matrix(
            (np.ones(int(ok.sum())), (c[ok], np.flatnonzero(ok))), shape=(k, stop - start)
        )
        part["dg_sum"] = one @ np.where(zero, z * gg / pi, 0.0)
        zc = z * cshare
    else:
        zc = z
    w = 1.0 - z
    part["num"] = np.sum(w * ((y - m) ** 2 - m), axis=0, where=live)
    part["den"] = np.sum(w * m * m, axis=0, where=live)
    tl = t[live]
    idx = np.clip(((tl - _T_MIN) / _BIN_WIDTH).astype(np.int64), 0, n_bins - 1)
    part["bin_t"] = np.bincount(idx, weights=tl, minlength=n_bins)
    part["bin_z"] = np.bincount(idx, weights=zc[live], minlength=n_bins)
    part["bin_n"] = np.bincount(idx, minlength=n_bins)
    # log-likelihood: zeros log(pi + (1 - pi) P0), non-zeros log(1 - pi) + NB log-pmf
    eta = b0 + b1 * np.clip(t, _T_MIN, _T_MAX)
    l1 = log_expit(-eta) + (0.0 if lg1 is None else lg1)  # log(1 - pi)
    lz = np.logaddexp(np.log(-np.expm1(l1)), l1 + lp0)
    part["ll_zero"] = float(lz[zero].sum())
    nz = (y > 0) & live
    yy, mm = y[nz], m[nz]
    rr = np.broadcast_to(r, y.shape)[nz]
    lnb = (
        gammaln(yy + rr) - gammaln(rr) - gammaln(yy + 1.0)
        + rr * np.log(rr / (rr + mm)) + yy * np.log(mm / (rr + mm))
    )
    part["ll_nonzero"] = float(np.sum(l1[nz] + lnb))
    return part


def _assemble(x, codes, s, mu, phi, curve, g, blocks, *, min_prob, dtype) -> sp.csr_matrix:
    """CSR of ``P(T > 0 | y = 0)`` at the zeros of ``x`` (values below ``min_prob`` dropped)."""
    indices, data, counts = [], [], []
    for start, stop in blocks:
        y, m, t, lp0, ok = _block_means(x, codes, s, mu, phi, start, stop)
        _, p, _ = _posterior(t, lp0, curve, _block_lg1(g, codes, start, stop))
        keep = (y == 0) & (m > 0) & ok[:, None] & (p >= min_prob) & (p > 0)
        counts.append(keep.sum(axis=1))
        indices.append(np.nonzero(keep)[1].astype(np.int32))
        data.append(p[keep].astype(dtype))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), indptr), shape=x.shape
    )

