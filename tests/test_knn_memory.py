"""kNN with bounded memory (issue 16): the per-cell scaling folded into the neighbour weights
(no normalized copy of the counts), the rows of ``W^steps`` built from the neighbour rows they
need, and the PCA fitted on a sample of ``n_fit_cells`` cells with every cell projected."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from screpair import _norm
from screpair._utils import get_counts
from screpair.methods import knn
from screpair.methods._base import data_context, sample_rows
from screpair.methods.knn import (
    KNNImputer,
    centred_pca,
    nearest_neighbors,
    neighbor_matrix,
    pca_components,
    pca_scores,
    smooth_rows,
    walk_rows,
)


def _counts(rng, n, g, density=0.2, groups=3):
    """Sparse counts of ``groups`` cell groups with their own gene rates; every cell and every
    gene has a count."""
    rates = rng.gamma(0.5, 2.0, (groups, g)) * (rng.random((groups, g)) < density * 2)
    lab = rng.integers(0, groups, n)
    x = rng.poisson(rates[lab] * rng.lognormal(0, 0.3, (n, 1))).astype(np.float64)
    x[np.arange(n), rng.integers(0, g, n)] += 1.0
    x[rng.integers(0, n, g), np.arange(g)] += 1.0
    x = sp.csr_matrix(x)
    x.sort_indices()
    return x


def _neighbours(rng, n, k):
    idx = np.column_stack([np.arange(n), rng.integers(0, n, (n, k - 1))])
    return idx.astype(np.int64)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_walk_rows_are_the_rows_of_the_matrix_power(steps):
    """The block's rows of W^steps from the neighbour rows they need: the same entries, in the
    same order, as the product with the whole W (bit for bit), and W^steps itself."""
    rng = np.random.default_rng(0)
    idx = _neighbours(rng, 40, 4)
    w = neighbor_matrix(idx)
    for rows in (slice(0, 40), slice(7, 19), np.array([3, 30, 5])):
        want = w[rows]
        for _ in range(steps - 1):
            want = want @ w
        got = walk_rows(idx, rows, steps)
        assert got.shape == (want.shape[0], 40)
        np.testing.assert_array_equal(got.indptr, want.indptr)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)
    power = np.linalg.matrix_power(w.toarray(), steps)
    np.testing.assert_allclose(walk_rows(idx, slice(0, 40), steps).toarray(), power,
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_folded_weights_equal_averaging_the_normalized_profiles(array_type, steps):
    """``space="counts"``: W^steps diag(1e4 / L) @ counts is the average of the CP10k profiles
    (a normalized copy, as before issue 16) up to rounding: relative 1e-14 (the terms are
    rounded as ``(w * (1e4/L)) * x`` instead of ``w * (x * (1e4/L))``; measured at most 8e-16
    on pbmc3k / baron). A cell without counts contributes 0 either way. ``space="log"``
    averages log1p(CPM) rows taken for the block: the same bits as averaging all of them."""
    rng = np.random.default_rng(1)
    x = _counts(rng, 60, 30).tolil()
    x[5] = 0.0  # a cell without counts among the neighbours
    x = array_type(sp.csr_matrix(x).toarray())
    lib = _norm.library_size(x)
    idx = _neighbours(rng, 60, 5)
    idx[:, 1] = 5
    power = np.linalg.matrix_power(neighbor_matrix(idx).toarray(), steps)
    norm = _norm.normalize(x, _norm.CP10K)
    norm = norm.toarray() if sp.issparse(norm) else norm
    got = smooth_rows(x, lib, idx, slice(0, 60), steps=steps)
    np.testing.assert_allclose(got, power @ norm, rtol=1e-14, atol=1e-12)
    w = neighbor_matrix(idx)
    p = w[10:30]
    for _ in range(steps - 1):
        p = p @ w
    want = p @ _norm.log_normalize(x, _norm.CPM)
    want = want.toarray() if sp.issparse(want) else np.asarray(want)
    np.testing.assert_array_equal(smooth_rows(x, lib, idx, slice(10, 30), steps=steps,
                                              space="log"), want)


@pytest.mark.parametrize("params", [{}, {"steps": 2}, {"space": "log", "steps": 2}])
def test_posterior_is_the_neighbours_average_at_the_cells_depth(params):
    """The estimator's output: W^steps averages of the CP10k (or log1p(CPM)) profiles, back at
    each cell's own library size (relative 1e-12)."""
    rng = np.random.default_rng(2)
    x = get_counts(_counts(rng, 50, 25))  # validated, as impute / impute_file hold them
    est = KNNImputer(k=4, n_pcs=5, **params)._fit_validated(x, data_context(x, x))
    assert est.counts_ is x  # a reference to the validated counts, not a copy
    np.testing.assert_array_equal(est.library_size_, np.asarray(x.sum(1)).ravel())
    assert not hasattr(est, "normalized_")
    d = x.toarray()
    lib = d.sum(1, keepdims=True)
    power = np.linalg.matrix_power(neighbor_matrix(est.neighbors_).toarray(),
                                   params.get("steps", 1))
    if params.get("space") == "log":
        want = np.expm1(power @ np.log1p(d / lib * 1e6)) * lib / 1e6
    else:
        want = power @ (d / lib) * lib
    np.testing.assert_allclose(est.transform(x), want, rtol=1e-12, atol=1e-12)


def test_up_to_n_fit_cells_the_default_pca():
    """At or below ``n_fit_cells`` the PCA is on all cells: the same neighbours and output as
    ``n_fit_cells=None`` bit for bit, no sample drawn (``fit_cells_`` None)."""
    rng = np.random.default_rng(3)
    x = _counts(rng, 80, 40)
    ref = KNNImputer(k=5, n_pcs=6, n_fit_cells=None).fit(x)
    for cap in (80, 1000, knn.N_FIT_CELLS):
        est = KNNImputer(k=5, n_pcs=6, n_fit_cells=cap).fit(x)
        assert est.fit_cells_ is None
        np.testing.assert_array_equal(est.neighbors_, ref.neighbors_)
        np.testing.assert_array_equal(est.transform(x), ref.transform(x))
    assert KNNImputer().n_fit_cells == 50_000


def test_projection_of_the_sample_is_its_pca(array_type):
    """The scores of the sample's own rows projected on the sample's axes are the sample's
    PCA scores (CSR: bit for bit, rows are multiplied one by one; dense: relative 1e-10)."""
    rng = np.random.default_rng(4)
    x = array_type(_counts(rng, 120, 50).toarray())
    rows = sample_rows(np.random.default_rng(0), 120, 40)
    lg_sample = _norm.log_normalize(x[rows], _norm.CP10K)
    mean, comps = pca_components(lg_sample, 6, seed=5)
    got = pca_scores(_norm.log_normalize(x, _norm.CP10K), mean, comps)[rows]
    want = centred_pca(lg_sample, 6, seed=5)
    if sp.issparse(x):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(mean, np.asarray(lg_sample.mean(0)).ravel(), rtol=1e-15)


def test_above_n_fit_cells_neighbours_in_the_projected_pca(monkeypatch):
    """Above ``n_fit_cells``: ``fit_cells_`` is the sample ``sample_rows`` draws from ``rng``;
    the neighbours are those of every cell's projection on the sample's axes (seeded by the
    rng's next draw, as without a sample), whatever the projection's block size."""
    rng = np.random.default_rng(5)
    x = _counts(rng, 150, 40)
    est = KNNImputer(k=6, n_pcs=5, n_fit_cells=50, rng=9).fit(x)
    gen = np.random.default_rng(9)
    rows = sample_rows(gen, 150, 50)
    np.testing.assert_array_equal(est.fit_cells_, rows)
    gen.choice(150, 50, replace=False)  # the draw of the sample, then the PCA seed
    seed = int(gen.integers(2**31))
    mean, comps = pca_components(_norm.log_normalize(x[rows], _norm.CP10K), 5, seed=seed)
    pcs = pca_scores(_norm.log_normalize(x, _norm.CP10K), mean, comps)
    np.testing.assert_array_equal(est.neighbors_, nearest_neighbors(pcs, 6))
    monkeypatch.setattr(knn, "_PROJECT_ROWS", 16)  # 10 projection blocks, 4 sample blocks
    small = KNNImputer(k=6, n_pcs=5, n_fit_cells=50, rng=9).fit(x)
    np.testing.assert_array_equal(small.neighbors_, est.neighbors_)


@pytest.mark.parametrize("params", [{}, {"steps": 2}, {"space": "log"}, {"k": "mcv"}])
def test_sampled_fit_blocks_stack_and_are_seeded(params, posterior_blocks):
    """With the sampled PCA: the posterior by row blocks stacks to the all-rows one (tolerance
    0), a fixed rng gives the same fit, another rng another sample."""
    rng = np.random.default_rng(6)
    x = _counts(rng, 90, 30)
    opts = {"k": 5, "n_pcs": 4, "n_fit_cells": 30, "k_grid": (3, 8), **params}
    est = KNNImputer(rng=1, **opts).fit(x)
    whole = est.posterior(x).mean
    np.testing.assert_array_equal(np.vstack([p.mean for p in posterior_blocks(est, x, 32)]),
                                  whole)
    again = KNNImputer(rng=1, **opts).fit(x)
    np.testing.assert_array_equal(again.fit_cells_, est.fit_cells_)
    np.testing.assert_array_equal(again.transform(x), whole)
    other = KNNImputer(rng=2, **opts).fit(x)
    assert not np.array_equal(other.fit_cells_, est.fit_cells_)


@pytest.mark.parametrize("cap", [0, 9, 10.5, True, "all"])
def test_bad_n_fit_cells_is_one_clear_error(cap):
    with pytest.raises(ValueError, match="n_fit_cells must be None or an integer >= 10"):
        KNNImputer(n_fit_cells=cap).fit(np.ones((12, 4)))


def test_fit_holds_no_copy_of_the_counts(traced_peak, monkeypatch):
    """Fitting above ``n_fit_cells`` (a 200-cell sample of 2,000, projected by blocks of 250
    rows) allocates less than one float64 CSR copy of the validated counts (12 bytes per stored
    count, 6 MB here; measured 3.1 MB); the fit before issue 16 held two (a log copy for the
    PCA and the normalized profiles: 18 MB)."""
    monkeypatch.setattr(knn, "_PROJECT_ROWS", 250)
    rng = np.random.default_rng(7)
    x = get_counts(_counts(rng, 2000, 3000, density=0.1))
    copy_bytes = 12 * x.nnz
    est = KNNImputer(k=10, n_pcs=10, n_fit_cells=200)
    _, peak = traced_peak(lambda: est._fit_validated(x, data_context(x, x)))
    assert est.fit_cells_.size == 200
    assert peak < 0.75 * copy_bytes, f"peak {peak / 1e6:.1f} MB, a copy {copy_bytes / 1e6:.1f} MB"


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("params", [{}, {"steps": 2}, {"space": "log"}, {"n_fit_cells": 40}])
def test_compact_counts_same_fit_and_posterior(dtype, params, monkeypatch):
    """Counts held as uint16 / float32 (``impute_file``'s all-cells read for knn): the same
    neighbours and the same posterior bit for bit as float64 counts, smoothed by blocks of
    rows smaller than the posterior's."""
    monkeypatch.setattr(knn, "_SMOOTH_ROWS", 7)
    rng = np.random.default_rng(8)
    x = get_counts(_counts(rng, 100, 40))
    small = x.astype(dtype)
    opts = {"k": 6, "n_pcs": 5, "rng": 3, **params}
    ref = KNNImputer(**opts)._fit_validated(x, data_context(x, x))
    est = KNNImputer(**opts)._fit_validated(small, data_context(small, small))
    np.testing.assert_array_equal(est.neighbors_, ref.neighbors_)
    np.testing.assert_array_equal(est.library_size_, ref.library_size_)
    for rows in (slice(0, 100), slice(10, 33)):
        got = smooth_rows(small, est.library_size_, est.neighbors_, rows, **{
            k: v for k, v in params.items() if k in ("steps", "space")})
        want = smooth_rows(x, ref.library_size_, ref.neighbors_, rows, **{
            k: v for k, v in params.items() if k in ("steps", "space")})
        np.testing.assert_array_equal(got, want)
