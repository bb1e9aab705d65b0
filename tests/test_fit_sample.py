"""Fits on a sample of rows (issue 16): a method's ``_fit_rows`` names the rows its fit reads;
``impute_file`` reads only those from the store for the fit (after one streaming pass for the
cells / genes with counts and all cells' totals) and every block again for the posterior, with
the numbers of the in-memory ``impute`` above the sample sizes too; below them nothing changes."""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import screpair
from screpair._chunks import TotalsPass, row_totals
from screpair.methods import _file
from screpair.methods._base import sample_rows, take_rows
from screpair.methods.alra import ALRAImputer
from screpair.methods.saver import SaverImputer

#: the fixture's 10 cells (and a few genes) without counts are set aside, with a warning
pytestmark = pytest.mark.filterwarnings("ignore:.*have no counts:UserWarning")


def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _kept(ad):
    """The counts of the cells and genes with counts, validated (float64 CSR)."""
    x = sp.csr_matrix(ad.X, dtype=np.float64)
    return x[np.diff(x.indptr) > 0][:, np.bincount(x.indices, minlength=x.shape[1]) > 0]


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_zarr(path) if str(path).endswith(".zarr") else anndata.read_h5ad(path)


@pytest.fixture(scope="module")
def sim300(tmp_path_factory):
    """300 cells x 100 genes (Splat, three groups), with 10 cells without counts (rows 0-9, so
    the kept cells' indices differ from the file's rows), as AnnData and as an .h5ad file."""
    from screpair import simulate

    ad = simulate.splat(n_obs=300, n_vars=100, group_prob=(0.3, 0.3, 0.4), de_prob=0.3,
                        de_fac_loc=0.5, lib_loc=7.0, dropout_mid=1.0, rng=0)
    x = ad.layers["counts"].tolil()
    x[:10] = 0
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    ad = anndata.AnnData(X=x, obs=ad.obs[[]], var=ad.var[[]])
    path = tmp_path_factory.mktemp("fit_sample") / "in.h5ad"
    screpair.write(ad, path)
    return ad, path


SAMPLED = {
    "alra": {"n_fit_cells": 60},
    "saver": {"n_fit_cells": 60},
    "dae": {"n_train_cells": 60, "train": {"n_epochs": 2}},
}


@pytest.mark.parametrize("method", sorted(SAMPLED))
def test_file_equals_memory_above_the_sample_size(sim300, tmp_path, method, one_torch_thread):
    ad, path = sim300
    params = SAMPLED[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 10 cells without counts
        ref = screpair.impute(ad, method, copy=True, **params)
        out = tmp_path / "out.zarr"
        rec = screpair.impute_file(path, out, method, chunk_rows=64, progress=False, **params)
    assert rec["fit_cells_read"] == 60 and rec["n_cells_set_aside"] == 10
    back = _read(out)
    for name in ref.layers:
        np.testing.assert_allclose(_dense(back.layers[name]), _dense(ref.layers[name]),
                                   rtol=1e-6, atol=0, err_msg=name)
    assert not _dense(back.layers[method])[:10].any()


@pytest.mark.parametrize(("method", "params", "cap"), [
    ("alra", {"k": 5}, "n_fit_cells"),
    ("saver", {"progress": False}, "n_fit_cells"),
])
def test_below_the_sample_size_nothing_changes(sim300, method, params, cap):
    """At or below the sample size the fit reads every cell and ``rng`` is not touched for a
    sample: the default equals ``None`` (no sample) bit for bit; no sample rows are asked for."""
    ad, _ = sim300
    cls = {"alra": ALRAImputer, "saver": SaverImputer}[method]
    x = _kept(ad)
    default = cls(rng=0, **params)
    assert default._fit_rows(x.shape[0]) is None and default._fit_rows(10**4) is None
    every = cls(rng=0, **params, **{cap: None})
    np.testing.assert_array_equal(default.fit_transform(x), every.fit_transform(x))
    assert default.fit_cells_ is None


def test_sample_rows_leave_the_generator_alone():
    gen = np.random.default_rng(3)
    rows = sample_rows(gen, 100, 20)
    again = np.sort(gen.choice(100, 20, replace=False))  # the fit's own draw: the same rows
    np.testing.assert_array_equal(rows, again)
    assert rows.size == 20 and np.all(np.diff(rows) > 0)
    assert sample_rows(0, 20, 20) is None and sample_rows(0, 20, None) is None


def test_totals_whatever_the_blocks(sim300):
    """All cells' totals by blocks (any size) == of the whole matrix, bit for bit; cells and
    genes without counts add nothing, so the kept cells' totals are those of the subset."""
    ad, _ = sim300
    x = sp.csr_matrix(ad.X, dtype=np.float64)
    whole = row_totals(x)
    acc = TotalsPass(*x.shape)
    for s in range(0, x.shape[0], 37):
        acc.add(s, x[s:s + 37])
    np.testing.assert_array_equal(acc.result().norm_sum, whole.norm_sum)
    np.testing.assert_array_equal(acc.result().library_size, whole.library_size)
    cells, genes = acc.cells, acc.genes
    assert cells.sum() == 290
    sub = row_totals(x[cells][:, genes])
    np.testing.assert_array_equal(acc.result().take(cells, genes).norm_sum, sub.norm_sum)
    lib = x.sum(1).A1
    np.testing.assert_allclose(whole.library_size, lib)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = np.nansum(x.toarray() / lib[:, None], axis=0)
    np.testing.assert_allclose(whole.norm_sum, ref, rtol=1e-12)


def test_the_fit_receives_only_the_sample(sim300, tmp_path, monkeypatch):
    """What ALRA's ``_fit`` gets from ``impute_file``: the 60 sampled kept cells' validated
    counts (rows of the kept cells, genes with counts), ``ctx.sample`` and all cells' totals;
    the same rows ``impute`` takes from its matrix in memory."""
    ad, path = sim300
    seen = []
    real = ALRAImputer._fit

    def spy(self, x, ctx):
        seen.append((x.copy(), ctx.sample, ctx.n_obs, ctx.totals))
        return real(self, x, ctx)

    monkeypatch.setattr(ALRAImputer, "_fit", spy)
    screpair.impute_file(path, tmp_path / "o.zarr", "alra", chunk_rows=64, progress=False,
                         n_fit_cells=60, k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        screpair.impute(ad, "alra", copy=True, n_fit_cells=60, k=5)
    (xf, sample, n, totals), (xm, sample_m, _, totals_m) = seen
    kept = _kept(ad)
    assert n == 290 and xf.shape == (60, kept.shape[1])
    np.testing.assert_array_equal(sample, sample_m)
    np.testing.assert_array_equal(sample, sample_rows(0, 290, 60))
    assert (xf != take_rows(kept, sample)).nnz == 0 and (xf != xm).nnz == 0
    assert xf.has_sorted_indices
    np.testing.assert_array_equal(totals.library_size, kept.sum(1).A1)
    np.testing.assert_array_equal(totals.norm_sum, totals_m.norm_sum)


def test_knn_all_counts_path_up_to_n_fit_cells(sim300, tmp_path, caplog):
    """knn up to ``n_fit_cells``: all counts in memory; above: its PCA sample, and every cell's
    counts in a temporary file next to the output (removed at the end)."""
    _, path = sim300
    with caplog.at_level("INFO", logger="screpair"):
        rec = screpair.impute_file(path, tmp_path / "o.zarr", "knn", chunk_rows=64,
                                   progress=False, k=5, n_pcs=5)
    assert rec["fit_cells_read"] is None
    assert "fit on all cells' counts" in caplog.text and "not more than its sample" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="screpair"):
        rec = screpair.impute_file(path, tmp_path / "s.zarr", "knn", chunk_rows=64,
                                   progress=False, k=5, n_pcs=5, n_fit_cells=100)
    assert rec["fit_cells_read"] == 100 and "fit on all cells' counts" not in caplog.text
    assert f"temporary file, read back by rows: {tmp_path}" in caplog.text
    assert not any(tmp_path.glob(".screpair-counts-*"))


def test_sampled_fit_memory_bounded_by_the_sample(tmp_path, traced_peak, monkeypatch):
    """40,000 cells x 200 genes (3.2 M counts: 38 MB as validated CSR): ALRA fitted on 300
    sampled cells, blocks of 500 cells. The run never holds all counts: its traced peak stays
    below half of them (the blocks' dense working arrays: 500 x 200 x 8 = 0.8 MB each; the
    writer's sparse buffer, 2^22 values by default, set to 2^15 here so that it is not what is
    measured). At density 0.2 (19 MB of counts) the traced peak was 14.6 MB, the all-counts
    path's (n_fit_cells=None, buffer 2^24) 143 MB."""
    from screpair._chunks import StoreWriter

    monkeypatch.setattr(StoreWriter, "buffer_nnz", 2**15)
    rng = np.random.default_rng(0)
    n, g = 40_000, 200
    x = sp.random(n, g, density=0.4, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    path = tmp_path / "big.h5ad"
    anndata.AnnData(X=x).write_h5ad(path)
    csr_bytes = x.nnz * 12
    del x
    rec, peak = traced_peak(lambda: screpair.impute_file(
        path, tmp_path / "o.zarr", "alra", chunk_rows=500, progress=False, n_fit_cells=300,
        k=5))
    assert rec["fit_cells_read"] == 300
    print(f"traced peak {peak / 1e6:.1f} MB, all counts {csr_bytes / 1e6:.1f} MB")
    assert peak < csr_bytes / 2, f"peak {peak / 1e6:.1f} MB"


def test_interrupted_sampled_run_leaves_no_output(sim300, tmp_path, monkeypatch):
    _, path = sim300

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(_file, "_write_blocks", stop)
    with pytest.raises(KeyboardInterrupt):
        screpair.impute_file(path, tmp_path / "o.zarr", "alra", progress=False,
                             n_fit_cells=60, k=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_alra_sample_close_to_all_cells(sim300):
    """ALRA fitted on 150 of 290 cells, completed by projection on the sample's V: on the
    sample's own rows it is ALRA fitted on those cells alone (the projection a V V^T of a
    sample row is its rank-k reconstruction up to the randomized SVD's range error); on all
    rows it differs from the all-cells fit as ALRA on 150 cells differs from ALRA on 290
    (measured here: log1p r 0.937 vs 0.935; 0.990 on 20,000 cells, see ALRAImputer)."""
    ad, _ = sim300
    x = _kept(ad)
    full = ALRAImputer(rng=0, k=5).fit_transform(x)
    part_est = ALRAImputer(rng=0, k=5, n_fit_cells=150)
    part = part_est.fit_transform(x)
    rows = part_est.fit_cells_
    assert part_est.lowrank_.us is None and rows.size == 150
    alone = ALRAImputer(rng=0, k=5).fit_transform(x[rows])
    a, b = np.log1p(full), np.log1p(part)
    assert np.all(np.isfinite(b)) and b.min() >= 0

    def r(u, v):
        return np.corrcoef(u.ravel(), v.ravel())[0, 1]

    assert r(b[rows], np.log1p(alone)) > 0.999
    assert r(a, b) > 0.9
    assert abs(r(a, b) - r(a[rows], np.log1p(alone))) < 0.02  # the sample's own variation
    observed = x.toarray() > 0
    assert np.all(part[observed] > 0)  # observed values are kept (restored if thresholded)


def test_alra_n_fit_cells_checked():
    with pytest.raises(ValueError, match="n_fit_cells"):
        ALRAImputer(n_fit_cells=3).fit(np.ones((40, 30)))


# --------------------------------------------------------------------------- cnn
CNN_TINY = {"module": {"n_hidden": 16},
            "train": {"n_epochs": 1, "batch_size": 32, "progress": False, "device": "cpu"}}
CNN_SAMPLED = {"n_train_cells": 60, "n_dropout_cells": 60, **CNN_TINY}


def test_cnn_file_equals_memory_above_the_sample_sizes(sim300, tmp_path, caplog,
                                                       one_torch_thread):
    """cnn above n_dropout_cells and n_train_cells (60 each of 290 cells): impute_file reads
    only the union of the two samples for the fit and writes what impute writes."""
    from screpair.methods.cnn import CNNImputer

    ad, path = sim300
    union = CNNImputer(rng=0, **CNN_SAMPLED)._fit_rows(290)
    assert 60 < union.size <= 120
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = screpair.impute(ad, "cnn", copy=True, **CNN_SAMPLED)
        with caplog.at_level("INFO", logger="screpair"):
            rec = screpair.impute_file(path, tmp_path / "o.zarr", "cnn", chunk_rows=64,
                                       progress=False, **CNN_SAMPLED)
    assert rec["fit_cells_read"] == union.size and rec["posterior_by_rows"]
    assert "fit on a sample of rows" in caplog.text
    back = _read(tmp_path / "o.zarr")
    for name in ("cnn", "dropout_prob"):
        np.testing.assert_array_equal(_dense(back.layers[name]),
                                      _dense(ref.layers[name]).astype(np.float32), name)
    assert (_dense(back.layers["cnn"]) != _dense(ad.X)).any()  # some zeros imputed


def test_cnn_sample_path_is_the_all_cells_fit(sim300, one_torch_thread):
    """Above both sample sizes the fit from the union's rows alone (the default path) is the
    fit on all cells that draws the two samples itself (``_fit`` on every row, the path of
    earlier releases): the same samples, dropout model, networks and output, bit for bit."""
    from screpair.methods._base import data_context
    from screpair.methods.cnn import CNNImputer

    ad, _ = sim300
    x = _kept(ad)
    ctx = data_context(x, x)
    every = CNNImputer(rng=0, **CNN_SAMPLED)
    every._check_params()
    every._fit(x, ctx)  # ctx.sample None: every row, both samples drawn inside
    sampled = CNNImputer(rng=0, **CNN_SAMPLED).fit(x)
    dm, dm_all = sampled.dropout_model_, every.dropout_model_
    np.testing.assert_array_equal(sampled.train_cells_, every.train_cells_)
    np.testing.assert_array_equal(dm.fit_cells_, dm_all.fit_cells_)
    assert dm.cell_rows_ is not None and dm_all.cell_rows_ is None  # sample / every cell
    np.testing.assert_array_equal(dm.cell_codes_, dm_all.cell_codes_[dm.fit_cells_])
    np.testing.assert_array_equal(sampled.input_index_, every.input_index_)
    np.testing.assert_array_equal(sampled.target_index_, every.target_index_)
    for (k, a), b in zip(sampled.module_.state_dict().items(),
                         every.module_.state_dict().values(), strict=True):
        assert (a == b).all(), k
    post, post_all = sampled.posterior(x), every._posterior(x, ctx)
    np.testing.assert_array_equal(post.mean, post_all.mean)
    assert (post.dropout_prob != post_all.dropout_prob).nnz == 0
    assert sampled.labels_ is None and every.labels_.shape == (290,)


def test_cnn_below_the_sample_sizes_nothing_changes(sim300, one_torch_thread):
    """Not above both sample sizes the fit reads every cell: no rows are asked for, and the
    defaults (10,000 / 50,000 on 290 cells) equal no sampling (None) bit for bit."""
    from screpair.methods.cnn import CNNImputer

    ad, _ = sim300
    x = _kept(ad)
    for kw in ({}, {"n_dropout_cells": 60}, {"n_train_cells": 60},
               {"n_train_cells": 60, "n_dropout_cells": None},
               {"n_train_cells": 60, "n_dropout_cells": 60, "groupby": "g"}):
        assert CNNImputer(rng=0, **kw)._fit_rows(290) is None, kw
    default = CNNImputer(rng=0, **CNN_TINY)
    none = CNNImputer(rng=0, n_dropout_cells=None, n_train_cells=None, **CNN_TINY)
    np.testing.assert_array_equal(default.fit_transform(x), none.fit_transform(x))
    assert default.train_cells_ is None and default.dropout_model_.fit_cells_ is None


def test_cnn_fit_receives_only_the_sample(sim300, tmp_path, monkeypatch, one_torch_thread):
    """What cnn's ``_fit`` and its dropout model's fit get from ``impute_file``: the union's
    validated rows only, the dropout model's 60 sampled rows; the samples lie in the union and
    are those ``impute`` draws from its matrix in memory."""
    from screpair.dropout import DropoutModel
    from screpair.methods.cnn import CNNImputer

    ad, path = sim300
    seen, fitted, dm_rows = [], [], []
    real, real_dm = CNNImputer._fit, DropoutModel.fit

    def spy(self, x, ctx):
        seen.append((x.copy(), ctx.sample, ctx.n_obs))
        fitted.append(self)
        return real(self, x, ctx)

    def spy_dm(self, x, **kw):
        dm_rows.append(x.shape[0])
        return real_dm(self, x, **kw)

    monkeypatch.setattr(CNNImputer, "_fit", spy)
    monkeypatch.setattr(DropoutModel, "fit", spy_dm)
    screpair.impute_file(path, tmp_path / "o.zarr", "cnn", chunk_rows=64, progress=False,
                         **CNN_SAMPLED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        screpair.impute(ad, "cnn", copy=True, **CNN_SAMPLED)
    (xf, sample, n), (xm, sample_m, _) = seen
    kept = _kept(ad)
    assert n == 290 and xf.shape == (sample.size, kept.shape[1]) and sample.size < 121
    np.testing.assert_array_equal(sample, sample_m)
    assert (xf != take_rows(kept, sample)).nnz == 0 and (xf != xm).nnz == 0
    assert dm_rows == [60, 60]
    for est in fitted:
        np.testing.assert_array_equal(
            np.union1d(est.train_cells_, est.dropout_model_.fit_cells_), sample)


def test_cnn_sample_with_a_generator_or_no_seed(sim300, one_torch_thread):
    """``_fit_rows`` leaves a Generator ``rng`` alone and names the rows its fit then takes;
    with ``rng=None`` (fresh entropy, drawn again by the fit) both samples are taken from the
    rows given."""
    from screpair.methods.cnn import CNNImputer

    ad, _ = sim300
    x = _kept(ad)
    gen = np.random.default_rng(5)
    state = gen.bit_generator.state
    est = CNNImputer(rng=gen, **CNN_SAMPLED)
    rows = est._fit_rows(290)
    assert gen.bit_generator.state == state
    est.fit(x)
    np.testing.assert_array_equal(np.union1d(est.train_cells_, est.dropout_model_.fit_cells_),
                                  rows)
    free = CNNImputer(rng=None, **CNN_SAMPLED)
    seen = []
    real = CNNImputer._fit

    def spy(self, x, ctx):
        seen.append(ctx.sample)
        return real(self, x, ctx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CNNImputer, "_fit", spy)
        out = free.fit_transform(x)
    given = seen[0]
    assert free.train_cells_.size == 60 and free.dropout_model_.fit_cells_.size == 60
    assert np.isin(free.train_cells_, given).all()
    assert np.isin(free.dropout_model_.fit_cells_, given).all()
    assert np.isfinite(out).all() and out.shape == x.shape
