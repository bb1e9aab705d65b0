"""SAVER: Poisson-gamma empirical Bayes expression recovery (Huang et al., Nat Methods 2018).

Model, for cell ``c`` and gene ``g`` with normalized size factor ``s_c`` (library size over its mean)::

    Y_gc ~ Poisson(s_c * lambda_gc),   lambda_gc ~ Gamma(alpha_gc, beta_gc),   alpha = beta * mu

The prior mean ``mu_gc`` is predicted from the other genes (cross-validated Poisson LASSO, see
:mod:`._lasso`); genes that are not predicted get their mean normalized expression. The prior
variance takes one of SAVER's three forms, chosen per gene by the marginal negative-binomial
likelihood (``calc.a``, ``calc.b``, ``calc.k`` in the R package):

==============  ======================  =====================  ====================
form            prior variance          alpha                  beta
==============  ======================  =====================  ====================
``"cv"``        ``a * mu**2``           ``1 / a``              ``1 / (a * mu)``
``"fano"``      ``b * mu``              ``mu / b``             ``1 / b``
``"variance"``  ``k``                   ``mu**2 / k``          ``mu / k``
==============  ======================  =====================  ====================

The posterior is ``lambda | Y ~ Gamma(Y + alpha, s + beta)``. Its mean is the weighted average
``s/(s+beta) * Y/s + beta/(s+beta) * mu``: cells with small ``s`` (few reads) lean on the prior.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from scipy.interpolate import CubicSpline
from scipy.special import gammaln
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..._logging import get_logger, log_task
from ..._norm import library_size, size_factors
from ..._parallel import Shared, map_blocks
from ..._utils import RNGLike, as_rng, check_sample_size
from .._base import BaseImputer, DataContext, Posterior, draw_sample, sample_rows, take_rows
from . import _lasso

logger = get_logger(__name__)

VAR_MODELS: tuple[str, ...] = ("cv", "fano", "variance")
_LOWER = 1e-5  # SAVER's lower end of the prior-parameter search (``calc.loglik.*(1e-05, ...)``)
_N_CUTOFF_GENES = 100  # genes fitted with cutoff 0 to learn the max-correlation cutoff (SAVER's n2)
_N_CV_GENES = 200  # further cross-validated genes from which fast mode learns lambda.min
_PPOINTS = (np.arange(1, 101) - 0.5) / 100  # R's ppoints(100)
_GRID = np.exp((np.exp(_PPOINTS) - 1) / 2) - 1  # SAVER's sampling grid on (0, max]


# --------------------------------------------------------------------------- closed-form pieces
def prior_shape_rate(model: str, param, mu) -> tuple[np.ndarray, np.ndarray]:
    """Gamma prior ``(alpha, beta)`` for a variance form, its parameter and the prior mean ``mu``.

    Parameters
    ----------
    model
        ``"cv"`` (prior variance ``a mu^2``), ``"fano"`` (``b mu``) or ``"variance"`` (``k``).
    param
        ``a``, ``b`` or ``k``, broadcastable against ``mu``.
    mu
        Prior mean on the normalized scale.
    """
    param = np.asarray(param, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if model == "cv":
        return np.broadcast_to(1.0 / param, np.broadcast(param, mu).shape), 1.0 / (param * mu)
    if model == "fano":
        return mu / param, np.broadcast_to(1.0 / param, np.broadcast(param, mu).shape)
    if model == "variance":
        return mu * mu / param, mu / param
    msg = f"unknown variance model {model!r}; expected one of {VAR_MODELS}."
    raise ValueError(msg)


def gamma_posterior(counts, size_factor, alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and variance on the **count scale**.

    ``lambda | Y ~ Gamma(Y + alpha, s + beta)`` on the normalized scale; the count-scale value
    ``s * lambda`` has mean ``s (Y + alpha) / (s + beta)`` and variance
    ``s^2 (Y + alpha) / (s + beta)^2``.

    Parameters
    ----------
    counts
        Observed counts ``Y`` (cells x genes).
    size_factor
        ``s`` per cell, shape ``(n_cells,)``.
    alpha, beta
        Prior shape and rate, broadcastable to ``counts``.
    """
    y = np.asarray(counts, dtype=np.float64)
    s = np.asarray(size_factor, dtype=np.float64).reshape(-1, 1)
    shape = y + alpha
    rate = s + beta
    return s * shape / rate, s * s * shape / (rate * rate)


# --------------------------------------------------------------------------- variance model fit
class _SumLog1p:
    """``F(b) = sum_c log1p(b * s_c)`` for many ``b`` at once (cubic spline in log-log, rel. err ~1e-11)."""

    #: cells summed at once (a ``3000 x _CHUNK`` block, 25 MB); more cells add block sums
    _CHUNK = 1024

    def __init__(self, sf: np.ndarray):
        self.sf = sf
        self.lo, self.hi = np.log(1e-10), np.log(1e10)
        t = np.linspace(self.lo, self.hi, 3000)
        e = np.exp(t)[:, None]
        vals = np.zeros(t.size)
        for start in range(0, sf.size, self._CHUNK):
            block = e * sf[None, start : start + self._CHUNK]
            vals += np.log1p(block, out=block).sum(1)
            del block  # before the next block is made
        self.spline = CubicSpline(t, np.log(vals))

    def __call__(self, b: np.ndarray) -> np.ndarray:
        b = np.asarray(b, dtype=np.float64)
        t = np.log(b)
        out = np.exp(self.spline(np.clip(t, self.lo, self.hi)))
        outside = (t < self.lo) | (t > self.hi)
        if np.any(outside):
            out[outside] = [np.log1p(v * self.sf).sum() for v in b[outside]]
        return out


class _Marginal:
    """Shifted negative marginal (negative-binomial) log-likelihood of a batch of genes.

    Equal to SAVER's ``calc.loglik.a/b/k`` (which drop ``sum(y log s - lgamma(y+1))``, the same for
    the three forms)::

        -sum_c [lgamma(y + alpha) - lgamma(alpha) + alpha log(beta) - (y + alpha) log(s + beta)]

    computed as a sum over the non-zero counts plus ``sum_c alpha log1p(s / beta)``.
    """

    def __init__(self, counts: sp.csr_matrix, mu: np.ndarray, sf: np.ndarray, f_sum: _SumLog1p):
        self.counts = counts  # (B, n) csr, genes in rows
        self.mu = mu  # (B, n), or (B, 1) for a constant prior mean
        self.sf = sf
        self.f_sum = f_sum
        coo = counts.tocoo()
        self.row, self.col, self.val = coo.row, coo.col, coo.data
        self.mu_nz = mu[self.row, self.col if mu.shape[1] > 1 else 0]

    def subset(self, idx: np.ndarray) -> _Marginal:
        return _Marginal(self.counts[idx], self.mu[idx], self.sf, self.f_sum)

    def __call__(self, model: str, param: np.ndarray) -> np.ndarray:
        p = np.asarray(param, dtype=np.float64)
        n_genes = self.counts.shape[0]
        pr = p[self.row]
        alpha_nz, beta_nz = prior_shape_rate(model, pr, self.mu_nz)
        nz = (
            gammaln(self.val + alpha_nz)
            - gammaln(alpha_nz)
            - self.val * np.log(self.sf[self.col] + beta_nz)
        )
        ll = np.bincount(self.row, weights=nz, minlength=n_genes)
        # sum_c alpha log1p(s / beta) over all cells
        if self.mu.shape[1] == 1 and model == "fano":
            dense = self.mu[:, 0] / p * self.f_sum(p)
        else:
            pc = p[:, None]
            mu = self.mu
            if model == "cv":
                dense = np.log1p(pc * mu * self.sf).sum(1) / p
            elif model == "fano":
                dense = (mu / pc * np.log1p(pc * self.sf)).sum(1)
            else:
                dense = (mu * mu / pc * np.log1p(pc * self.sf / mu)).sum(1)
        return -(ll - dense)


def _golden_log(fun, lo: np.ndarray, hi: np.ndarray, n_iter: int = 40) -> np.ndarray:
    """Vectorised golden-section minimisation of ``fun`` on ``[lo, hi]`` (log scale)."""
    a, b = np.log(lo), np.log(hi)
    invphi = (np.sqrt(5.0) - 1.0) / 2.0
    c = b - invphi * (b - a)
    d = a + invphi * (b - a)
    fc, fd = fun(np.exp(c)), fun(np.exp(d))
    for _ in range(n_iter):
        left = fc < fd
        b = np.where(left, d, b)
        a = np.where(left, a, c)
        new_c = np.where(left, b - invphi * (b - a), d)
        new_d = np.where(left, c, a + invphi * (b - a))
        x_new = np.where(left, new_c, new_d)
        f_new = fun(np.exp(x_new))
        fc, fd = np.where(left, f_new, fd), np.where(left, fc, f_new)
        c, d = new_c, new_d
    return np.exp(0.5 * (a + b))


def _bisect_log(fun, lo: np.ndarray, hi: np.ndarray, n_iter: int = 40) -> np.ndarray:
    """Root of ``fun`` with ``fun(lo) < 0 < fun(hi)`` (vectorised bisection on the log scale)."""
    a, b = np.log(lo), np.log(hi)
    for _ in range(n_iter):
        mid = 0.5 * (a + b)
        neg = fun(np.exp(mid)) < 0
        a = np.where(neg, mid, a)
        b = np.where(neg, b, mid)
    return np.exp(0.5 * (a + b))


def _fit_one_form(marg: _Marginal, model: str, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAVER's ``calc.a`` / ``calc.b`` / ``calc.k`` for a batch of genes.

    Maximizes the marginal likelihood over ``(0, upper]``; when the maximum is less than 0.5
    log-likelihood units above the value at ``1e-5`` (a flat likelihood, typical of sparse genes),
    the parameter is instead the likelihood-weighted mean over SAVER's grid on ``(0, max]``, where
    ``max`` is where the log-likelihood drops 10 below its maximum (or ``upper``). SAVER draws
    10,000 samples from these weights; the exact weighted mean is used here.

    Returns the parameter (``a``, ``b`` or ``k``) and the negative log-likelihood, per gene.
    """
    lower = np.minimum(_LOWER, upper * 1e-3)
    fun = lambda p: marg(model, p)  # noqa: E731
    param = _golden_log(fun, lower, upper)
    nll = fun(param)
    nll_low = fun(lower)
    flat = (nll_low - nll) < 0.5
    if np.any(flat):
        idx = np.flatnonzero(flat)
        sub = marg.subset(idx)
        sfun = lambda p: sub(model, p)  # noqa: E731
        up, lo, nll_f = upper[idx], lower[idx], nll[idx]
        pmax = up.copy()
        far = (fun(upper)[idx] - nll_f) > 10
        if np.any(far):
            j = np.flatnonzero(far)
            sub2 = sub.subset(j)
            pmax[j] = _bisect_log(lambda p: sub2(model, p) - nll_f[j] - 10, lo[j], up[j])
        grid = _GRID[None, :] * pmax[:, None]  # (F, 100)
        ll = np.stack([-sfun(grid[:, i]) for i in range(grid.shape[1])], axis=1)
        w = np.exp(ll - ll.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        param[idx] = (w * grid).sum(1)
        nll[idx] = sfun(param[idx])
    return param, nll


def fit_variance_model(
    counts: sp.csr_matrix,
    mu: np.ndarray,
    sf: np.ndarray,
    f_sum: _SumLog1p | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Choose and fit the prior variance form per gene (SAVER's ``calc.post``).

    Parameters
    ----------
    counts
        ``(B, n)`` observed counts, genes in rows (CSR).
    mu
        ``(B, n)`` prior means on the normalized scale, or ``(B, 1)`` for constant ones.
    sf
        ``(n,)`` size factors.

    Returns
    -------
    model
        ``(B,)`` index into :data:`VAR_MODELS`.
    param
        ``(B,)`` fitted ``a``, ``b`` or ``k``.
    nll
        ``(B, 3)`` negative log-likelihood of each form (``inf`` where not fitted).

    Notes
    -----
    Genes with a constant prior mean use the constant-Fano form only (the three forms coincide),
    as SAVER does. Upper ends of the searches are SAVER's: ``var(y/s) / mean(y/s)^2`` (cv),
    ``var / mean`` (fano) and ``var`` (variance), with ``var`` the n-1 sample variance.
    """
    f_sum = f_sum or _SumLog1p(sf)
    n_genes, n = counts.shape
    counts = sp.csr_matrix(counts, dtype=np.float64)
    ynorm = counts @ sp.diags(1.0 / sf)
    m1 = np.asarray(ynorm.sum(1)).ravel() / n
    m2 = np.asarray(ynorm.multiply(ynorm).sum(1)).ravel() / n
    var = np.maximum((m2 - m1 * m1) * n / max(n - 1, 1), 0.0)
    m1 = np.maximum(m1, 1e-300)
    uppers = {
        "cv": var / (m1 * m1),
        "fano": var / m1,
        "variance": var,
    }
    for key in uppers:
        uppers[key] = np.maximum(uppers[key], 2 * _LOWER)
    nll = np.full((n_genes, 3), np.inf)
    params = np.zeros((n_genes, 3))
    if mu.shape[1] == 1:
        const = np.ones(n_genes, dtype=bool)
    else:
        const = np.ptp(mu, axis=1) == 0
    marg = _Marginal(counts, mu, sf, f_sum)
    idx_c, idx_v = np.flatnonzero(const), np.flatnonzero(~const)
    if idx_c.size:
        sub = marg if idx_c.size == n_genes else marg.subset(idx_c)
        p, v = _fit_one_form(sub, "fano", uppers["fano"][idx_c])
        params[idx_c, 1], nll[idx_c, 1] = p, v
    if idx_v.size:
        sub = marg if idx_v.size == n_genes else marg.subset(idx_v)
        for mi, model in enumerate(VAR_MODELS):
            p, v = _fit_one_form(sub, model, uppers[model][idx_v])
            params[idx_v, mi], nll[idx_v, mi] = p, v
    nll = np.where(np.isfinite(nll), nll, np.inf)
    model = np.argmin(nll, axis=1)
    return model, params[np.arange(n_genes), model], nll


# --------------------------------------------------------------------------- the estimator
class SaverImputer(BaseImputer):
    """SAVER: recover expression with a Poisson-gamma model whose prior is learned from other genes.

    For each gene the prior mean is predicted from the other genes by a cross-validated Poisson
    LASSO, the prior variance form (constant CV, constant Fano factor or constant variance) is
    chosen by marginal likelihood, and every entry gets its Gamma posterior. Follows the R package
    ``SAVER`` (``saver``, ``expr.predict``, ``calc.a/b/k``, ``calc.post``) with batched, vectorised
    solvers instead of one ``glmnet`` call per gene.

    Parameters
    ----------
    pred_genes
        Genes (names, or integer positions) whose prior mean is predicted by regression
        (SAVER's ``pred.genes``); the others use their mean normalized expression. Default: all.
    n_components
        Number of principal components of the predictor genes used as the LASSO design (see Notes).
    n_folds
        Cross-validation folds for choosing the LASSO penalty (``cv.glmnet``'s ``nfolds=5``).
    n_lambdas, lambda_min_ratio
        The penalty path per gene: ``n_lambdas`` log-spaced values from ``lambda_max`` down to
        ``lambda_min_ratio * lambda_max``.
    maxcor_cutoff
        Genes whose maximum absolute correlation with a predictor gene is at most this value use the
        gene-mean prior (no regression). ``"auto"`` learns it as SAVER's fast mode does: a random
        100 predictable genes are fitted, ``sqrt(sd.cv)`` is regressed on the max correlation,
        and the cutoff is where the line reaches 0.5. ``0`` predicts every gene.
    fast
        SAVER's ``do.fast``: cross-validate the penalty on a random 300 genes only (the 100 used
        for the cutoff and 200 more), fit ``log(lambda_max / lambda_min)^2`` as a linear function of
        the max correlation, and give every other gene one warm-started path down to its predicted
        ``lambda_min`` (about 6x less work). Genes whose predicted ratio is 0 (max correlation below
        ``-c0 / c1``) use the mean prior, as in SAVER. ``False`` cross-validates every gene.
    batch_size
        Genes per vectorised batch (memory grows as ``batch_size * n_cells``).
    n_fit_cells
        The prior (predictor genes' centring and PCA, the LASSO regressions, the cutoffs and
        the variance forms) is learned from a random sample of this many cells when there are
        more (SAVER's ``pred.cells``), so the fit's memory and time stop growing with the data;
        every cell still gets its posterior, from its own predictors. ``None``: all cells.
        Above it the size factors and ``gene_mean_`` are those of all cells (a streaming pass
        in :func:`screpair.impute_file`, which reads only the sample's rows for the fit; the
        same numbers in memory), and the mean-prior genes' variance forms come from the
        sample too (before issue 16 they were fitted on all cells, so outputs above
        ``n_fit_cells`` changed slightly; at or below it nothing changed); a gene with counts
        in other cells but none in the sample gets the Fano form with factor 1 (prior
        variance = its mean).
        Measured cost (``benchmarks/bench_methods_scale.py --accuracy``, rng 0): learning the
        prior from 1,000 of pbmc3k's 2,700 cells instead of all changes the output by an MSE
        of 2.5e-3 on log1p(CP10k) (1.2 % of its variance; r 0.994) and the masked-protocol
        RMSE from 1.3582 to 1.3680 (+0.7 %).
    n_jobs
        BLAS threads to use (``None`` or ``-1``: leave the library default). The work is dense
        matrix algebra over gene batches, so threads are BLAS threads. The default, 1, is the
        fastest on a shared machine (on the 2-core CI box under load, 2 threads made the
        regression ~5x slower through oversubscription); raise it on an idle multi-core machine.
    progress
        Show a progress bar over gene batches.
    rng
        Seed or Generator for the randomized SVD, the cross-validation folds and the sample of
        genes used to learn the cutoff.

    Attributes
    ----------
    size_factors_
        ``(n_cells,)`` library size over the mean library size.
    gene_mean_
        ``(n_genes,)`` mean normalized expression (the fallback prior mean).
    predicted_
        ``(n_genes,)`` whether the prior mean comes from the regression.
    maxcor_
        ``(n_genes,)`` maximum absolute correlation with another predictor gene (0 if not computed).
    maxcor_cutoff_
        The cutoff used.
    intercept_, coef_
        LASSO coefficients on the standardized components (``coef_`` is ``(n_genes, k)``).
    lambda_max_, lambda_min_, sd_cv_
        Per predicted gene: null-model penalty, chosen penalty and SAVER's ``sd.cv`` (NaN otherwise,
        and for genes whose penalty was estimated in fast mode).
    lambda_coefs_
        ``(c0, c1)`` of the fast-mode fit ``log(lambda_max / lambda_min)^2 = c0 + c1 * maxcor``,
        or ``None`` when every predicted gene was cross-validated.
    var_model_
        ``(n_genes,)`` chosen prior variance form: ``"cv"``, ``"fano"`` or ``"variance"``
        (``"none"`` for genes without counts, whose posterior is 0).
    var_param_
        ``(n_genes,)`` its parameter: ``a`` (prior variance ``a mu^2``), ``b`` (``b mu``) or ``k``.
    neg_loglik_
        ``(n_genes, 3)`` negative marginal log-likelihood of the three forms (``inf`` if not fitted).
    fit_cells_
        The sorted rows of the cells the prior was learned from, or ``None`` (all cells).
    scores_
        Unit-variance component scores of the fitted (sampled) cells.

    Notes
    -----
    *Design.* SAVER regresses each gene on all other genes with mean normalized expression >= 0.1,
    log-normalized as ``log((x + 1) / s)``. Here those predictors are standardized and reduced to
    their ``n_components`` leading principal components (each scaled to unit variance); the target
    gene's own contribution to the components is removed exactly (a rank-one correction), so a
    gene never predicts itself. A shared design lets thousands of genes be fitted per matrix
    product; most of the predictive signal in scRNA-seq lives in the leading components, and the
    LASSO still selects among them per gene.

    *Differences from the R package.* One set of CV folds is shared by all genes (R draws folds per
    gene); the penalty path has ``n_lambdas`` values instead of glmnet's 100; the flat-likelihood
    fallback uses the exact weighted mean instead of 10,000 draws; estimates are not rounded.

    *Transductive.* ``posterior``/``transform`` need the same cells that were given to ``fit``.
    The outputs are on the count scale: the posterior mean ``s_c * E[lambda]`` and variance
    ``s_c^2 * Var[lambda]``. :func:`saver_sample` draws from the posterior.
    """

    name = "saver"
    transductive = True
    has_var = True
    _fit_checks: ClassVar[dict[str, Any]] = {"warn_empty": False}  # empty cells: fit refuses

    def __init__(
        self,
        *,
        pred_genes: Sequence[str] | Sequence[int] | None = None,
        n_components: int = 30,
        n_folds: int = 5,
        n_lambdas: int = 20,
        lambda_min_ratio: float = 1e-3,
        maxcor_cutoff: float | Literal["auto"] = "auto",
        fast: bool = True,
        batch_size: int = 512,
        n_fit_cells: int | None = 10_000,
        n_jobs: int | None = 1,
        progress: bool = True,
        rng: RNGLike = None,
    ):
        self.pred_genes = pred_genes
        self.n_components = n_components
        self.n_folds = n_folds
        self.n_lambdas = n_lambdas
        self.lambda_min_ratio = lambda_min_ratio
        self.maxcor_cutoff = maxcor_cutoff
        self.fast = fast
        self.batch_size = batch_size
        self.n_fit_cells = n_fit_cells
        self.n_jobs = n_jobs
        self.progress = progress
        self.rng = rng

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        checks = [
            (int(self.n_components) >= 1, f"n_components must be >= 1, got {self.n_components}."),
            (int(self.n_folds) >= 2, f"n_folds must be >= 2, got {self.n_folds}."),
            (int(self.n_lambdas) >= 1, f"n_lambdas must be >= 1, got {self.n_lambdas}."),
            (
                0 < float(self.lambda_min_ratio) < 1,
                f"lambda_min_ratio must be in (0, 1), got {self.lambda_min_ratio}.",
            ),
            (int(self.batch_size) >= 1, f"batch_size must be >= 1, got {self.batch_size}."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        check_sample_size("n_fit_cells", self.n_fit_cells)
        if not (self.maxcor_cutoff == "auto" or isinstance(self.maxcor_cutoff, (int, float))):
            msg = f"maxcor_cutoff must be 'auto' or a number, got {self.maxcor_cutoff!r}."
            raise ValueError(msg)

    def _threads(self) -> int | None:
        """BLAS thread limit from ``n_jobs`` (``None`` or negative: library default)."""
        if self.n_jobs is None or int(self.n_jobs) < 0:
            return None
        return max(int(self.n_jobs), 1)

    def _pred_mask(self, names) -> np.ndarray:
        n_genes = len(names)
        if self.pred_genes is None:
            return np.ones(n_genes, dtype=bool)
        genes = list(self.pred_genes)
        mask = np.zeros(n_genes, dtype=bool)
        if all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in genes):
            idx = np.asarray(genes, dtype=int)
            if idx.size and (idx.min() < -n_genes or idx.max() >= n_genes):
                msg = f"pred_genes positions must be in [0, {n_genes}), got {genes[:5]}."
                raise ValueError(msg)
            mask[idx] = True
            return mask
        pos = names.get_indexer([str(g) for g in genes])
        if np.any(pos < 0):
            missing = [g for g, p in zip(genes, pos, strict=True) if p < 0]
            msg = f"{len(missing)} pred_genes not found in var_names (e.g. {missing[:3]})."
            raise ValueError(msg)
        mask[pos] = True
        return mask

    def _predictors(self, x, sf) -> tuple[np.ndarray, np.ndarray]:
        """Standardized log-normalized predictor genes (dense, cells x predictors) and their columns."""
        idx = self.predictor_index_
        block = x[:, idx]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        logx = np.log1p(block.astype(np.float64)) - np.log(sf)[:, None]
        return (logx - self.predictor_center_) / self.predictor_scale_

    def _design(self, genes: np.ndarray, s: np.ndarray,
                scores: np.ndarray | None = None) -> _lasso.Design:
        """The LASSO design of ``genes`` for the cells whose standardized predictors are ``s``
        and component scores ``scores`` (default: the fitted cells' ``scores_``)."""
        scores = self.scores_ if scores is None else scores
        pos = self._predictor_pos[genes]
        is_pred = pos >= 0
        loo_v = np.zeros((genes.size, self.scores_.shape[1]))
        loo_v[is_pred] = self.loadings_[pos[is_pred]]
        loo_x = None
        if np.any(is_pred):
            loo_x = np.zeros((genes.size, s.shape[0]))
            loo_x[is_pred] = s[:, pos[is_pred]].T
        return _lasso.Design(scores, loo_x, loo_v)

    def _prior_mean(self, genes: np.ndarray, s: np.ndarray,
                    scores: np.ndarray | None = None) -> np.ndarray:
        """``(B, n)`` prior means of predicted genes from the stored coefficients, for the cells
        whose standardized predictors are ``s`` and scores ``scores`` (default ``scores_``)."""
        theta = np.column_stack([self.intercept_[genes], self.coef_[genes]])
        eta = _lasso.linear_predictor(theta, self._design(genes, s, scores))
        return np.exp(np.minimum(eta, 50.0))

    @staticmethod
    def _rows(xc, genes: np.ndarray) -> sp.csr_matrix:
        """Counts of ``genes`` as a genes x cells CSR block."""
        block = xc[:, genes]
        return sp.csr_matrix(block.T) if sp.issparse(block) else sp.csr_matrix(np.asarray(block).T)

    # ------------------------------------------------------------------ fit
    def _fit_rows(self, n: int) -> np.ndarray | None:
        """The ``n_fit_cells`` sample of ``n`` cells (drawn first from ``rng``), or ``None``."""
        return sample_rows(self.rng, n, self.n_fit_cells)

    def _fit(self, x, ctx: DataContext) -> None:
        """Fit the per-gene prior (regression and variance form) on validated counts ``x``
        (cells x genes: every cell, or the ``n_fit_cells`` sample ``ctx.sample`` with all
        cells' ``ctx.totals``); every cell needs at least one count (:func:`screpair.impute`
        sets cells without counts aside)."""
        lib = library_size(x) if ctx.sample is None else ctx.totals.library_size
        if np.any(lib == 0):
            msg = (
                f"{int((lib == 0).sum())} cell(s) have no counts; SAVER needs positive library "
                "sizes. Filter them out or use `screpair.impute`, which sets them aside."
            )
            raise ValueError(msg)
        rng = as_rng(self.rng)
        with threadpool_limits(limits=self._threads()), log_task("fitting SAVER", logger):
            self._fit_prior(x, ctx, lib, rng)

    def _fit_prior(self, x, ctx: DataContext, lib, rng: np.random.Generator) -> None:
        """Fit the prior of every gene on validated counts ``x`` (every cell with counts, or
        the sample ``ctx.sample``); ``lib``: the library sizes of all cells.

        Steps: normalized gene moments; the predictor genes and their standardized log values;
        for the genes that can be regressed, a PCA of the predictors, each gene's maximum
        correlation with them, the genes worth a Poisson LASSO (the learned cutoffs) and their
        LASSO fits; then a constant (gene-mean) prior for every gene not predicted. Random draws
        happen in this order: the sample of cells, the PCA seed, the CV folds, the gene order.

        With a sample, the size factors (``lib`` over its mean) and the gene means
        (``gene_mean_``) are those of all cells (from ``ctx.totals``: a streaming pass in
        :func:`screpair.impute_file`); everything else, the mean-prior genes' variance forms
        included, is learned from the sample's rows.
        """
        n_all, n_genes = ctx.n_obs, x.shape[1]
        sf = size_factors(lib)
        self.size_factors_ = sf
        self.fit_cells_ = draw_sample(rng, n_all, self.n_fit_cells, ctx)
        if self.fit_cells_ is None:
            gene_mean, gene_var = self._gene_moments(x, 1.0 / sf)
        else:  # SAVER's pred.cells: the prior is learned from a random sample of cells
            logger.info("SAVER: fitting the prior on %d of %d cells", self.fit_cells_.size, n_all)
            # the mean of x / s over all cells: sum(x / L) * mean(L) / n
            gene_mean = ctx.totals.norm_sum * (lib.mean() / n_all)
            if ctx.sample is None:  # a direct _fit call on every cell: take the sample's rows
                x = take_rows(x, self.fit_cells_)
            sf = sf[self.fit_cells_]
            _, gene_var = self._gene_moments(x, 1.0 / sf)
        self.gene_mean_ = gene_mean
        n = x.shape[0]
        xc = x.tocsc() if sp.issparse(x) else x
        inv = 1.0 / sf
        regressable = self._pred_mask(ctx.var_names) & (gene_var > 0)
        logx = self._fit_predictors(xc, gene_mean, sf)
        k = min(int(self.n_components), self.predictor_index_.size - 1, n - 2)
        self._init_fitted(n_genes, k, gene_mean)
        f_sum = _SumLog1p(sf)

        if k >= 1 and np.any(regressable):
            s = (logx - self.predictor_center_) / self.predictor_scale_
            self._fit_components(s, k, rng)
            reg_idx = np.flatnonzero(regressable)
            # the fit cells' counts and predictors, read by the gene batches of the two block
            # maps below (on a Dask cluster: scattered once for both)
            with Shared(xc) as xc_shared, Shared(s) as s_shared:
                self._fit_max_correlation(xc, s, inv, reg_idx, shared=(xc_shared, s_shared))
                folds = rng.permutation(np.arange(n) % int(self.n_folds))
                order = rng.permutation(reg_idx)
                rest = self._regression_genes(order, xc, s, sf, folds, f_sum)
                self._fit_regressions(rest, xc, s, sf, folds, f_sum,
                                      shared=(xc_shared, s_shared))
        else:
            self.scores_ = np.zeros((n, 0))
            self.loadings_ = np.zeros((self.predictor_index_.size, 0))
        self._fit_mean_priors(xc, gene_mean, sf, f_sum)

    @staticmethod
    def _gene_moments(x, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of each gene's size-factor-normalized counts ``x / s``."""
        n = x.shape[0]
        gene_mean = np.asarray(x.T @ inv).ravel() / n
        sq = x.multiply(x) if sp.issparse(x) else x * x
        gene_sq = np.asarray(sq.T @ (inv * inv)).ravel() / n
        return gene_mean, np.maximum(gene_sq - gene_mean**2, 0.0)

    def _fit_predictors(self, xc, gene_mean: np.ndarray, sf: np.ndarray) -> np.ndarray:
        """Choose the predictor genes (mean normalized expression >= 0.1, SAVER's "good genes",
        and not constant) and store their log centre and scale; returns their
        ``log1p(x) - log(s)`` values (dense, cells x predictors)."""
        pred_idx = np.flatnonzero(gene_mean >= 0.1)
        block = xc[:, pred_idx]
        block = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=np.float64)
        logx = np.log1p(block) - np.log(sf)[:, None]
        center, scale = logx.mean(0), logx.std(0)
        keep = scale > 0
        pred_idx, center, scale = pred_idx[keep], center[keep], scale[keep]
        self.predictor_index_ = pred_idx
        self.predictor_center_, self.predictor_scale_ = center, scale
        self._predictor_pos = np.full(gene_mean.size, -1)
        self._predictor_pos[pred_idx] = np.arange(pred_idx.size)
        return logx[:, keep]

    def _init_fitted(self, n_genes: int, k: int, gene_mean: np.ndarray) -> None:
        """Per-gene fitted attributes before any gene is fitted (the mean prior everywhere)."""
        self.maxcor_ = np.zeros(n_genes)
        self.predicted_ = np.zeros(n_genes, dtype=bool)
        self.intercept_ = np.log(np.maximum(gene_mean, 1e-300))
        self.coef_ = np.zeros((n_genes, max(k, 0)))
        self.lambda_max_ = np.full(n_genes, np.nan)
        self.lambda_min_ = np.full(n_genes, np.nan)
        self.sd_cv_ = np.full(n_genes, np.nan)
        self.var_model_ = np.full(n_genes, "none", dtype=object)
        self.var_param_ = np.zeros(n_genes)
        self.neg_loglik_ = np.full((n_genes, 3), np.inf)
        self.maxcor_cutoff_ = np.nan
        self.lambda_coefs_ = None

    def _fit_components(self, s: np.ndarray, k: int, rng: np.random.Generator) -> None:
        """``k`` principal components of the standardized predictors ``s`` (randomized SVD):
        unit-variance ``scores_`` and ``loadings_`` with ``s @ loadings_ == scores_``."""
        n = s.shape[0]
        with log_task(f"PCA of {s.shape[1]} predictor genes ({k} components)", logger):
            from sklearn.utils.extmath import randomized_svd

            u, d, vt = randomized_svd(s, k, random_state=int(rng.integers(2**31)))
            sd = d / np.sqrt(n)
            self.scores_ = u * np.sqrt(n)  # unit-variance component scores
            self.loadings_ = (vt / sd[:, None]).T  # (p, k): s @ loadings_ == scores_

    def _fit_max_correlation(self, xc, s: np.ndarray, inv: np.ndarray, reg_idx,
                             shared: tuple | None = None) -> None:
        """``maxcor_``: each regressable gene's largest absolute correlation with a predictor
        gene other than itself (normalized counts against ``s``), by batches of genes
        (:func:`screpair._parallel.map_blocks`; ``shared``: ``xc`` and ``s`` as
        :class:`~screpair._parallel.Shared`)."""
        bs = int(self.batch_size)
        batches = [reg_idx[i : i + bs] for i in range(0, reg_idx.size, bs)]
        xc_, s_ = shared or (xc, s)
        with log_task("max correlation with predictor genes", logger):
            results = map_blocks(_max_correlation_task, batches, self._predictor_pos, xc_, s_,
                                 inv, self._threads())
            for genes, maxcor in zip(batches, results, strict=True):
                self.maxcor_[genes] = maxcor

    @staticmethod
    def _max_correlation(genes, predictor_pos, xc, s: np.ndarray, inv: np.ndarray) -> np.ndarray:
        """The ``maxcor_`` of one batch of ``genes`` (reads its arguments only)."""
        n = s.shape[0]
        y = SaverImputer._rows(xc, genes).multiply(inv[None, :]).toarray()
        y -= y.mean(1, keepdims=True)
        y /= y.std(1, keepdims=True)
        corr = y @ s / n
        pos = predictor_pos[genes]
        rows = np.flatnonzero(pos >= 0)
        corr[rows, pos[rows]] = 0.0
        return np.abs(corr).max(1)

    def _regression_genes(self, order, xc, s, sf, folds, f_sum) -> np.ndarray:
        """Learn the max-correlation cutoff (``"auto"``: from the first ``_N_CUTOFF_GENES`` of
        ``order``, fitted with cutoff 0) and, in fast mode, lambda.min's trend from
        ``_N_CV_GENES`` more; returns the sorted genes still to be regressed (the ones fitted
        here are done)."""
        cutoff = self.maxcor_cutoff
        first = np.empty(0, dtype=int)
        if cutoff == "auto":
            first = order[:_N_CUTOFF_GENES]
            with log_task(f"learning the max-correlation cutoff on {first.size} genes", logger):
                self._fit_genes(first, xc, s, sf, folds, f_sum)
            cutoff = self._learn_cutoff(first)
        self.maxcor_cutoff_ = float(cutoff)
        rest = order[~np.isin(order, first)]
        rest = rest[self.maxcor_[rest] > cutoff]  # still in random order
        if self.fast and rest.size > _N_CV_GENES:
            second, rest = rest[:_N_CV_GENES], rest[_N_CV_GENES:]
            with log_task(
                f"learning lambda.min from max correlation on {second.size} genes", logger
            ):
                self._fit_genes(second, xc, s, sf, folds, f_sum)
            cv_genes = np.concatenate([first, second])
            self.lambda_coefs_ = self._learn_lambda(cv_genes[self.maxcor_[cv_genes] > cutoff])
            if self.lambda_coefs_ is not None:
                c0, c1 = self.lambda_coefs_
                self.maxcor_cutoff_ = max(self.maxcor_cutoff_, -c0 / c1)
                rest = rest[self.maxcor_[rest] > self.maxcor_cutoff_]
        return np.sort(rest)

    def _fit_regressions(self, genes, xc, s, sf, folds, f_sum,
                         shared: tuple | None = None) -> None:
        """Poisson LASSO priors for ``genes`` in batches (lambda.min from the learned trend in
        fast mode, else by cross-validation). The batches are independent: each is fitted by
        :meth:`_fit_batch` (:func:`screpair._parallel.map_blocks`: on a Dask cluster, one task
        per batch; ``shared``: ``xc`` and ``s`` as :class:`~screpair._parallel.Shared`) and
        stored in gene order."""
        bs = int(self.batch_size)
        batches = [genes[i : i + bs] for i in range(0, genes.size, bs)]
        how = "estimated lambda.min" if self.lambda_coefs_ is not None else "cross-validation"
        xc_, s_ = shared or (xc, s)
        with log_task(f"Poisson LASSO for {genes.size} genes ({how})", logger):
            results = map_blocks(_regression_task, batches, self, xc_, s_,
                                 (sf, folds, f_sum, self.lambda_coefs_))
            bar = tqdm(zip(batches, results, strict=True), total=len(batches),
                       desc="SAVER regression", disable=not self.progress)
            for batch, fitted in bar:
                self._store_fit(batch, fitted)

    def _fit_mean_priors(self, xc, gene_mean: np.ndarray, sf: np.ndarray, f_sum) -> None:
        """Constant (gene-mean) prior and its variance form for every expressed gene not
        predicted by a regression."""
        bs = int(self.batch_size)
        null = np.flatnonzero(~self.predicted_ & (gene_mean > 0))
        seen = np.asarray((xc[:, null] != 0).sum(0)).ravel() > 0 if null.size else null
        unseen = null[~seen]
        if unseen.size:  # only with a sample: genes of all cells without a count in it
            # nothing in the sample to fit a form on: a Poisson-level prior (Fano factor 1)
            logger.info("SAVER: %d mean-prior gene(s) have no count in the %d sampled cells; "
                        "prior variance = mean (Fano factor 1)", unseen.size, xc.shape[0])
            self._store_variance(unseen, np.full(unseen.size, VAR_MODELS.index("fano")),
                                 np.ones(unseen.size), np.full((unseen.size, 3), np.inf))
            null = null[seen]
        with log_task(f"variance model for {null.size} mean-prior genes", logger):
            for start in range(0, null.size, 4 * bs):
                genes = null[start : start + 4 * bs]
                counts = self._rows(xc, genes)
                model, param, nll = fit_variance_model(counts, gene_mean[genes, None], sf, f_sum)
                self._store_variance(genes, model, param, nll)

    def _fit_genes(self, genes, xc, s, sf, folds, f_sum, coefs=None) -> None:
        if genes.size == 0:
            return
        self._store_fit(genes, self._fit_batch(genes, xc, s, sf, folds, f_sum, coefs))

    def _fit_batch(self, genes, xc, s, sf, folds, f_sum, coefs=None) -> dict:
        """The LASSO prior and variance form of one batch of ``genes`` (reads the fitted
        components, ``maxcor_`` and the parameters; writes nothing: :meth:`_store_fit`)."""
        counts = self._rows(xc, genes)
        y = counts.multiply((1.0 / sf)[None, :]).toarray()
        design = self._design(genes, s)
        if coefs is None:
            res = _lasso.fit_cv(
                design,
                y,
                folds,
                n_lambdas=int(self.n_lambdas),
                lambda_min_ratio=float(self.lambda_min_ratio),
            )
            theta, lam_max, lam_min, sd_cv = res.theta, res.lambda_max, res.lambda_min, res.sd_cv
        else:
            # SAVER's fast mode: lambda.min = lambda.max * exp(-sqrt(c0 + c1 * maxcor)), one path
            lam_max = _lasso.lambda_path(design, y, 1, 0.5)[:, 0]
            log_ratio = np.sqrt(np.maximum(coefs[0] + coefs[1] * self.maxcor_[genes], 0.0))
            log_ratio = np.minimum(log_ratio, -np.log(float(self.lambda_min_ratio)))
            n_steps = max(2, int(np.ceil(log_ratio.max() / 0.2)) + 1)  # SAVER's exp(-0.2) steps
            frac = np.exp(-np.outer(log_ratio, np.linspace(0.0, 1.0, n_steps)))
            theta = _lasso.fit_path(design, y, lam_max[:, None] * frac)[-1]
            lam_min, sd_cv = lam_max * frac[:, -1], np.full(genes.size, np.nan)
        mu = np.exp(np.minimum(_lasso.linear_predictor(theta, design), 50.0))
        model, param, nll = fit_variance_model(counts, mu, sf, f_sum)
        return {"theta": theta, "lambda_max": lam_max, "lambda_min": lam_min, "sd_cv": sd_cv,
                "variance": (model, param, nll)}

    def _store_fit(self, genes, fitted: dict) -> None:
        """Store the :meth:`_fit_batch` result of ``genes``."""
        theta = fitted["theta"]
        self.predicted_[genes] = True
        self.intercept_[genes] = theta[:, 0]
        self.coef_[genes] = theta[:, 1:]
        self.lambda_max_[genes] = fitted["lambda_max"]
        self.lambda_min_[genes] = fitted["lambda_min"]
        self.sd_cv_[genes] = fitted["sd_cv"]
        self._store_variance(genes, *fitted["variance"])

    def _learn_lambda(self, genes: np.ndarray) -> tuple[float, float] | None:
        """SAVER's fast mode: least squares ``log(lambda.max / lambda.min)^2 ~ maxcor``."""
        if genes.size < 10:
            return None
        r = self.maxcor_[genes]
        target = np.log(self.lambda_max_[genes] / self.lambda_min_[genes]) ** 2
        ok = np.isfinite(target)
        if ok.sum() < 10 or np.ptp(r[ok]) == 0:
            return None
        c1, c0 = np.polyfit(r[ok], target[ok], 1)
        if not (np.isfinite(c1) and c1 > 0):
            return None
        return float(c0), float(c1)

    def _store_variance(self, genes, model, param, nll) -> None:
        self.var_model_[genes] = np.asarray(VAR_MODELS, dtype=object)[model]
        self.var_param_[genes] = param
        self.neg_loglik_[genes] = nll

    def _learn_cutoff(self, genes: np.ndarray) -> float:
        """SAVER's fast-mode cutoff: where the line ``sqrt(sd.cv) ~ maxcor`` reaches 0.5."""
        r, sd = self.maxcor_[genes], np.sqrt(np.maximum(self.sd_cv_[genes], 0.0))
        ok = np.isfinite(sd)
        if ok.sum() < 3 or np.ptp(r[ok]) == 0:
            return 0.0
        slope, intercept = np.polyfit(r[ok], sd[ok], 1)
        if not np.isfinite(slope) or slope <= 0:
            return 0.0
        return float((0.5 - intercept) / slope)

    # ------------------------------------------------------------------ posterior
    def _posterior(self, x, ctx: DataContext) -> Posterior:
        """Posterior mean (``s_c E[lambda]``) and variance (``s_c^2 Var[lambda]``) on the count
        scale for the fitted cells ``ctx.rows``, dense float64."""
        with threadpool_limits(limits=self._threads()):
            return self._posterior_rows(x, self.size_factors_[ctx.rows], ctx.rows)

    def _posterior_rows(self, x, sf: np.ndarray, rows: slice) -> Posterior:
        n, n_genes = x.shape
        xc = x.tocsc() if sp.issparse(x) else x
        mean = np.zeros((n, n_genes))
        var = np.zeros((n, n_genes))
        pred = np.flatnonzero(self.predicted_)
        s = self._predictors(x, sf) if pred.size else None
        if s is None:
            scores = None
        elif getattr(self, "fit_cells_", None) is None:  # every cell was fitted: its scores
            scores = self.scores_[rows]
        else:
            scores = s @ self.loadings_
        bs = 4 * int(self.batch_size)
        for start in range(0, n_genes, bs):
            genes = np.arange(start, min(start + bs, n_genes))
            block = xc[:, genes]
            y = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=np.float64)
            mu = np.broadcast_to(self.gene_mean_[genes], y.shape).copy()
            is_pred = self.predicted_[genes]
            if np.any(is_pred):
                mu[:, is_pred] = self._prior_mean(genes[is_pred], s, scores).T
            alpha = np.zeros_like(mu)
            beta = np.zeros_like(mu)
            for model in VAR_MODELS:
                cols = self.var_model_[genes] == model
                if np.any(cols):
                    a, b = prior_shape_rate(model, self.var_param_[genes][cols], mu[:, cols])
                    alpha[:, cols], beta[:, cols] = a, b
            m, v = gamma_posterior(y, sf, alpha, beta)
            empty = self.gene_mean_[genes] == 0
            m[:, empty] = 0.0
            v[:, empty] = 0.0
            mean[:, genes], var[:, genes] = m, v
        return Posterior(mean=mean, var=var)


# --------------------------------------------------------------------------- block tasks
# module-level, so that Dask workers can import them (screpair._parallel.map_blocks)


def _max_correlation_task(predictor_pos, xc, s, inv, threads, genes) -> np.ndarray:
    with threadpool_limits(limits=threads):
        return SaverImputer._max_correlation(genes, predictor_pos, xc, s, inv)


def _regression_task(est: SaverImputer, xc, s, rest: tuple, genes) -> dict:
    sf, folds, f_sum, coefs = rest
    with threadpool_limits(limits=est._threads()):
        return est._fit_batch(genes, xc, s, sf, folds, f_sum, coefs=coefs)


# --------------------------------------------------------------------------- sampling
def saver_sample(
    adata: AnnData,
    n: int = 1,
    *,
    key: str = "saver",
    rng: RNGLike = 0,
) -> np.ndarray:
    """Draw from the SAVER posterior stored by ``screpair.impute(adata, method="saver")``.

    The posterior of each entry on the count scale is ``s_c * lambda`` with
    ``lambda ~ Gamma(Y + alpha, s_c + beta)``, i.e. a Gamma with shape ``mean^2 / var`` and
    rate ``mean / var`` (``mean``, ``var`` on the count scale). Both are read from
    ``adata.layers[key]`` and ``adata.layers[f"{key}_var"]``, so nothing else needs storing. As in
    SAVER's ``sample.saver``, entries are sampled independently.

    Parameters
    ----------
    adata
        AnnData holding the SAVER output layers.
    n
        Number of sampled datasets.
    key
        The ``key_added`` used with :func:`screpair.impute`.
    rng
        Seed or ``numpy.random.Generator``.

    Returns
    -------
    ``(n, n_cells, n_genes)`` float64 array of count-scale samples (memory: ``8 n`` bytes per
    entry). Entries with zero posterior variance (genes without counts) equal the mean.
    """
    if not isinstance(adata, AnnData):
        msg = f"saver_sample expects an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    missing = [k for k in (key, f"{key}_var") if k not in adata.layers]
    if missing:
        msg = (
            f"layers {missing} not found; run `screpair.impute(adata, method='saver', "
            f"key_added={key!r})` first."
        )
        raise KeyError(msg)
    if int(n) < 1:
        msg = f"n must be a positive integer, got {n}."
        raise ValueError(msg)
    mean = _dense(adata.layers[key])
    var = _dense(adata.layers[f"{key}_var"])
    gen = as_rng(rng)
    pos = (var > 0) & (mean > 0)
    shape = np.where(pos, mean * mean / np.where(pos, var, 1.0), 1.0)
    scale = np.where(pos, var / np.where(pos, mean, 1.0), 0.0)
    draws = gen.gamma(shape, scale, size=(int(n), *mean.shape))
    return np.where(pos[None], draws, mean[None])


def _dense(m: Any) -> np.ndarray:
    return m.toarray().astype(np.float64) if sp.issparse(m) else np.asarray(m, dtype=np.float64)
