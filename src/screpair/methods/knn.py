"""k-nearest-neighbour smoothing baseline (knn-smoothing style)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.neighbors import NearestNeighbors

from .. import _norm
from .._utils import RNGLike, as_rng
from ._base import BaseImputer, DataContext, Posterior


class KNNImputer(BaseImputer):
    """Average each cell's normalized profile with its ``k`` nearest neighbours.

    Cells are compared in the principal components of log1p(counts / L * 1e4) (centred PCA via
    truncated SVD of the centred matrix); each cell's library-normalized profile is replaced by the
    mean over itself and its ``k - 1`` nearest neighbours, then scaled back to the cell's own
    library size (count scale). This is the smoothing idea of knn-smoothing (Wagner et al. 2018)
    in a single step.

    Parameters
    ----------
    k
        Neighbourhood size, the cell itself included (``k=1`` returns the input).
    n_pcs
        Number of principal components used for the distances.
    rng
        Seed for the randomized SVD.

    Notes
    -----
    Transductive: ``transform`` needs the cells given to ``fit``.
    """

    name = "knn"
    transductive = True
    posterior_by_rows = False  # a cell's output averages its neighbours' rows

    def __init__(self, *, k: int = 15, n_pcs: int = 30, rng: RNGLike = 0):
        self.k, self.n_pcs, self.rng = k, n_pcs, rng

    def _check_params(self) -> None:
        if int(self.k) < 1:
            msg = f"k must be >= 1, got {self.k}."
            raise ValueError(msg)

    def _fit(self, x, ctx: DataContext) -> None:
        k = min(int(self.k), x.shape[0])
        lg = _norm.log_normalize(x, _norm.CP10K)
        lg = lg.toarray() if hasattr(lg, "toarray") else lg
        lg = lg - lg.mean(axis=0)
        n_pcs = max(1, min(int(self.n_pcs), min(x.shape) - 1))
        svd = TruncatedSVD(n_pcs, random_state=int(as_rng(self.rng).integers(2**31)))
        pcs = svd.fit_transform(lg) if min(x.shape) > 1 else lg
        nn = NearestNeighbors(n_neighbors=k).fit(pcs)
        _, idx = nn.kneighbors(pcs)
        # make sure each cell is in its own neighbourhood even with duplicate points
        self_missing = ~(idx == np.arange(len(idx))[:, None]).any(1)
        idx[self_missing, -1] = np.flatnonzero(self_missing)
        self.neighbors_ = idx

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        lib = _norm.library_size(x)
        n, k = self.neighbors_.shape
        # row-stochastic neighbour matrix: never builds a cells x k x genes array
        w = sp.csr_matrix(
            (np.full(n * k, 1.0 / k), self.neighbors_.ravel(), np.arange(0, n * k + 1, k)),
            shape=(n, n),
        )
        smooth = w @ _norm.normalize(x, _norm.CP10K)
        return Posterior(mean=_norm.unnormalize(smooth, lib))
