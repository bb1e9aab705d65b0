"""knn and ALRA baselines: known answers and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

from screpair.methods.alra import ALRAImputer, alra_core, choose_k
from screpair.methods.knn import KNNImputer


def _two_groups(rng, n=40, g=30):
    prof = rng.dirichlet(np.ones(g), size=2)
    group = np.repeat([0, 1], n // 2)
    lib = rng.integers(500, 3000, n)
    x = np.vstack([rng.multinomial(lib[i], prof[group[i]]) for i in range(n)]).astype(float)
    return x, group, lib


def test_knn_k1_is_identity(array_type):
    rng = np.random.default_rng(0)
    x, _, _ = _two_groups(rng)
    out = KNNImputer(k=1, n_pcs=5).fit_transform(array_type(x))
    np.testing.assert_allclose(out, x, rtol=1e-10, atol=1e-10)


def test_knn_group_average():
    """Well-separated groups and k = group size: each cell gets its group's mean normalized
    profile, scaled to its own library size."""
    rng = np.random.default_rng(1)
    x, group, lib = _two_groups(rng)
    est = KNNImputer(k=20, n_pcs=5).fit(x)
    assert all(set(group[nb]) == {group[i]} for i, nb in enumerate(est.neighbors_))
    out = est.transform(x)
    xn = x / x.sum(1, keepdims=True) * 1e4
    for g in (0, 1):
        expect = np.outer(lib[group == g] / 1e4, xn[group == g].mean(0))
        np.testing.assert_allclose(out[group == g], expect, rtol=1e-10)
    np.testing.assert_allclose(out.sum(1), lib, rtol=1e-10)  # library sizes preserved


def test_knn_transductive_and_bad_k():
    x, _, _ = _two_groups(np.random.default_rng(2))
    est = KNNImputer(k=3).fit(x)
    with pytest.raises(ValueError, match="transductive"):
        est.transform(x[:10])
    with pytest.raises(ValueError, match="k must be"):
        KNNImputer(k=0).fit(x)


def test_choose_k_finds_planted_rank():
    rng = np.random.default_rng(0)
    a = rng.random((300, 5)) @ rng.random((5, 200)) * 3 + rng.normal(0, 0.3, (300, 200))
    k, d = choose_k(a, rng=0)
    assert k == 5
    assert len(d) == 100 and np.all(np.diff(d) <= 1e-9)


def test_choose_k_small_input():
    """Too small an input says so, with the size needed (was: 'noise_start (4) must be <= max_k
    - 5 (1)' on a 7 x 7 input)."""
    with pytest.raises(ValueError, match="too small for ALRA: it has 5 cells x 20 genes.*at least 26"):
        choose_k(np.ones((5, 20)))
    with pytest.raises(ValueError, match="too small for ALRA: it has 7 cells x 7 genes.*at least 26"):
        choose_k(np.ones((7, 7)))
    with pytest.raises(ValueError, match="at least 9 of each"):
        choose_k(np.ones((8, 30)), noise_start=3)


def test_alra_core_completes_low_rank():
    """Rank-3 positive 'log expression' with 30 % of entries zeroed: ALRA fills nearly all zeros,
    close to the truth and better than each gene's observed mean."""
    rng = np.random.default_rng(0)
    truth = rng.random((400, 3)) @ rng.random((3, 60)) * 2 + 0.5
    drop = rng.random(truth.shape) < 0.3
    a = np.where(drop, 0.0, truth)
    out = alra_core(a, 3, rng=0)
    assert out.min() >= 0
    filled = drop & (out > 0)
    assert filled.sum() > 0.95 * drop.sum()
    assert np.corrcoef(out[filled], truth[filled])[0, 1] > 0.8
    gene_mean = np.nanmean(np.where(drop, np.nan, a), axis=0)
    err_alra = np.mean((out - truth)[drop] ** 2)
    err_mean = np.mean((np.broadcast_to(gene_mean, a.shape) - truth)[drop] ** 2)
    assert err_alra < 0.8 * err_mean
    # every observed value stays non-zero
    assert np.all(out[a > 0] > 0)


def test_alra_core_restores_and_rescales_exactly():
    """Invariants of the per-gene rescaling: without clipping, the imputed non-zeros of each gene
    have the observed non-zeros' mean and standard deviation."""
    rng = np.random.default_rng(3)
    truth = rng.random((200, 2)) @ rng.random((2, 20)) + 1.0
    a = np.where(rng.random(truth.shape) < 0.2, 0.0, truth)
    out = alra_core(a, 2, quantile_prob=0.0, rng=0)  # threshold = |column min| of the low rank
    for j in range(a.shape[1]):
        col = out[:, j]
        kept = col != 0
        obs = a[:, j][a[:, j] != 0]
        # all but the minimum entry survive thresholding; the minimum is restored if observed
        assert kept.sum() >= a.shape[0] - 1
        restored = (a[:, j] > 0) & np.isclose(col, a[:, j], rtol=0, atol=0)
        sc = col[kept & ~restored] if restored.sum() == 1 else col[kept]
        if restored.sum() == 0:
            np.testing.assert_allclose(sc.mean(), obs.mean(), rtol=1e-8)
            np.testing.assert_allclose(sc.std(ddof=1), obs.std(ddof=1), rtol=1e-8)


def test_alra_counts_beat_raw():
    """On Poisson counts from a low-rank mean, ALRA's log-normalized output is closer to the true
    log-normalized mean than the raw data, and it is on the count scale."""
    rng = np.random.default_rng(0)
    n, g = 500, 120
    mean = (rng.gamma(2, 1, (n, 4)) @ rng.gamma(0.5, 1, (4, g))) * rng.lognormal(0, 0.2, (n, 1))
    x = rng.poisson(mean).astype(float)
    ad = AnnData(sp.csr_matrix(x))
    est = ALRAImputer(rng=0).fit(ad)
    out = est.transform(ad)
    assert 1 <= est.k_ <= 20
    lib = x.sum(1, keepdims=True)

    def lg(m):
        return np.log1p(m / lib * 1e4)

    truth = np.log1p(mean / mean.sum(1, keepdims=True) * 1e4)
    err_raw = np.mean((lg(x) - truth) ** 2)
    err_alra = np.mean((lg(out) - truth) ** 2)
    assert err_alra < 0.5 * err_raw
    assert out.min() >= 0 and out.shape == x.shape


def test_alra_fixed_k_validation():
    x = np.random.default_rng(0).poisson(2, (30, 20))
    with pytest.raises(ValueError, match="k must be between"):
        ALRAImputer(k=25).fit(x)
    assert ALRAImputer(k=2).fit(x).k_ == 2
