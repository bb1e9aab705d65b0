"""The dropout model fitted on a sample, probabilities by row blocks; cnn by row blocks (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

import screpair
from screpair import simulate
from screpair.dropout import DropoutModel, cluster_cells, fit_dropout, fit_zinb_dropout
from screpair.dropout._model import row_fingerprints
from screpair.methods.cnn import CNNImputer

TINY = dict(module={"n_hidden": 16},
            train={"n_epochs": 2, "batch_size": 32, "progress": False, "device": "cpu"})


@pytest.fixture(scope="module")
def separated():
    """600 cells x 300 genes in three well-separated groups (Splat, strong DE)."""
    ad = simulate.splat(n_obs=600, n_vars=300, group_prob=(0.4, 0.35, 0.25), de_prob=0.4,
                        rng=0)
    x = sp.csr_matrix(ad.X, dtype=np.float64)
    keep = np.asarray((x != 0).sum(0)).ravel() > 0
    return x[:, keep], np.asarray(ad.obs["group"].astype(str))


def _blocks(dm, x, size):
    n = x.shape[0]
    parts = [dm.probabilities(x[a:a + size], rows=slice(a, min(a + size, n)))
             for a in range(0, n, size)]
    return sp.vstack([p for p, _ in parts]).tocsr(), np.concatenate([lab for _, lab in parts])


def test_row_fingerprints_same_for_dense_sparse_and_blocks():
    x = sp.random(50, 20, density=0.3, random_state=0, format="csr") * 10
    x.data = np.round(x.data)
    full = row_fingerprints(x)
    np.testing.assert_array_equal(full, row_fingerprints(x.toarray()))
    np.testing.assert_array_equal(full[10:20], row_fingerprints(x[10:20]))
    y = x.copy().tolil()
    y[3, 0] = y[3, 0] + 1
    changed = row_fingerprints(y.tocsr()) != full
    assert changed.tolist() == [i == 3 for i in range(50)]


@pytest.mark.parametrize("model", ["zinb", "scimpute"])
def test_all_cells_equals_the_fit_functions_and_blocks_stack(separated, model):
    """Below n_fit_cells every cell is used: exactly the functions' probabilities on all cells;
    by row blocks, the same probabilities bit for bit."""
    x, _ = separated
    dm = DropoutModel(model=model, n_fit_cells=1000, rng=0).fit(x)
    assert dm.fit_cells_ is None
    labels = cluster_cells(x, rng=0).labels
    fn = fit_zinb_dropout if model == "zinb" else fit_dropout
    ref = fn(x, labels).prob
    assert (dm.prob_ != ref).nnz == 0 and dm.prob_.nnz == ref.nnz
    np.testing.assert_array_equal(dm.labels_, labels.astype(str))
    for size in (64, 250):
        prob, lab = _blocks(dm, x, size)
        assert (prob != dm.prob_).nnz == 0
        np.testing.assert_array_equal(lab, dm.labels_)


def test_new_cells_are_assigned_by_nearest_sampled_neighbours(separated):
    """Cells not recognised as fitted rows (here: the rows in reverse order) are assigned by
    their nearest sampled neighbours: nearly always their own fitted cluster."""
    x, _ = separated
    dm = DropoutModel(n_fit_cells=1000, rng=0).fit(x)
    rev = x[::-1]
    prob, lab = dm.probabilities(rev, rows=slice(0, x.shape[0]))
    agree = np.mean(lab == dm.labels_[::-1])
    assert agree >= 0.99, agree
    same = lab == dm.labels_[::-1]
    # where the cluster agrees, the probabilities are the fitted ones
    np.testing.assert_array_equal(prob[same].toarray(), dm.prob_[::-1][same].toarray())


def test_sample_assignment_and_probabilities(separated):
    """Clustering 200 of 600 cells: every other cell joins a cluster by nearest neighbours;
    the partition matches the whole-data clustering (ARI >= 0.9) and the simulated groups;
    the probabilities of the unsampled cells by blocks equal the fit's."""
    x, groups = separated
    whole = DropoutModel(rng=0).fit(x)
    dm = DropoutModel(n_fit_cells=200, rng=0).fit(x)
    assert dm.fit_cells_.size == 200 and dm.prob_ is None  # not held for every cell
    ari_whole = adjusted_rand_score(whole.labels_, dm.labels_)
    ari_truth = adjusted_rand_score(groups, dm.labels_)
    assert ari_whole >= 0.9, ari_whole
    assert ari_truth >= 0.9, ari_truth
    prob, lab = _blocks(dm, x, 100)
    whole_rows, lab_all = dm.probabilities(x, rows=slice(0, x.shape[0]))
    assert (prob != whole_rows).nnz == 0
    np.testing.assert_array_equal(lab, dm.labels_)
    np.testing.assert_array_equal(lab_all, dm.labels_)
    # the sample's probabilities agree with the whole-data fit's
    a, b = whole.prob_.toarray(), prob.toarray()
    both = (a > 0) | (b > 0)
    assert np.corrcoef(a[both], b[both])[0, 1] >= 0.95
    # reproducible
    again = DropoutModel(n_fit_cells=200, rng=0).fit(x)
    np.testing.assert_array_equal(again.labels_, dm.labels_)
    assert (again.probabilities(x)[0] != dm.probabilities(x)[0]).nnz == 0


def test_probability_pass_memory_bounded_by_the_block(separated, traced_peak):
    """The probabilities of 50 rows take working memory of the order of 50 rows x genes,
    not of the fitted cells (traced numpy / scipy allocations)."""
    x, _ = separated
    dm = DropoutModel(n_fit_cells=200, rng=0).fit(x)
    new = x[::-1][:50]  # not fitted rows: the neighbour search runs too
    _, peak50 = traced_peak(lambda: dm.probabilities(new))
    _, peak_all = traced_peak(lambda: dm.probabilities(x[::-1]))
    block = 50 * x.shape[1] * 8  # one dense float64 block
    assert peak50 <= 25 * block, (peak50, block)
    assert peak50 <= 0.25 * peak_all, (peak50, peak_all)


def test_labels_given_stratified_sample_and_errors(separated):
    x, groups = separated
    dm = DropoutModel(n_fit_cells=90, rng=0).fit(x, labels=groups)
    counts = {g: int(np.sum(groups[dm.fit_cells_] == g)) for g in np.unique(groups)}
    full = {g: int(np.sum(groups == g)) for g in np.unique(groups)}
    for g in counts:  # each group keeps its share of the sample
        assert abs(counts[g] - 90 * full[g] / 600) <= 1
    prob, lab = dm.probabilities(x[:40], labels=groups[:40])
    whole, _ = dm.probabilities(x, labels=groups)
    assert (prob != whole[:40]).nnz == 0 and prob.nnz > 0
    np.testing.assert_array_equal(lab, groups[:40])
    with pytest.raises(ValueError, match="pass labels="):
        dm.probabilities(x[:5])
    with pytest.raises(ValueError, match="not seen in fit"):
        dm.probabilities(x[:2], labels=["Group1", "nope"])
    for bad in (3, 100.5, True):  # a float or a bool is no number of cells
        with pytest.raises(ValueError, match="n_fit_cells must be None or an integer >= 10"):
            DropoutModel(n_fit_cells=bad).fit(x)


def test_state_round_trip(separated):
    x, _ = separated
    dm = DropoutModel(n_fit_cells=200, rng=0).fit(x)
    meta, arrays = dm.state()
    json.dumps(meta)
    back = DropoutModel.from_state(json.loads(json.dumps(meta)), arrays)
    for rows in (slice(0, 600), None):
        p1, l1 = dm.probabilities(x, rows=rows)
        p2, l2 = back.probabilities(x, rows=rows)
        assert (p1 != p2).nnz == 0
        np.testing.assert_array_equal(l1, l2)


def test_fit_from_the_sample_rows_alone(separated):
    """``draw`` names the rows ``fit`` samples and advances the generator as ``fit`` does
    (the clustering's draws included: here ADPclust's subsample too); ``fit`` on those rows
    alone (``rows=``, ``n_obs=``) is the fit on all cells: the same clusters and parameters,
    and the other cells, assigned when their probabilities are asked for, get the same
    probabilities and labels, by blocks too, and after a state round trip."""
    x, _ = separated
    kw = dict(n_fit_cells=200, cluster_kwargs={"adp_max_cells": 100})
    gen = np.random.default_rng(0)
    drawn = DropoutModel(**kw).draw(gen, 600)
    after = gen.integers(2**62)
    gen_all, gen_part = np.random.default_rng(0), np.random.default_rng(0)
    whole = DropoutModel(rng=gen_all, **kw).fit(x)
    part = DropoutModel(rng=gen_part, **kw).fit(x[drawn], rows=drawn, n_obs=600)
    assert gen_all.integers(2**62) == after and gen_part.integers(2**62) == after
    np.testing.assert_array_equal(drawn, whole.fit_cells_)
    np.testing.assert_array_equal(part.fit_cells_, drawn)
    np.testing.assert_array_equal(part.cell_rows_, drawn)
    for k, v in whole.params_.items():
        np.testing.assert_array_equal(part.params_[k], v, err_msg=k)
    np.testing.assert_array_equal(part.labels_, whole.labels_[drawn])
    ref, ref_lab = whole.probabilities(x, rows=slice(0, 600))
    for size in (64, 600):
        prob, lab = _blocks(part, x, size)
        assert (prob != ref).nnz == 0
        np.testing.assert_array_equal(lab, ref_lab)
    pos = np.array([5, drawn[0], 599, drawn[-1]])  # positions: fitted and other cells
    prob, lab = part.probabilities(x[pos], rows=pos)
    assert (prob != ref[pos]).nnz == 0
    np.testing.assert_array_equal(lab, ref_lab[pos])
    meta, arrays = part.state()
    back = DropoutModel.from_state(json.loads(json.dumps(meta)), arrays)
    np.testing.assert_array_equal(back.cell_rows_, drawn)
    assert (_blocks(back, x, 100)[0] != ref).nnz == 0
    with pytest.raises(ValueError, match="rows= needs no labels"):
        DropoutModel(**kw).fit(x[drawn], rows=drawn, n_obs=600, labels=np.zeros(200))
    with pytest.raises(ValueError, match="rows= needs"):
        DropoutModel(**kw).fit(x[drawn[:50]], rows=drawn[:50], n_obs=600)


# --------------------------------------------------------------------------- cnn by rows
def test_cnn_posterior_by_row_blocks_equals_in_memory(sim, posterior_blocks, one_torch_thread):
    """cnn with its own clustering (all cells fit the dropout model): the posterior of row
    blocks stacks to impute's output."""
    ad = sim.copy()
    est = CNNImputer(rng=0, **TINY)
    assert est.posterior_by_rows
    ref = est.fit_transform(ad, layer="counts")
    x = sp.csr_matrix(ad.layers["counts"], dtype=np.float64)
    parts = posterior_blocks(est, x, 64)
    np.testing.assert_allclose(np.vstack([p.mean for p in parts]), ref, rtol=1e-6, atol=1e-9)
    prob = sp.vstack([p.dropout_prob for p in parts]).tocsr()
    assert abs(prob - est.dropout_prob_).max() == 0


def test_cnn_impute_file_by_blocks_equals_impute(sim, tmp_path, one_torch_thread):
    ad = sim.copy()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    params = dict(module={"n_hidden": 8}, targets={"n_ensemble": 1},
                  train={"n_epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"})
    ref = screpair.impute(ad, "cnn", copy=True, **params)
    rec = screpair.impute_file(path, tmp_path / "o.h5ad", "cnn", chunk_rows=64,
                               progress=False, **params)
    assert rec["posterior_by_rows"]
    back = screpair.read(tmp_path / "o.h5ad")
    for key in ("cnn", "dropout_prob"):
        got, want = back.layers[key], ref.layers[key]
        got = got.toarray() if sp.issparse(got) else got
        want = want.toarray() if sp.issparse(want) else want
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_cnn_samples_and_old_models(sim, tmp_path, posterior_blocks, one_torch_thread):
    """n_dropout_cells / n_train_cells below the cells: reproducible sampled fit, blocks still
    stack; a model saved without its dropout model (earlier releases) loads and refits one,
    all rows at once."""
    ad = sim.copy()
    kw = dict(n_dropout_cells=100, n_train_cells=120, rng=0, **TINY)
    est = CNNImputer(**kw).fit(ad, layer="counts")
    assert est.train_cells_.size == 120 and est.dropout_model_.fit_cells_.size == 100
    assert est.dropout_prob_ is None  # by blocks, never held for every cell
    x = sp.csr_matrix(ad.layers["counts"], dtype=np.float64)
    whole = est.posterior(ad, layer="counts")
    parts = posterior_blocks(est, x, 50)
    np.testing.assert_allclose(np.vstack([p.mean for p in parts]), whole.mean, rtol=1e-6,
                               atol=1e-9)
    again = CNNImputer(**kw).fit(ad, layer="counts").transform(ad, layer="counts")
    np.testing.assert_array_equal(again, whole.mean)
    assert np.isfinite(whole.mean).all() and (whole.mean >= 0).all()
    # saved with the dropout model: the same output after load
    est.save(tmp_path / "m")
    loaded = CNNImputer.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.transform(ad, layer="counts"), whole.mean)
    # the layout of earlier releases: no dropout model saved
    cfg = tmp_path / "m" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["extra"].pop("dropout")
    cfg.write_text(json.dumps(meta))
    old = CNNImputer.load(tmp_path / "m")
    assert old.dropout_model_ is None and not old.posterior_by_rows
    out = old.transform(ad, layer="counts")
    assert out.shape == whole.mean.shape and np.isfinite(out).all()
    with pytest.raises(ValueError, match="n_train_cells must be None or an integer >= 10"):
        CNNImputer(n_train_cells=5).fit(ad, layer="counts")
    with pytest.raises(ValueError, match="n_dropout_cells must be None or an integer >= 10"):
        CNNImputer(n_dropout_cells=500.5).fit(ad, layer="counts")
