"""ALRA in the fit-small / transform-by-rows shape: exact block-wise quantiles, row blocks,
bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from screpair import _norm
from screpair.methods import alra
from screpair.methods.alra import ALRAImputer, _ColumnQuantile, alra_core, alra_fit


def _blocky(rng, n, g, n_groups=3):
    """Counts of ``n_groups`` cell groups, each expressing only its own genes: ALRA's
    thresholded output is about one third non-zero."""
    group, own = np.arange(n) % n_groups, np.arange(g) % n_groups
    lam = np.where(group[:, None] == own[None, :], 4.0, 0.0) * rng.lognormal(0, 0.3, (n, 1))
    x = rng.poisson(lam).astype(np.float64)
    x[np.arange(n), own.argsort()[group * (g // n_groups)]] += 1  # every cell has a count
    return sp.csr_matrix(x)


@pytest.mark.parametrize("q", [0.0, 0.001, 0.01, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 1001])
def test_column_quantile_is_numpy_quantile_bit_for_bit(n, q):
    m = np.random.default_rng(n).normal(size=(n, 13))
    cq = _ColumnQuantile(n, q)
    for start in range(0, n, 97):  # row blocks
        cq.update(m[start : start + 97])
    np.testing.assert_array_equal(cq.result(), np.quantile(m, q, axis=0))
    assert cq.keep.shape[0] <= int(np.floor((n - 1) * q)) + 2


def _ref_alra(a, k, q, seed):
    """The former column-block implementation (whole columns at once), for comparison."""
    from sklearn.utils.extmath import randomized_svd

    from screpair.methods.alra import _sd_nonzero

    u, d, vt = randomized_svd(a, k, n_iter=10, random_state=seed)
    low = (u * d) @ vt
    obs = a.toarray() if sp.issparse(a) else a
    mins = np.abs(np.quantile(low, q, axis=0))
    cor = np.where(low <= mins, 0.0, low)
    s1, s2 = _sd_nonzero(cor), _sd_nonzero(obs)
    n1, n2 = (cor != 0).sum(0), (obs != 0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = s2 / s1
        shift = obs.sum(0) / n2 - cor.sum(0) / n1 * scale
    ok = ~np.isnan(s1) & ~np.isnan(s2) & ~((s1 == 0) & (s2 == 0)) & (s1 != 0)
    sc = cor.copy()
    sc[:, ok] = cor[:, ok] * scale[ok] + shift[ok]
    sc[cor == 0] = 0
    sc[sc < 0] = 0
    restore = (obs > 0) & (sc == 0)
    sc[restore] = obs[restore]
    return sc


def test_blocks_match_the_whole_column_computation(array_type, sparse_counts):
    rng = np.random.default_rng(0)
    a = _norm.log_normalize(array_type(sparse_counts(rng, 300, 80).toarray()))
    seed = int(np.random.default_rng(0).integers(2**31))
    want = _ref_alra(a, 4, 0.01, seed)
    one = alra_core(a, 4, quantile_prob=0.01, rng=0)  # one block: the same arithmetic
    np.testing.assert_array_equal(one, want)
    many = alra_core(a, 4, quantile_prob=0.01, rng=0, block_entries=80 * 37)  # 9 row blocks
    np.testing.assert_allclose(many, want, rtol=1e-12, atol=1e-12)


def test_posterior_by_row_blocks_equals_all_rows(array_type, posterior_blocks):
    rng = np.random.default_rng(1)
    x = array_type(_blocky(rng, 120, 60).toarray())
    est = ALRAImputer(k=3).fit(x)
    whole = est.posterior(x).mean
    blocks = [p.mean for p in posterior_blocks(est, x, 50)]
    assert all(sp.issparse(b) == sp.issparse(x) for b in [whole, *blocks])
    stacked = sp.vstack(blocks).toarray() if sp.issparse(x) else np.vstack(blocks)
    whole = whole.toarray() if sp.issparse(whole) else whole
    # U[rows] S V^T of a row block: the same products per entry (BLAS), checked to 1e-12
    np.testing.assert_allclose(stacked, whole, rtol=1e-12, atol=1e-12)
    assert ALRAImputer.posterior_by_rows


def test_sparse_input_gives_sparse_output_with_the_dense_values(monkeypatch):
    """CSR counts give a CSR posterior that stores only the non-zero values; they equal, bit for
    bit, the dense posterior of the same fitted model, in several row blocks."""
    monkeypatch.setattr(alra, "_BLOCK_ENTRIES", 60 * 17)  # 17 rows per block
    x = _blocky(np.random.default_rng(4), 150, 60)
    est = ALRAImputer().fit(x)
    assert est.sparse_output_ and 0.2 < est.lowrank_.density < 0.5
    got = est.posterior(x).mean
    est.sparse_output_ = False  # the dense output of the same fit
    want = est.posterior(x).mean
    assert sp.isspmatrix_csr(got) and isinstance(want, np.ndarray)
    np.testing.assert_array_equal(got.toarray(), want)
    assert got.nnz == np.count_nonzero(want) and np.all(got.data != 0)
    assert abs(got.nnz / want.size - est.lowrank_.density) < 0.1  # the fit's estimate
    assert not ALRAImputer().fit(x.toarray()).sparse_output_  # dense input: dense output


def test_mostly_non_zero_output_stays_dense(sparse_counts):
    """Above half non-zero values CSR would be larger than dense float32: dense output."""
    rng = np.random.default_rng(5)
    x = sparse_counts(rng, 150, 60, density=0.6)
    est = ALRAImputer(k=3).fit(x)
    assert est.lowrank_.density > 0.5 and not est.sparse_output_
    assert isinstance(est.posterior(x).mean, np.ndarray)


@pytest.mark.filterwarnings("ignore:.*have no counts:UserWarning")
def test_fit_never_densifies_cells_by_genes(monkeypatch, posterior_rows, traced_peak,
                                            sparse_counts):
    """1,000 cells x 20,000 genes at 0.3 % density (dense: 160 MB): with 8 MB low-rank blocks,
    choosing the rank, the fit and a 50-row posterior stay far below the dense size."""
    monkeypatch.setattr(alra, "_BLOCK_ENTRIES", 2**20)
    rng = np.random.default_rng(2)
    x = sparse_counts(rng, 1000, 20000, density=0.003)
    est = ALRAImputer(max_k=40)
    block, peak = traced_peak(lambda: posterior_rows(est.fit(x), x, slice(0, 50)).mean)
    assert block.shape == (50, 20000)
    assert peak < 1000 * 20000 * 8 / 4, f"peak {peak / 1e6:.0f} MB"


def test_fit_attributes_are_factors_not_the_completed_matrix(sparse_counts):
    rng = np.random.default_rng(3)
    x = sparse_counts(rng, 100, 40)
    est = ALRAImputer(k=2).fit(x)
    f = est.lowrank_
    assert f.us.shape == (100, 2) and f.vt.shape == (2, 40)
    assert f.threshold.shape == f.scale.shape == f.shift.shape == (40,)
    assert not hasattr(est, "completed_")
    direct = alra_fit(_norm.log_normalize(x), 2, rng=0)
    np.testing.assert_array_equal(direct.threshold, f.threshold)


def _groups_with_a_rare_gene(rng, n=300, g=40):
    """Poisson counts of 3 cell groups; the last gene seen in two cells only (3 and 1 counts)."""
    lab = rng.integers(0, 3, n)
    x = rng.poisson(rng.gamma(1.0, 2.0, (3, g))[lab]).astype(np.float64)
    x[:, -1] = 0.0
    x[[3, 7], -1] = [3.0, 1.0]
    x[x.sum(1) == 0, 0] = 1.0
    return x


def test_cap_bounds_each_gene_by_its_largest_observed_value():
    """cap: the completed log values are ALRA's, each gene's capped at its largest observed log
    value (exactly min(ALRA, column max)); without it ALRA exceeds that max in several genes."""
    x = _groups_with_a_rare_gene(np.random.default_rng(0))
    a = _norm.log_normalize(x)
    rows = slice(0, x.shape[0])
    plain = alra_fit(a, 3, rng=0).complete(a, rows)
    capped = alra_fit(a, 3, rng=0, cap=True).complete(a, rows)
    top = a.max(axis=0)
    assert (plain > top).any(axis=0).sum() >= 3  # the case exercises the cap
    np.testing.assert_array_equal(capped, np.minimum(plain, top))
    # the imputer (default cap="observed") returns the capped values on the count scale
    lib = x.sum(1, keepdims=True)
    out = ALRAImputer(k=3, rng=0).fit(x).transform(x)
    np.testing.assert_allclose(np.log1p(np.asarray(out) * 1e4 / lib), capped, rtol=1e-9,
                               atol=1e-12)
    ref = ALRAImputer(k=3, cap=None, rng=0).fit(x).transform(x)
    np.testing.assert_allclose(np.log1p(np.asarray(ref) * 1e4 / lib), plain, rtol=1e-9,
                               atol=1e-12)


def test_cap_is_checked_before_the_fit():
    with pytest.raises(ValueError, match="cap must be 'observed' or None"):
        ALRAImputer(cap="max").fit(np.ones((5, 4)))
