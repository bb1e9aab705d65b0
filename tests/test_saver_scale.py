"""SAVER in the fit-small / transform-by-rows shape: the prior learned on a sample of cells
(``n_fit_cells``), the posterior by row blocks, bounded fit memory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from screpair.methods.saver import SaverImputer


def _pg(n, g, seed=0):
    """Poisson-gamma counts with a rank-2 structure (two cell types), every cell non-empty."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    base = rng.gamma(1.0, 1.0, size=(2, g)) * 2
    lam = base[kind] * rng.gamma(5.0, 0.2, size=(n, g))
    sf = rng.uniform(0.5, 1.5, n)
    x = rng.poisson(lam * sf[:, None]).astype(np.float64)
    x[x.sum(1) == 0, 0] = 1.0
    return sp.csr_matrix(x), kind


@pytest.mark.parametrize("n_fit_cells", [None, 60])
def test_posterior_by_row_blocks_equals_all_rows(n_fit_cells, posterior_blocks):
    x, _ = _pg(150, 40)
    est = SaverImputer(rng=0, progress=False, n_fit_cells=n_fit_cells).fit(x)
    whole = est.posterior(x)
    blocks = posterior_blocks(est, x, 64)
    mean, var = np.vstack([p.mean for p in blocks]), np.vstack([p.var for p in blocks])
    # per-row arithmetic; the row blocks' matrix products checked to 1e-12
    np.testing.assert_allclose(mean, whole.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, whole.var, rtol=1e-12, atol=1e-12)
    assert SaverImputer.posterior_by_rows


def test_small_data_use_every_cell():
    x, _ = _pg(120, 30, seed=1)
    default = SaverImputer(rng=0, progress=False).fit(x)  # 120 <= n_fit_cells
    every = SaverImputer(rng=0, progress=False, n_fit_cells=None).fit(x)
    assert default.fit_cells_ is None
    np.testing.assert_array_equal(default.transform(x), every.transform(x))


def test_prior_from_a_sample_of_cells():
    """Learning the prior on 150 of 400 cells: every cell still gets its own posterior, close to
    the all-cells fit (the prior is a smooth function of the cell's predictors)."""
    x, kind = _pg(400, 40, seed=2)
    full = SaverImputer(rng=0, progress=False, n_fit_cells=None).fit(x)
    sub = SaverImputer(rng=0, progress=False, n_fit_cells=150).fit(x)
    assert sub.fit_cells_.shape == (150,) and np.all(np.diff(sub.fit_cells_) > 0)
    assert sub.scores_.shape[0] == 150 and sub.size_factors_.shape == (400,)
    a, b = np.log1p(full.transform(x)), np.log1p(sub.transform(x))
    assert np.all(np.isfinite(b)) and b.min() >= 0
    out = np.setdiff1d(np.arange(400), sub.fit_cells_)  # cells outside the sample
    r = np.corrcoef(a[out].ravel(), b[out].ravel())[0, 1]
    assert r > 0.98, r  # 0.987 measured
    assert np.mean((a - b) ** 2) < 0.05 * a.var()


def test_fit_memory_follows_the_sample(traced_peak):
    """50,000 cells x 300 genes (dense: 120 MB): with a 300-cell sample the fit allocates a
    fraction of the dense size (the all-cells steps are sparse: validation, gene moments, the
    mean priors; their one dense block is the 3000 x 1024 spline table of _SumLog1p). No
    regressions (pred_genes=[]): the sampled steps are the sample's size by construction."""
    x, _ = _pg(50000, 300, seed=3)
    x = sp.lil_matrix(x.multiply(sp.random(50000, 300, density=0.05, random_state=0) > 0))
    x[np.flatnonzero(np.asarray(x.sum(1)).ravel() == 0), 0] = 1.0
    x = sp.csr_matrix(x)
    x.sort_indices()
    est = SaverImputer(rng=0, progress=False, n_fit_cells=300, pred_genes=[])
    _, peak = traced_peak(lambda: est.fit(x))
    # 50 MB measured: sparse copies of the input
    assert peak < 50000 * 300 * 8 / 2, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("bad", [3, 500.5, True])
def test_n_fit_cells_checked(bad):
    with pytest.raises(ValueError, match="n_fit_cells must be None or an integer >= 10"):
        SaverImputer(n_fit_cells=bad).fit(np.ones((20, 5)))
