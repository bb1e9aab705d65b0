"""ALRA: adaptively-thresholded low-rank approximation (Linderman et al., Nat Commun 2022)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd

from .. import _norm
from .._logging import get_logger
from .._utils import RNGLike, as_rng
from ._base import BaseImputer, DataContext, Posterior

logger = get_logger(__name__)


def choose_k(
    a, *, max_k: int = 100, thresh: float = 6.0, noise_start: int | None = None, n_iter: int = 2,
    rng: RNGLike = 0,
) -> tuple[int, np.ndarray]:
    """ALRA's rank choice by the spectral gap.

    The differences between consecutive singular values of the top ``max_k`` are compared with the
    differences among the tail (``noise_start..max_k``, assumed noise): the rank is the last
    position whose gap exceeds the noise gaps' mean by more than ``thresh`` standard deviations.
    ``max_k`` is reduced to ``min(shape) - 1`` for small inputs, and ``noise_start`` defaults to
    80 % of it (ALRA's 80 of 100).

    Returns
    -------
    ``(k, singular_values)``
    """
    max_k = int(min(max_k, min(a.shape) - 1))
    noise = int(0.8 * max_k) if noise_start is None else int(noise_start)
    if max_k < 6 or noise > max_k - 5:
        need = 26 if noise_start is None else max(noise + 6, 7)  # max_k >= noise + 5
        msg = (
            f"the input is too small for ALRA: it has {a.shape[0]} cells x {a.shape[1]} genes, and "
            f"choosing the rank needs at least {need} of each (singular values beyond the "
            "first 80% estimate the noise level)."
        )
        raise ValueError(msg)
    noise_start = noise
    seed = int(as_rng(rng).integers(2**31))
    _, d, _ = randomized_svd(a, max_k, n_iter=n_iter, random_state=seed)
    diffs = d[:-1] - d[1:]
    noise = diffs[noise_start - 1 :]
    mu, sigma = noise.mean(), noise.std(ddof=1)
    n_sd = (diffs - mu) / sigma if sigma > 0 else np.where(diffs > mu, np.inf, -np.inf)
    above = np.flatnonzero(n_sd > thresh)
    k = int(above.max() + 1) if above.size else 1
    return k, d


def _sd_nonzero(m: np.ndarray) -> np.ndarray:
    """Per-column standard deviation (ddof=1) of the non-zero entries (NaN with < 2)."""
    nz = m != 0
    n = nz.sum(0)
    s = np.where(nz, m, 0).sum(0)
    ss = np.where(nz, m * m, 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (ss - s * s / n) / (n - 1)
    return np.where(n > 1, np.sqrt(np.maximum(var, 0)), np.nan)


def alra_core(a, k: int, *, quantile_prob: float = 0.001, n_iter: int = 10, rng: RNGLike = 0,
              chunk: int = 2048) -> np.ndarray:
    """ALRA on a log-normalized matrix ``a`` (cells x genes); returns the completed matrix.

    Steps (ALRA's ``alra`` function): rank-``k`` randomized SVD; per gene, entries at or below
    the absolute ``quantile_prob`` quantile of that gene's low-rank values are set to zero; the
    remaining values are rescaled so their mean and standard deviation match the gene's observed
    non-zeros; negatives are zeroed; observed non-zeros that ended at zero get their values back.
    Genes are processed in blocks of ``chunk`` columns, so only the output is dense.
    """
    seed = int(as_rng(rng).integers(2**31))
    u, d, vt = randomized_svd(a, k, n_iter=n_iter, random_state=seed)
    us = u * d
    out = np.empty(a.shape, dtype=np.float64)
    for j0 in range(0, a.shape[1], chunk):
        j1 = min(j0 + chunk, a.shape[1])
        low = us @ vt[:, j0:j1]
        obs = a[:, j0:j1]
        obs = obs.toarray() if sp.issparse(obs) else np.asarray(obs, dtype=np.float64)
        mins = np.abs(np.quantile(low, quantile_prob, axis=0))
        cor = np.where(low <= mins, 0.0, low)
        sigma_1, sigma_2 = _sd_nonzero(cor), _sd_nonzero(obs)
        n1, n2 = (cor != 0).sum(0), (obs != 0).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mu_1, mu_2 = cor.sum(0) / n1, obs.sum(0) / n2
            scale = sigma_2 / sigma_1
            shift = mu_2 - mu_1 * scale
        ok = ~np.isnan(sigma_1) & ~np.isnan(sigma_2) & ~((sigma_1 == 0) & (sigma_2 == 0)) & (sigma_1 != 0)
        sc = cor.copy()
        sc[:, ok] = cor[:, ok] * scale[ok] + shift[ok]
        sc[cor == 0] = 0.0
        sc[sc < 0] = 0.0
        restore = (obs > 0) & (sc == 0)
        sc[restore] = obs[restore]
        out[:, j0:j1] = sc
    return out


class ALRAImputer(BaseImputer):
    """ALRA imputation (Linderman, Zhao, Roulis, Bielecki, Flavell & Kluger 2022).

    Counts are library-normalized to 1e4 and log1p-transformed; the rank ``k`` is chosen from the
    spectral gap of a randomized SVD (:func:`choose_k`) unless given; the low-rank approximation
    is thresholded per gene, rescaled and the observed values restored (:func:`alra_core`). The
    result is mapped back to counts: ``expm1(.) * L / 1e4`` with each cell's observed library size.

    Parameters
    ----------
    k
        Rank; ``None`` chooses it automatically.
    max_k, thresh, noise_start
        Rank-choice settings (ALRA defaults 100, 6 and 80).
    quantile_prob
        Per-gene quantile of the low-rank values below which entries are set to zero.
    n_iter
        Power iterations of the randomized SVD.
    rng
        Seed for the randomized SVDs.

    Notes
    -----
    Transductive: ``transform`` needs the cells given to ``fit``.
    """

    name = "alra"
    transductive = True

    def __init__(self, *, k: int | None = None, max_k: int = 100, thresh: float = 6.0,
                 noise_start: int | None = None, quantile_prob: float = 0.001, n_iter: int = 10,
                 rng: RNGLike = 0):
        self.k, self.max_k, self.thresh, self.noise_start = k, max_k, thresh, noise_start
        self.quantile_prob, self.n_iter, self.rng = quantile_prob, n_iter, rng

    def _fit(self, x, ctx: DataContext) -> None:
        rng = as_rng(self.rng)
        a = _norm.log_normalize(x, _norm.CP10K)
        if self.k is None:
            self.k_, self.singular_values_ = choose_k(
                a, max_k=self.max_k, thresh=self.thresh, noise_start=self.noise_start, rng=rng
            )
            logger.info("ALRA: chose rank k=%d from the spectral gap", self.k_)
        else:
            self.k_ = int(self.k)
            if not 1 <= self.k_ < min(x.shape):
                msg = f"k must be between 1 and {min(x.shape) - 1}, got {self.k}."
                raise ValueError(msg)
        self.completed_ = alra_core(a, self.k_, quantile_prob=self.quantile_prob,
                                    n_iter=self.n_iter, rng=rng)

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        lib = _norm.library_size(x)
        return Posterior(mean=_norm.unnormalize(np.expm1(self.completed_[ctx.rows]), lib))
