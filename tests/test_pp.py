"""Preprocessing: hand-computed values, sparse/dense agreement, AnnData contract."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

import screpair
from screpair.pp import hvg_dispersion

X = np.array([[1, 0, 3], [0, 0, 0], [2, 2, 4]], dtype=float)


def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def test_normalize_and_log1p(array_type):
    out = _dense(screpair.pp.normalize(array_type(X), target_sum=100))  # empty row stays zero
    np.testing.assert_allclose(out, [[25, 0, 75], [0, 0, 0], [25, 25, 50]], rtol=1e-12)
    lg = _dense(screpair.pp.log1p(array_type(out), base=2))
    np.testing.assert_allclose(lg[0], np.log2([26, 1, 76]), rtol=1e-12)


def test_normalize_keeps_sparsity():
    out = screpair.pp.normalize(sp.csr_matrix(X[[0, 2]]))
    assert sp.issparse(out) and out.nnz == 5


def test_size_factors_anndata(counts_adata):
    ad = counts_adata.copy()
    assert screpair.pp.size_factors(ad) is None
    lib = np.asarray(ad.X.sum(1), dtype=np.float64).ravel()
    np.testing.assert_allclose(ad.obs["size_factor"], lib / lib.mean(), rtol=1e-12)
    np.testing.assert_allclose(ad.obs["size_factor"].mean(), 1.0, rtol=1e-12)


def test_layers_written_not_x(counts_adata):
    ad = counts_adata.copy()
    x0 = ad.X.copy()
    out = screpair.pp.normalize(ad, copy=True)
    assert "normalized" in out.layers and "normalized" not in ad.layers
    screpair.pp.log1p(out, layer="normalized")
    assert (out.X != x0).nnz == 0
    np.testing.assert_allclose(out.layers["log1p"].toarray(), np.log1p(out.layers["normalized"].toarray()))


def test_filters(counts_adata):
    ad = counts_adata.copy()
    n_cells = np.asarray((ad.X > 0).sum(0)).ravel()
    out = screpair.pp.filter_genes(ad, min_cells=60, copy=True)
    assert out.n_vars == (n_cells >= 60).sum()
    np.testing.assert_array_equal(out.var["n_cells"], n_cells[n_cells >= 60])
    lib = np.asarray(ad.X.sum(1)).ravel()
    thr = np.median(lib)
    screpair.pp.filter_cells(ad, min_counts=thr)
    assert ad.n_obs == (lib >= thr).sum()


def test_hvg_picks_variable_genes():
    rng = np.random.default_rng(0)
    n, g = 500, 300
    mu = np.exp(rng.uniform(np.log(0.5), np.log(20), g))
    counts = rng.poisson(mu, size=(n, g)).astype(float)
    hv = np.array([10, 80, 150, 220, 290])  # very overdispersed genes (negative binomial, r=0.5)
    counts[:, hv] = rng.negative_binomial(0.5, 0.5 / (0.5 + mu[hv]), size=(n, len(hv)))
    mask = screpair.pp.highly_variable_genes(sp.csr_matrix(counts), n_top_genes=5)
    np.testing.assert_array_equal(np.flatnonzero(mask), hv)
    df = hvg_dispersion(counts, 5)
    xn = counts / counts.sum(1, keepdims=True) * 1e4
    np.testing.assert_allclose(df["mean"].to_numpy(), xn.mean(0), rtol=1e-10)
    np.testing.assert_allclose(
        df["dispersion"].to_numpy(), np.log(xn.var(0, ddof=1) / xn.mean(0) + 1e-12), rtol=1e-8
    )
