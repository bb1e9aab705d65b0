"""kNN smoothing in the fit-small / transform-by-rows shape: implicit-centring PCA, row blocks,
bounded memory, approximate neighbours."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import TruncatedSVD

from screpair.methods.knn import KNNImputer, centred_pca, nearest_neighbors


@pytest.mark.parametrize("shape", [(60, 200), (200, 40)])  # transposed / direct range finder
def test_centred_pca_matches_truncated_svd_of_centred_matrix(array_type, shape, sparse_counts):
    rng = np.random.default_rng(0)
    x = sparse_counts(rng, *shape)
    dense = x.toarray()
    want = TruncatedSVD(8, random_state=3).fit_transform(dense - dense.mean(0))
    got = centred_pca(array_type(dense), 8, seed=3)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_posterior_by_row_blocks_equals_all_rows(array_type, posterior_blocks, sparse_counts):
    rng = np.random.default_rng(1)
    x = array_type(sparse_counts(rng, 90, 50).toarray())
    est = KNNImputer(k=5, n_pcs=6).fit(x)
    whole = est.posterior(x).mean
    blocks = [p.mean for p in posterior_blocks(est, x, 32)]
    np.testing.assert_array_equal(np.vstack(blocks), whole)  # tolerance 0: same arithmetic
    assert KNNImputer.posterior_by_rows


def test_hand_checked_neighbourhoods():
    """Three tight pairs of cells far apart: k=2 averages each cell with its twin, on the
    normalized scale, then rescales to the cell's own library size."""
    x = np.array([[10, 0, 0, 0], [30, 0, 0, 0], [0, 8, 0, 0], [0, 4, 0, 0],
                  [0, 0, 5, 5], [0, 0, 6, 6]], dtype=float)
    x += 0.0
    out = KNNImputer(k=2, n_pcs=2).fit_transform(x)
    norm = x / x.sum(1, keepdims=True)
    pair = np.repeat((norm[0::2] + norm[1::2]) / 2, 2, axis=0)
    np.testing.assert_allclose(out, pair * x.sum(1, keepdims=True), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:.*have no counts:UserWarning")
def test_fit_never_densifies_cells_by_genes(posterior_rows, traced_peak, sparse_counts):
    """1,000 cells x 20,000 genes at 0.3 % density: the dense matrix would be 160 MB, the
    sparse one is 0.7 MB; fitting (PCA, neighbours) and a 50-row posterior stay far below."""
    rng = np.random.default_rng(2)
    x = sparse_counts(rng, 1000, 20000, density=0.003)
    est = KNNImputer(k=10, n_pcs=20)
    block, peak = traced_peak(lambda: posterior_rows(est.fit(x), x, slice(0, 50)).mean)
    assert block.shape == (50, 20000)
    dense_bytes = 1000 * 20000 * 8
    assert peak < dense_bytes / 4, f"peak {peak / 1e6:.0f} MB"


def test_exact_max_cells_checked():
    with pytest.raises(ValueError, match="exact_max_cells"):
        KNNImputer(exact_max_cells=-1).fit(np.ones((5, 4)))


@pytest.mark.slow  # pynndescent's numba compilation takes ~30 s per process
@pytest.mark.requires("pynndescent")
def test_approximate_neighbours_recall():
    rng = np.random.default_rng(3)
    centres = rng.normal(scale=5, size=(8, 10))
    pts = centres[rng.integers(0, 8, 3000)] + rng.normal(size=(3000, 10))
    exact = nearest_neighbors(pts, 10)
    approx = nearest_neighbors(pts, 10, exact_max_cells=0, seed=0)
    assert approx.shape == exact.shape and (approx == np.arange(3000)[:, None]).any(1).all()
    recall = np.mean([np.intersect1d(a, e).size / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.95
