"""k-nearest-neighbour smoothing baseline (knn-smoothing style)."""

from __future__ import annotations

from typing import Self

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.neighbors import NearestNeighbors

from .._utils import Data, RNGLike, as_rng, get_counts, library_size, var_names
from ..pp import log1p_matrix, normalize_rows
from ._base import BaseImputer, Posterior


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

    def __init__(self, *, k: int = 15, n_pcs: int = 30, rng: RNGLike = 0):
        self.k, self.n_pcs, self.rng = k, n_pcs, rng

    def fit(self, data: Data, *, layer: str | None = None) -> Self:
        if int(self.k) < 1:
            msg = f"k must be >= 1, got {self.k}."
            raise ValueError(msg)
        x = get_counts(data, layer)
        self.var_names_ = var_names(data)
        self.n_obs_ = x.shape[0]
        k = min(int(self.k), x.shape[0])
        lg = log1p_matrix(normalize_rows(x, 1e4))
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
        return self

    def posterior(self, data: Data, *, layer: str | None = None) -> Posterior:
        self._check_fitted("neighbors_")
        x = get_counts(data, layer, warn_empty=False)
        self._check_same_cells(x.shape[0])
        lib = library_size(x)
        n, k = self.neighbors_.shape
        # row-stochastic neighbour matrix: never builds a cells x k x genes array
        w = sp.csr_matrix(
            (np.full(n * k, 1.0 / k), self.neighbors_.ravel(), np.arange(0, n * k + 1, k)),
            shape=(n, n),
        )
        smooth = w @ normalize_rows(x, 1e4)
        smooth = smooth.toarray() if sp.issparse(smooth) else np.asarray(smooth)
        return Posterior(mean=smooth * (lib / 1e4)[:, None])
