"""Simulators with ground truth (issue 3): each simulator's statistics against its model."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from scipy.stats import norm

from screpair import simulate
from screpair.cli import main
from screpair.simulate import _degrade, _splat


def _same_csr(a, b) -> bool:
    a, b = sp.csr_matrix(a), sp.csr_matrix(b)
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )


def _same_sim(a: AnnData, b: AnnData) -> bool:
    return (
        all(_same_csr(a.layers[k], b.layers[k]) for k in ("counts", "true_counts", "dropout_mask"))
        and _same_csr(a.X, b.X)
        and a.obs.equals(b.obs)
        and a.var.equals(b.var)
    )


@pytest.fixture(scope="module")
def cnn():
    """The cnnImpute preset at full size (2000 x 4000), simulated once for this module."""
    return simulate.splat(preset="cnnimpute", rng=0)


# --------------------------------------------------------------------------- splat: structure


def test_splat_schema(sim):
    assert {"counts", "true_counts", "dropout_mask"} <= set(sim.layers)
    counts, truth, mask = (
        sim.layers[k].toarray() for k in ("counts", "true_counts", "dropout_mask")
    )
    assert sp.issparse(sim.layers["counts"]) and sp.issparse(sim.layers["true_counts"])
    assert mask.dtype == bool
    np.testing.assert_array_equal(sim.X.toarray(), counts)
    np.testing.assert_array_equal(counts, np.round(counts))  # integers
    # observed = truth where not dropped, 0 where dropped; the mask marks non-zero truths only
    np.testing.assert_array_equal(counts, np.where(mask, 0, truth))
    np.testing.assert_array_equal(mask, (truth > 0) & (counts == 0))
    assert isinstance(sim.obs["group"].dtype, pd.CategoricalDtype)
    assert list(sim.obs["group"].cat.categories) == ["Group1", "Group2", "Group3"]
    for col in ("base_gene_mean", "outlier_factor", "gene_mean", "DEFacGroup1", "DEFacGroup3"):
        assert col in sim.var
    assert sim.uns["simulate"]["method"] == "splat"
    # the fixture has no empty genes or cells, and a useful amount of dropout
    assert (np.asarray((counts > 0).sum(0)) > 0).all() and (
        np.asarray((counts > 0).sum(1)) > 0
    ).all()
    assert 0.45 <= (counts == 0).mean() <= 0.75
    assert 0.25 <= mask.sum() / (truth > 0).sum() <= 0.6


def test_splat_seeded_bit_identical(monkeypatch):
    # a small block size forces several blocks, the path large simulations take
    monkeypatch.setattr(_splat, "_BLOCK_ENTRIES", 1000)
    kw = {"group_prob": (0.2, 0.3, 0.5), "lib_loc": 8.0, "keep_intermediates": True}
    a = simulate.splat(120, 50, rng=7, **kw)
    b = simulate.splat(120, 50, rng=np.random.default_rng(7), **kw)
    c = simulate.splat(120, 50, rng=8, **kw)
    assert _same_sim(a, b)
    np.testing.assert_array_equal(a.layers["cell_means"], b.layers["cell_means"])
    assert not _same_csr(a.layers["true_counts"], c.layers["true_counts"])
    assert a.layers["cell_means"].shape == (120, 50)


# --------------------------------------------------------------------------- splat: streamed


def _read_store(path):
    return ad.read_h5ad(path) if str(path).endswith(".h5ad") else ad.read_zarr(path)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_splat_out_equals_in_memory_for_every_chunk_size(tmp_path, monkeypatch, fmt):
    # internal blocks of 20 cells (1000 entries / 50 genes): chunks smaller, equal and larger
    monkeypatch.setattr(_splat, "_BLOCK_ENTRIES", 1000)
    kw = {"group_prob": (0.3, 0.7), "lib_loc": 7.0, "dropout_type": "group",
          "dropout_mid": (0.0, 1.0), "rng": 4}
    mem = simulate.splat(130, 50, **kw)
    for chunk in (1, 20, 33, 1000):
        path = tmp_path / f"sim{chunk}.{fmt}"
        assert simulate.splat(130, 50, out=path, chunk_size=chunk, **kw) is None
        got = _read_store(path)  # plain anndata reads it
        assert _same_sim(got, mem)
        assert got.layers["dropout_mask"].dtype == bool and got.X.dtype == np.float32
        assert got.layers["dropout_mask"].nnz > 0 and got.obs["group"].nunique() == 2
        assert got.uns["simulate"]["method"] == "splat"
        assert got.uns["simulate"]["params"]["dropout_mid"].tolist() == [0.0, 1.0]
        assert got.uns["simulate"]["version"] == mem.uns["simulate"]["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"sim{c}.{fmt}" for c in (1, 20, 33, 1000))  # no temporary files left


def test_splat_out_memory_follows_the_chunk(tmp_path, monkeypatch, traced_peak):
    # a file 40x the chunk: peak memory is the chunk's and a few bytes per cell (group, library
    # size, name), not the file's; internal blocks of 81 cells (2^14 entries / 200 genes)
    monkeypatch.setattr(_splat, "_BLOCK_ENTRIES", 2**14)
    kw = {"lib_loc": 9.0, "chunk_size": 500, "rng": 0}
    _, small = traced_peak(lambda: simulate.splat(5000, 200, out=tmp_path / "a.h5ad", **kw))
    _, large = traced_peak(lambda: simulate.splat(20_000, 200, out=tmp_path / "b.h5ad", **kw))
    m = ad.read_h5ad(tmp_path / "b.h5ad")
    stored = sum(m.layers[k].data.nbytes + m.layers[k].indices.nbytes for k in m.layers)
    assert stored > 40e6  # the in-memory simulation holds at least this (besides X)
    assert large < 0.2 * stored, (large, stored)
    assert large - small < 300 * 15_000, (small, large)  # < 300 bytes per extra cell


def test_splat_out_checked_before_work_and_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sim.h5ad"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate.splat(20, 10, out=path, rng=0)
    with pytest.raises(ValueError, match=r"must be \.h5ad or \.zarr"):
        simulate.splat(20, 10, out=tmp_path / "sim.csv", rng=0)
    with pytest.raises(ValueError, match="keep_intermediates"):
        simulate.splat(20, 10, out=tmp_path / "new.h5ad", keep_intermediates=True, rng=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        simulate.splat(20, 10, out=tmp_path / "new.h5ad", chunk_size=0, rng=0)
    with pytest.raises(ValueError, match="only with out="):
        simulate.splat(20, 10, chunk_size=5, rng=0)

    draw = _splat._count_blocks

    def failing(*args):  # the second block fails: neither the old file nor a partial one changes
        blocks = draw(*args)
        yield next(blocks)
        msg = "disk full"
        raise RuntimeError(msg)

    monkeypatch.setattr(_splat, "_count_blocks", failing)
    monkeypatch.setattr(_splat, "_BLOCK_ENTRIES", 100)
    for out in (path, tmp_path / "new.zarr"):
        with pytest.raises(RuntimeError, match="disk full"):
            simulate.splat(50, 10, out=out, overwrite=True, chunk_size=1, rng=0)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.h5ad"]


def test_splat_preset_and_overrides():
    p = simulate.PRESETS["cnnimpute"]
    assert (p.n_obs, p.n_vars) == (2000, 4000)
    assert p.group_prob == (0.1, 0.1, 0.2, 0.2, 0.4)
    assert (p.dropout_shape, p.dropout_mid) == (-0.5, 1.0)
    d = simulate.PRESETS["default"]  # Splatter's documented defaults
    assert (d.mean_shape, d.mean_rate, d.lib_loc, d.lib_scale) == (0.6, 0.3, 11.0, 0.2)
    assert (d.out_prob, d.out_fac_loc, d.out_fac_scale) == (0.05, 4.0, 0.5)
    assert (d.de_prob, d.de_down_prob, d.de_fac_loc, d.de_fac_scale) == (0.1, 0.5, 0.1, 0.4)
    assert (d.bcv_common, d.bcv_df, d.dropout_mid, d.dropout_shape) == (0.1, 60.0, 0.0, -1.0)
    s = simulate.splat(preset="cnnimpute", n_obs=60, n_vars=30, dropout_mid=2.0, rng=0)
    assert s.shape == (60, 30)
    params = s.uns["simulate"]["params"]
    assert params["dropout_mid"] == 2.0 and params["dropout_shape"] == -0.5
    assert params["preset"] == "cnnimpute"
    assert [c for c in s.var if c.startswith("DEFac")] == [f"DEFacGroup{k}" for k in range(1, 6)]


def test_cnnimpute_preset_full_size(cnn):
    assert cnn.shape == (2000, 4000)
    freq = cnn.obs["group"].value_counts(normalize=True).sort_index().to_numpy()
    np.testing.assert_allclose(freq, [0.1, 0.1, 0.2, 0.2, 0.4], atol=0.04)
    assert cnn.layers["dropout_mask"].nnz > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "nope"}, "unknown preset"),
        ({"n_obs": 0}, "n_obs"),
        ({"group_prob": (0.0, 0.0)}, "group_prob"),
        ({"group_prob": (0.5, 0.5), "de_prob": (0.1, 0.2, 0.3)}, "one value per group"),
        ({"dropout_type": "cell", "dropout_mid": (1.0, 2.0)}, "length"),
        ({"dropout_type": "sometimes"}, "dropout_type"),
        ({"mean_shape": -1.0}, "mean_shape"),
        ({"out_prob": 1.5}, "out_prob"),
        ({"bcv_df": 0.0}, "bcv_df"),
    ],
)
def test_splat_rejects_bad_parameters(kwargs, match):
    kwargs = {"n_obs": 10, "n_vars": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate.splat(rng=0, **kwargs)


# --------------------------------------------------------------------------- splat: statistics


def test_library_sizes_match_lognormal(cnn):
    lib = cnn.obs["exp_lib_size"].to_numpy()
    # LogNormal(11, 0.2): mean exp(11 + 0.02); the sd of log is 0.2
    np.testing.assert_allclose(lib.mean(), np.exp(11 + 0.2**2 / 2), rtol=0.02)
    np.testing.assert_allclose(np.log(lib).std(), 0.2, atol=0.012)
    # E[true library] = expected library size (gamma means average to mu; Poisson to lambda)
    true_lib = np.asarray(cnn.layers["true_counts"].sum(1)).ravel()
    np.testing.assert_allclose(np.mean(true_lib / lib), 1.0, atol=0.01)


def test_lib_norm_draws_normal_library_sizes():
    s = simulate.splat(3000, 5, lib_norm=True, lib_loc=5000.0, lib_scale=500.0, rng=1)
    lib = s.obs["exp_lib_size"].to_numpy()
    np.testing.assert_allclose([lib.mean(), lib.std()], [5000.0, 500.0], rtol=0.05)


def test_gene_means_outliers_and_de_factors():
    n = 100_000
    s = simulate.splat(4, n, group_prob=(0.5, 0.5), rng=3, dropout_type="none")
    v = s.var
    base = v["base_gene_mean"].to_numpy()
    # Gamma(shape 0.6, rate 0.3): mean 2, variance 6.67
    np.testing.assert_allclose(base.mean(), 0.6 / 0.3, rtol=0.03)
    np.testing.assert_allclose(base.var(), 0.6 / 0.3**2, rtol=0.06)
    out = v["outlier_factor"].to_numpy()
    is_out = out != 1
    np.testing.assert_allclose(is_out.mean(), 0.05, atol=0.003)
    # outliers: median base mean times a LogNormal(4, 0.5) factor; others keep their base mean
    np.testing.assert_allclose(v["gene_mean"][is_out], np.median(base) * out[is_out], rtol=1e-12)
    np.testing.assert_array_equal(v["gene_mean"][~is_out], base[~is_out])
    np.testing.assert_allclose(np.log(out[is_out]).mean(), 4.0, atol=0.03)
    np.testing.assert_allclose(np.log(out[is_out]).std(), 0.5, atol=0.03)
    # DE factors: selected with de_prob 0.1, below 1 with de_down_prob 0.5, |log f| a folded normal
    mu, sd = 0.1, 0.4
    folded_mean = sd * np.sqrt(2 / np.pi) * np.exp(-(mu**2) / (2 * sd**2)) + mu * (
        1 - 2 * norm.cdf(-mu / sd)
    )
    for k in (1, 2):
        f = v[f"DEFacGroup{k}"].to_numpy()
        de = f != 1
        np.testing.assert_allclose(de.mean(), 0.1, atol=0.005)
        np.testing.assert_allclose((f[de] < 1).mean(), 0.5, atol=0.015)
        np.testing.assert_allclose(np.abs(np.log(f[de])).mean(), folded_mean, atol=0.01)


def test_group_de_fold_changes_recovered():
    s = simulate.splat(
        2000,
        500,
        group_prob=(0.5, 0.5),
        de_prob=0.3,
        de_fac_loc=1.0,
        de_fac_scale=0.3,
        dropout_type="none",
        rng=5,
    )
    v = s.var
    gm = v["gene_mean"].to_numpy()
    props = np.stack([gm * v[f"DEFacGroup{k}"].to_numpy() for k in (1, 2)])
    props /= props.sum(1, keepdims=True)
    expected = np.log(props[0] / props[1])  # includes the library-composition shift
    y = s.layers["true_counts"].toarray()
    frac = y / y.sum(1, keepdims=True)
    g = s.obs["group"].cat.codes.to_numpy()
    expressed = props.min(0) * np.exp(11) > 20  # >= 20 expected counts per cell in both groups
    est = np.log(frac[g == 0][:, expressed].mean(0) / frac[g == 1][:, expressed].mean(0))
    expected = expected[expressed]
    assert expressed.sum() > 200
    err = np.abs(est - expected)
    assert np.median(err) < 0.02
    assert np.quantile(err, 0.99) < 0.12
    de = (v["DEFacGroup1"] != v["DEFacGroup2"]).to_numpy()[expressed]
    slope = np.polyfit(expected[de], est[de], 1)[0]
    np.testing.assert_allclose(slope, 1.0, atol=0.03)


def test_bcv_mean_variance_trend():
    # fixed library size (lib_scale 0) and one group: every cell of gene g has the same mu_g
    s = simulate.splat(3000, 300, lib_scale=0.0, lib_loc=np.log(3000.0), dropout_type="none", rng=2)
    v = s.var
    mu = 3000.0 * v["gene_mean"].to_numpy() / v["gene_mean"].sum()
    phi = (0.1 + 1 / np.sqrt(mu)) * np.sqrt(60.0 / v["bcv_chi2"].to_numpy())
    expected_var = mu + mu**2 * phi**2  # gamma-Poisson: Poisson noise + BCV^2 mu^2
    y = s.layers["true_counts"].toarray()
    ok = mu > 0.5
    assert ok.sum() > 100
    np.testing.assert_allclose(np.median(y.mean(0)[ok] / mu[ok]), 1.0, atol=0.01)
    ratio = y.var(0, ddof=1)[ok] / expected_var[ok]
    np.testing.assert_allclose(np.median(ratio), 1.0, atol=0.04)
    # chi2(60) draws per gene: mean 60, variance 120
    chi = v["bcv_chi2"].to_numpy()
    np.testing.assert_allclose(chi.mean(), 60.0, atol=2.0)


def test_dropout_matches_logistic_curve():
    mid, shape = 1.0, -0.5
    s = simulate.splat(
        800, 400, lib_loc=9.0, dropout_mid=mid, dropout_shape=shape, keep_intermediates=True, rng=4
    )
    lam = s.layers["cell_means"]
    prob = s.layers["true_dropout_prob"]
    pos = lam > 0  # a gamma draw with a tiny shape can underflow to 0: then p = 1 (shape < 0)
    np.testing.assert_allclose(
        prob[pos], 1 / (1 + np.exp(-shape * (np.log(lam[pos]) - mid))), rtol=1e-10
    )
    np.testing.assert_array_equal(prob[~pos], 1.0)
    np.testing.assert_allclose(simulate.dropout_probability(lam, mid, shape), prob, rtol=1e-12)
    truth = s.layers["true_counts"].toarray()
    dropped = s.layers["dropout_mask"].toarray()
    nz = truth > 0
    # calibration: the dropout frequency among non-zero truths follows the curve in every bin
    loglam = np.log(lam[nz])  # a non-zero count implies lambda > 0
    edges = np.quantile(loglam, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, loglam, side="right") - 1, 0, 9)
    for b in range(10):
        sel = bins == b
        assert sel.sum() > 5000
        np.testing.assert_allclose(dropped[nz][sel].mean(), prob[nz][sel].mean(), atol=0.015)
    np.testing.assert_allclose(dropped.sum(), prob[nz].sum(), rtol=0.01)


def test_dropout_per_group_and_none():
    s = simulate.splat(
        400,
        50,
        group_prob=(0.5, 0.5),
        lib_loc=8.0,
        dropout_type="group",
        dropout_mid=(-30.0, 30.0),
        dropout_shape=(-1.0, -1.0),
        rng=0,
    )
    g = s.obs["group"].cat.codes.to_numpy()
    truth = s.layers["true_counts"].toarray()
    dropped = s.layers["dropout_mask"].toarray()
    # mid -30: p = expit(-30 - log lambda) ~ 0; mid 30: p ~ 1 for every lambda < e^30
    assert dropped[g == 0].sum() == 0
    np.testing.assert_array_equal(dropped[g == 1], truth[g == 1] > 0)
    per_cell = simulate.splat(
        3, 40, lib_loc=8.0, dropout_type="cell", dropout_mid=(-30.0, 30.0, -30.0), rng=0
    )
    assert per_cell.layers["dropout_mask"][[0, 2]].nnz == 0
    none = simulate.splat(50, 40, lib_loc=6.0, dropout_type="none", rng=0)
    assert none.layers["dropout_mask"].nnz == 0
    assert _same_csr(none.layers["counts"], none.layers["true_counts"])


# --------------------------------------------------------------------------- degrade


def test_degrade_log_bias_is_exact():
    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, 1.0, (5, 6))
    length = np.array([500.0, 1000, 2000, 2000, 4000, 8000])  # median 2000
    out = simulate.degrade_log(
        y, bias_3p=np.array([0.0, 0.1, 0.5, 1.0, 2.0]), gene_length=length, rng=0
    )
    b = np.array([0.0, 0.1, 0.5, 1.0, 2.0])[:, None]
    np.testing.assert_allclose(out.retention, np.exp(-b * length / 2000.0), rtol=1e-14)
    np.testing.assert_allclose(out.log, y * np.exp(-b * length / 2000.0), rtol=1e-14)
    assert not out.dropped.any()
    # longer transcripts keep less signal
    assert np.all(np.diff(out.retention[1:], axis=1) <= 0)


def test_degrade_log_noise_and_dropout_statistics():
    n, g = 1000, 200
    y = np.full((n, g), 5.0)
    y[:, :100] = 0.0
    out = simulate.degrade_log(y, noise_sd=0.3, dropout_rate=0.25, gene_length=np.ones(g), rng=1)
    keep = ~out.dropped
    np.testing.assert_allclose(out.dropped.mean(), 0.25, atol=0.005)
    resid = (out.log - 5.0)[:, 100:][keep[:, 100:]]  # 5 + N(0, 0.3^2) is never clipped
    np.testing.assert_allclose(resid.mean(), 0.0, atol=0.005)
    np.testing.assert_allclose(resid.std(), 0.3, rtol=0.01)
    zeros = out.log[:, :100]  # max(0, N(0, s^2)): half positive, mean s / sqrt(2 pi)
    np.testing.assert_allclose((zeros > 0).mean(), 0.5, atol=0.005)
    np.testing.assert_allclose(zeros.mean(), 0.3 / np.sqrt(2 * np.pi), rtol=0.02)
    assert out.log.min() >= 0.0


def test_degrade_identity_without_damage(sim):
    deg = simulate.degrade(sim, layer="true_counts", rng=0)
    assert _same_csr(deg.layers["counts"], sim.layers["true_counts"])
    assert _same_csr(deg.layers["true_counts"], sim.layers["true_counts"])
    assert deg.layers["dropout_mask"].nnz == 0


def test_degrade_dropout_and_truth(cnn):
    deg = simulate.degrade(cnn, layer="true_counts", dropout_rate=0.3, rng=0)
    clean = cnn.layers["true_counts"]
    mask = deg.layers["dropout_mask"]
    np.testing.assert_allclose(mask.nnz / clean.nnz, 0.3, atol=0.003)
    counts = deg.layers["counts"]
    assert _same_csr(counts, clean - clean.multiply(mask))  # untouched elsewhere, 0 where dropped
    assert _same_csr(deg.layers["true_counts"], clean)
    np.testing.assert_allclose(
        deg.obs["clean_library_size"], np.asarray(clean.sum(1)).ravel(), rtol=1e-6
    )


def test_degrade_bias_back_to_counts(sim):
    length = np.linspace(500, 5000, sim.n_vars)
    deg = simulate.degrade(sim, bias_3p=0.5, gene_length=length, rounding="none", rng=0)
    x = sim.layers["counts"].toarray().astype(np.float64)
    lib = x.sum(1, keepdims=True)
    expected = (
        np.expm1(np.log1p(x / lib * 1e4) * np.exp(-0.5 * length / np.median(length))) * lib / 1e4
    )
    np.testing.assert_allclose(deg.layers["counts"].toarray(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deg.var["gene_length"], length)


def test_degrade_stochastic_rounding_unbiased(cnn):
    # 500 x 4000 is one block: both calls make the same damage draws, and differ by rounding only
    sub = cnn[:500].copy()
    kw = {"layer": "true_counts", "bias_3p": 0.3, "noise_sd": 0.2, "rng": 0}
    raw = simulate.degrade(sub, rounding="none", **kw).layers["counts"].toarray().astype(np.float64)
    rounded = simulate.degrade(sub, rounding="stochastic", **kw).layers["counts"].toarray()
    nearest = simulate.degrade(sub, rounding="nearest", **kw).layers["counts"].toarray()
    np.testing.assert_array_equal(rounded, np.round(rounded))
    # floor or ceil of the exact value, and unbiased: the sum of n Bernoulli(frac) draws
    assert np.all((rounded == np.floor(raw + 1e-6)) | (rounded == np.ceil(raw - 1e-6)))
    frac = raw - np.floor(raw)
    sd = np.sqrt((frac * (1 - frac)).sum())
    assert abs(rounded.sum() - raw.sum()) < 5 * sd
    assert np.abs(nearest - raw).max() <= 0.5 + 1e-4  # raw is stored as float32
    assert rounded.min() >= 0


def test_degrade_per_cell_parameters(sim):
    n = sim.n_obs
    rates = np.where(np.arange(n) % 2 == 0, 0.0, 0.9)
    deg = simulate.degrade(sim, bias_3p=(0.2, 0.8), dropout_rate=rates, noise_sd=0.05, rng=3)
    b = deg.obs["degrade_bias_3p"].to_numpy()
    assert b.min() >= 0.2 and b.max() <= 0.8 and b.max() - b.min() > 0.4
    np.testing.assert_array_equal(deg.obs["degrade_dropout_rate"], rates)
    np.testing.assert_array_equal(deg.obs["degrade_noise_sd"], np.full(n, 0.05))
    mask = deg.layers["dropout_mask"].toarray()
    nz = sim.layers["counts"].toarray() > 0
    assert mask[::2].sum() == 0
    np.testing.assert_allclose(mask[1::2].sum() / nz[1::2].sum(), 0.9, atol=0.02)
    assert deg.uns["degrade"]["params"]["dropout_rate"] == "per cell (see obs)"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_rate": 1.5}, "dropout_rate"),
        ({"bias_3p": -0.1}, "bias_3p"),
        ({"noise_sd": (0.5, 0.1)}, "low <= high"),
        ({"noise_sd": (0.1, 0.2, 0.3)}, "range"),
        ({"dropout_rate": [0.1, 0.2]}, "one value per cell"),
        ({"gene_length": np.ones(3)}, "gene_length"),
        ({"rounding": "up"}, "rounding"),
    ],
)
def test_degrade_rejects_bad_parameters(sim, kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate.degrade(sim, rng=0, **kwargs)


def test_degrade_gene_lengths(sim, caplog):
    with caplog.at_level(logging.INFO, logger="screpair"):
        a = simulate.degrade(sim, bias_3p=0.5, rng=0)
    assert any("no gene lengths given" in r.getMessage() for r in caplog.records)
    # stand-in lengths depend only on the gene name: same in every call, order or subset
    np.testing.assert_array_equal(a.var["gene_length"], simulate.default_gene_length(sim.var_names))
    sub = simulate.default_gene_length(sim.var_names[::-1][:10])
    np.testing.assert_array_equal(sub, a.var["gene_length"].to_numpy()[::-1][:10])
    many = simulate.default_gene_length([f"g{i}" for i in range(20000)])
    np.testing.assert_allclose(np.median(many), 2000.0, rtol=0.03)
    np.testing.assert_allclose(np.log(many).std(), 0.7, atol=0.02)
    # a var column is used when present (by default name, or by the name given)
    withlen = sim.copy()
    withlen.var["gene_length"] = np.arange(1, sim.n_vars + 1) * 100.0
    withlen.var["tx_len"] = np.full(sim.n_vars, 1000.0)
    b = simulate.degrade(withlen, bias_3p=0.5, rng=0)
    np.testing.assert_array_equal(b.var["gene_length"], withlen.var["gene_length"])
    c = simulate.degrade(withlen, bias_3p=0.5, gene_length="tx_len", rng=0)
    np.testing.assert_array_equal(c.var["gene_length"], 1000.0)
    with pytest.raises(KeyError, match="not found"):
        simulate.degrade(withlen, gene_length="missing", rng=0)


def test_degrade_seeded_and_input_untouched(sim):
    before = sim.copy()
    kw = {"bias_3p": (0.0, 1.0), "dropout_rate": (0.0, 0.5), "noise_sd": (0.0, 0.4)}
    a = simulate.degrade(sim, rng=11, **kw)
    b = simulate.degrade(sim, rng=np.random.default_rng(11), **kw)
    c = simulate.degrade(sim, rng=12, **kw)
    assert _same_sim(a, b)
    assert not _same_csr(a.layers["counts"], c.layers["counts"])
    assert _same_sim(sim, before)


@pytest.mark.parametrize("array_type", [np.asarray, sp.csr_matrix])
def test_degrade_counts_is_the_core_of_degrade(sim, array_type):
    kw = {"bias_3p": (0.0, 1.0), "dropout_rate": 0.3, "noise_sd": (0.0, 0.4), "rng": 5}
    a = simulate.degrade(sim, layer="true_counts", **kw)
    x = sim.layers["true_counts"]
    out = simulate.degrade_counts(
        array_type(x.toarray() if array_type is np.asarray else x),
        gene_length=simulate.default_gene_length(sim.var_names),
        **kw,
    )
    assert _same_csr(out.counts, a.layers["counts"])
    assert _same_csr(out.dropout_mask, a.layers["dropout_mask"])
    np.testing.assert_array_equal(out.bias_3p, a.obs["degrade_bias_3p"])
    np.testing.assert_array_equal(out.noise_sd, a.obs["degrade_noise_sd"])
    np.testing.assert_array_equal(out.library_size, a.obs["clean_library_size"])
    with pytest.raises(ValueError, match="gene_length has 3 values but the data have"):
        simulate.degrade_counts(x, gene_length=np.ones(3), rng=0)
    with pytest.raises(ValueError, match="non-integer"):
        simulate.degrade_counts(x * 0.5, gene_length=np.ones(sim.n_vars), rng=0)


# --------------------------------------------------------------------------- mask


def test_mask_hand_computed():
    x = np.array([[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0]], dtype=float)
    adata = AnnData(sp.csr_matrix(x))
    # detected in 4/4, 2/4, 1/4 cells: genes 0 and 1 are eligible at 0.5; 6 non-zeros, half masked
    masked, m = simulate.mask(adata, frac=0.5, min_frac_cells=0.5, rng=0)
    md = m.toarray()
    assert md.sum() == 3
    assert not md[:, 2].any() and np.all(x[md] > 0)
    np.testing.assert_array_equal(masked.layers["counts"].toarray(), np.where(md, 0, x))
    np.testing.assert_array_equal(masked.X.toarray(), np.where(md, 0, x))
    np.testing.assert_array_equal(masked.layers["true_counts"].toarray(), x)
    np.testing.assert_array_equal(masked.layers["dropout_mask"].toarray(), md)
    np.testing.assert_array_equal(masked.var["mask_eligible"], [True, True, False])
    assert masked.uns["mask"]["n_masked"] == 3


def test_mask_fraction_and_uniformity(cnn):
    masked, m = simulate.mask(cnn, layer="counts", frac=0.1, rng=0)
    x = cnn.layers["counts"]
    elig = masked.var["mask_eligible"].to_numpy()
    np.testing.assert_array_equal(elig, (np.asarray((x > 0).sum(0)).ravel() / x.shape[0]) >= 0.5)
    nz_elig = x[:, elig].nnz
    assert m.nnz == round(0.1 * nz_elig)
    assert m[:, ~elig].nnz == 0
    # masked entries are spread evenly over the eligible genes
    per_gene = np.asarray(m[:, elig].sum(0)).ravel() / np.asarray((x[:, elig] > 0).sum(0)).ravel()
    np.testing.assert_allclose(per_gene.mean(), 0.1, atol=0.003)
    assert per_gene.max() < 0.2
    assert masked.layers["counts"].multiply(m).nnz == 0
    assert _same_csr(masked.layers["counts"], x - x.multiply(m))  # only the masked entries change
    assert _same_csr(masked.layers["true_counts"], x)


def test_mask_seeded():
    s = simulate.splat(100, 50, lib_loc=8.0, rng=0)
    a, ma = simulate.mask(s, layer="counts", rng=1)
    b, mb = simulate.mask(s, layer="counts", rng=1)
    _, mc = simulate.mask(s, layer="counts", rng=2)
    assert _same_sim(a, b) and _same_csr(ma, mb)
    assert not _same_csr(ma, mc)
    with pytest.raises(ValueError, match="frac"):
        simulate.mask(s, frac=1.5)


# --------------------------------------------------------------------------- MCV


def test_mcv_split_exact_and_binomial(cnn):
    x = cnn.layers["true_counts"]
    train, test = simulate.mcv_split(cnn, layer="true_counts", train_frac=0.9, rng=0)
    assert _same_csr((train.X + test.X).astype(np.float64), x.astype(np.float64))  # exact
    assert _same_csr(train.X, train.layers["counts"]) and _same_csr(test.X, test.layers["counts"])
    assert train.X.min() >= 0 and test.X.min() >= 0
    np.testing.assert_allclose(train.X.sum() / x.sum(), 0.9, atol=0.001)
    # thinning is binomial: for entries equal to k, train ~ Binomial(k, 0.9)
    xd, td = x.toarray(), train.X.toarray()
    for k in (1, 5, 20):
        t = td[xd == k]
        assert t.size > 2000
        np.testing.assert_allclose(t.mean(), 0.9 * k, rtol=0.01)
        np.testing.assert_allclose(t.var(), k * 0.9 * 0.1, rtol=0.08)
    assert train.uns["mcv"]["split"] == "train" and test.uns["mcv"]["split"] == "test"


def test_mcv_split_seeded_and_validated(sim):
    a = simulate.mcv_split(sim, rng=3)
    b = simulate.mcv_split(sim, rng=3)
    assert _same_csr(a[0].X, b[0].X) and _same_csr(a[1].X, b[1].X)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="train_frac"):
            simulate.mcv_split(sim, train_frac=bad)
    noninteger = AnnData(sp.csr_matrix(np.array([[0.5, 1.0], [2.0, 0.0]])))
    with pytest.raises(ValueError, match="non-integer"):
        simulate.mcv_split(noninteger)


# --------------------------------------------------------------------------- CLI


def test_cli_simulate_and_degrade(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    rc = main(
        [
            "simulate",
            str(out),
            "--n-obs",
            "60",
            "--n-vars",
            "40",
            "--lib-loc",
            "8",
            "--group-prob",
            "0.5,0.5",
            "--seed",
            "3",
            "-q",
        ]
    )
    assert rc == 0
    back = ad.read_h5ad(out)
    ref = simulate.splat(60, 40, lib_loc=8.0, group_prob=(0.5, 0.5), rng=3)
    for k in ("counts", "true_counts", "dropout_mask"):
        assert _same_csr(back.layers[k], ref.layers[k])
    deg_path = tmp_path / "deg.h5ad"
    rc = main(
        [
            "degrade",
            str(out),
            str(deg_path),
            "--layer",
            "true_counts",
            "--bias-3p",
            "0.1,0.9",
            "--dropout-rate",
            "0.2",
            "--noise-sd",
            "0.1",
            "--seed",
            "4",
            "-q",
        ]
    )
    assert rc == 0
    deg = ad.read_h5ad(deg_path)
    ref_deg = simulate.degrade(
        ref, layer="true_counts", bias_3p=(0.1, 0.9), dropout_rate=0.2, noise_sd=0.1, rng=4
    )
    assert _same_csr(deg.layers["counts"], ref_deg.layers["counts"])
    assert "degraded" in capsys.readouterr().out
    rc = main(["degrade", str(out), str(deg_path), "--bias-3p", "1,2,3", "--overwrite", "-q"])
    assert rc == 2
    assert "LOW,HIGH" in capsys.readouterr().err
    before = deg_path.read_bytes()
    rc = main(["degrade", str(out), str(deg_path), "--dropout-rate", "1.5", "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--dropout-rate must be in [0, 1], got 1.5" in err and len(err) < 200
    assert deg_path.read_bytes() == before


def test_splat_like_alias():
    assert simulate.splat_like is simulate.splat
    assert _degrade.DEFAULT_LENGTH_SDLOG == 0.7


def test_dense_and_sparse_inputs_agree(sim, array_type):
    x = array_type(sim.layers["counts"].toarray())
    adata = AnnData(x, obs=sim.obs.copy(), var=sim.var.copy())
    ref = AnnData(sim.layers["counts"].copy(), obs=sim.obs.copy(), var=sim.var.copy())
    kw = {"bias_3p": 0.3, "dropout_rate": 0.1, "noise_sd": 0.1, "rng": 0}
    assert _same_sim(simulate.degrade(adata, **kw), simulate.degrade(ref, **kw))
    a, ma = simulate.mask(adata, rng=0)
    b, mb = simulate.mask(ref, rng=0)
    assert _same_sim(a, b) and _same_csr(ma, mb)
    for s, t in zip(simulate.mcv_split(adata, rng=0), simulate.mcv_split(ref, rng=0), strict=True):
        assert _same_csr(s.X, t.X)
