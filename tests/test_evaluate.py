"""Metric functions against hand-computed values, and protocol invariants on small simulations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from screpair import evaluate as ev

# --------------------------------------------------------------------------- masked accuracy


def test_log1p_norm_hand(array_type):
    x = array_type(np.array([[1.0, 3.0], [0.0, 0.0]]))
    out = ev.log1p_norm(x, scale=1e6)
    expected = np.array([[np.log1p(0.25e6), np.log1p(0.75e6)], [0.0, 0.0]])
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    out2 = ev.log1p_norm(x, np.array([2.0, 5.0]), scale=10)
    np.testing.assert_allclose(out2, [[np.log1p(5.0), np.log1p(15.0)], [0.0, 0.0]], rtol=1e-12)


def test_masked_accuracy_hand():
    truth = np.array([[2.0, 2.0], [1.0, 3.0]])
    pred = np.array([[2.0, 0.0], [1.0, 1.0]])
    mask = np.array([[False, True], [False, True]])
    lib = np.array([4.0, 4.0])
    res = ev.masked_accuracy(truth, pred, mask, lib)
    t = np.array([np.log1p(0.5e6), np.log1p(0.75e6)])
    p = np.array([0.0, np.log1p(0.25e6)])
    assert res["mse"] == pytest.approx(np.mean((t - p) ** 2), rel=1e-12)
    assert res["pearson"] == pytest.approx(1.0, abs=1e-12)  # two points, both increasing


def test_masked_scores_sparse_and_errors():
    truth = sp.csr_matrix(np.array([[1.0, 0.0, 3.0]]))
    assert ev.mse_masked(truth, truth, np.array([[True, True, True]])) == pytest.approx(0.0, abs=0)
    assert np.isnan(ev.pearson_masked([[1.0, 2.0]], [[3.0, 3.0]], [[True, True]]))
    with pytest.raises(ValueError, match="no entries"):
        ev.mse_masked([[1.0]], [[1.0]], [[False]])
    with pytest.raises(ValueError, match="shapes differ"):
        ev.mse_masked([[1.0, 2.0]], [[1.0]], [[True]])


# --------------------------------------------------------------------------- MCV


def test_poisson_nll_hand_and_torch():
    y_pred = np.array([1.0, 2.0, 0.5])
    y_true = np.array([0.0, 3.0, 1.0])
    hand = np.mean([1.0 - 0.0, 2.0 - 3.0 * np.log(2.0 + 1e-6), 0.5 - np.log(0.5 + 1e-6)])
    assert ev.poisson_nll(y_pred, y_true) == pytest.approx(hand, rel=1e-12)
    torch = pytest.importorskip("torch")
    ref = torch.nn.functional.poisson_nll_loss(
        torch.tensor(y_pred), torch.tensor(y_true), log_input=False, full=False, eps=1e-6
    )
    assert ev.poisson_nll(y_pred, y_true) == pytest.approx(float(ref), rel=1e-10)


def test_mcv_poisson_orders_hand():
    test = np.array([[1.0, 0.0], [2.0, 1.0]])  # sum 4
    den = np.array([[2.0, 2.0], [4.0, 0.0]])
    scaled = den * 4.0 / 36.0
    op = ev.mcv_poisson(test, den, train_sum=36.0)
    # Open Problems v1 passes (test, denoised): mean(test - denoised * log(test + 1e-6))
    assert op == pytest.approx(np.mean(test - scaled * np.log(test + 1e-6)), rel=1e-12)
    mcv = ev.mcv_poisson(test, den, train_sum=36.0, order="mcv")
    assert mcv == pytest.approx(np.mean(scaled - test * np.log(scaled + 1e-6)), rel=1e-12)
    with pytest.raises(ValueError, match="order"):
        ev.mcv_poisson(test, den, train_sum=36.0, order="torch")
    with pytest.raises(ValueError, match="train_sum"):
        ev.mcv_poisson(test, den, train_sum=0.0)


def test_mcv_poisson_mcv_order_is_minimised_by_the_truth():
    rng = np.random.default_rng(0)
    mu = rng.gamma(2.0, 2.0, size=(40, 30))
    test = rng.poisson(mu).astype(float)
    train_sum = test.sum()  # scale factor 1
    best = ev.mcv_poisson(test, test, train_sum=train_sum, order="mcv")
    for other in (mu, test + 1.0, np.full_like(test, test.mean())):
        assert ev.mcv_poisson(test, other * train_sum / other.sum(), train_sum=train_sum,
                              order="mcv") > best + 1e-6


def test_mcv_mse_hand():
    test = np.array([[1.0, 1.0], [0.0, 0.0]])
    den = np.array([[2.0, 0.0], [0.0, 0.0]])
    a, b = np.log1p(5000.0), np.log1p(10000.0)
    expected = ((a - b) ** 2 + a**2) / 4  # the empty cell contributes zeros
    assert ev.mcv_mse(test, den) == pytest.approx(expected, rel=1e-12)


@pytest.mark.requires("scanpy")
def test_mcv_mse_matches_scanpy():
    import scanpy as sc
    from anndata import AnnData
    from sklearn.metrics import mean_squared_error

    rng = np.random.default_rng(1)
    test = rng.poisson(1.0, size=(30, 20)).astype(float)
    den = rng.gamma(2.0, 1.0, size=(30, 20))
    t, d = AnnData(test.copy()), AnnData(den.copy())
    for ad in (t, d):
        sc.pp.normalize_total(ad, target_sum=1e4)
        sc.pp.log1p(ad)
    ref = mean_squared_error(t.X, d.X)
    assert ev.mcv_mse(test, den, target_sum=1e4) == pytest.approx(ref, rel=1e-10)


# --------------------------------------------------------------------------- clustering


def test_purity_entropy_hand():
    y = ["a", "a", "a", "b", "b", "b"]
    c = [0, 0, 1, 1, 1, 1]
    assert ev.purity(y, c) == pytest.approx(5 / 6, rel=1e-12)
    h1 = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert ev.entropy(y, c) == pytest.approx(4 / 6 * h1, rel=1e-12)
    assert ev.purity(y, [5, 5, 5, 7, 7, 7]) == pytest.approx(1.0, abs=0)
    assert ev.entropy(y, [5, 5, 5, 7, 7, 7]) == pytest.approx(0.0, abs=1e-15)
    assert ev.ari(y, [5, 5, 5, 7, 7, 7]) == pytest.approx(1.0, abs=1e-12)
    assert ev.ari(y, [0, 1, 0, 1, 0, 1]) < 0.0 + 1e-12


def test_silhouette_hand():
    emb = np.array([[0.0], [1.0], [10.0], [11.0]])
    y = ["a", "a", "b", "b"]
    expected = (2 * (1 - 1 / 10.5) + 2 * (1 - 1 / 9.5)) / 4
    assert ev.silhouette(emb, y) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(ev.silhouette(emb, ["a"] * 4))


# --------------------------------------------------------------------------- differential expression


def test_bh_adjust_hand():
    out = ev.bh_adjust(np.array([0.01, 0.04, 0.03, 0.2]))
    np.testing.assert_allclose(out, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2], rtol=1e-12)


def test_rank_genes_wilcoxon_hand():
    # gene 0: group A = 1,2,3 vs rest 4,5,6 -> R = 6, z = (6 - 10.5) / sqrt(5.25)
    x = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0], [5.0, 0.0], [6.0, 1.0]])
    groups = np.array(["A", "A", "A", "B", "B", "B"])
    res = ev.rank_genes(x, groups)
    a0 = res[(res.group == "A") & (res.gene == 0)].iloc[0]
    z = (6 - 10.5) / np.sqrt(5.25)
    assert a0.score == pytest.approx(z, rel=1e-12)
    assert a0.pval == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-12)
    b0 = res[(res.group == "B") & (res.gene == 0)].iloc[0]
    assert b0.score == pytest.approx(-z, rel=1e-12)
    assert set(res.columns) == {"group", "gene", "score", "pval", "pval_adj", "logfc"}


def test_rank_genes_matches_scipy():
    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(2.0, size=(60, 8)).astype(float))
    x[:20, :3] += 1.0
    groups = np.repeat(["g0", "g1", "g2"], 20)
    res = ev.rank_genes(x, groups, tie_correct=True)
    tt = ev.rank_genes(x, groups, method="t-test")
    for j in range(8):
        m = groups == "g0"
        mw = stats.mannwhitneyu(x[m, j], x[~m, j], use_continuity=False, method="asymptotic")
        row = res[(res.group == "g0") & (res.gene == j)].iloc[0]
        assert row.pval == pytest.approx(mw.pvalue, rel=1e-9)
        welch = stats.ttest_ind(x[m, j], x[~m, j], equal_var=False)
        trow = tt[(tt.group == "g0") & (tt.gene == j)].iloc[0]
        assert trow.score == pytest.approx(welch.statistic, rel=1e-9)
        assert trow.pval == pytest.approx(welch.pvalue, rel=1e-9)


@pytest.mark.requires("scanpy")
def test_rank_genes_matches_scanpy():
    import scanpy as sc
    from anndata import AnnData

    rng = np.random.default_rng(3)
    x = np.log1p(rng.poisson(3.0, size=(45, 12)).astype(float))
    x[:15, :4] += 0.8
    groups = np.repeat(["a", "b", "c"], 15)
    ad = AnnData(x, obs=pd.DataFrame({"g": pd.Categorical(groups)}, index=[f"c{i}" for i in range(45)]))
    ad.var_names = [f"G{i}" for i in range(12)]
    for method in ("wilcoxon", "t-test"):
        sc.tl.rank_genes_groups(ad, "g", method=method, n_genes=12)
        ours = ev.rank_genes(x, groups, method=method, gene_names=ad.var_names)
        for g in ("a", "b", "c"):
            names = pd.DataFrame(ad.uns["rank_genes_groups"]["names"])[g]
            scores = pd.DataFrame(ad.uns["rank_genes_groups"]["scores"])[g]
            ref = pd.Series(scores.to_numpy(), index=names.to_numpy())
            mine = ours[ours.group == g].set_index("gene")["score"]
            np.testing.assert_allclose(mine[ref.index], ref.to_numpy(), rtol=1e-5, atol=1e-6)


def test_deg_auc_topk_jaccard_f1_hand():
    assert ev.deg_auc(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.75)
    assert np.isnan(ev.deg_auc(np.array([1.0, 2.0]), np.array([1, 1])))
    assert ev.top_k(np.array([0.1, 0.9, 0.5, 0.7]), 2) == {1, 3}
    assert ev.top_k(np.array([0.1, 0.9]), 1, names=["x", "y"]) == {"y"}
    assert ev.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert ev.f1({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx(2 * 2 / 7)
    assert np.isnan(ev.jaccard(set(), set()))


# --------------------------------------------------------------------------- agreement with truth


def test_gini_hand():
    assert ev.gini([0, 0, 0, 1]) == pytest.approx(0.75, rel=1e-12)
    assert ev.gini([1, 1, 1, 1]) == pytest.approx(0.0, abs=1e-15)
    assert ev.gini([4, 1, 3, 2]) == pytest.approx(0.25, rel=1e-12)
    assert np.isnan(ev.gini([0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        ev.gini([-1, 2])


def test_gini_agreement_hand():
    res = ev.gini_agreement(np.array([0.1, 0.2, 0.4, np.nan]), np.array([0.2, 0.2, 0.6, 0.5]))
    assert res["gini_rmse"] == pytest.approx(np.sqrt((0.01 + 0.0 + 0.04) / 3), rel=1e-12)
    assert res["gini_pearson"] == pytest.approx(np.corrcoef([0.1, 0.2, 0.4], [0.2, 0.2, 0.6])[0, 1])


def test_marker_spearman_and_cosine():
    rng = np.random.default_rng(0)
    ref = rng.random((20, 3))
    assert ev.marker_spearman(ref, np.exp(ref)) == pytest.approx(1.0, abs=1e-12)
    assert ev.marker_spearman(ref, -ref, genes=[0, 2]) == pytest.approx(-1.0, abs=1e-12)
    const = ref.copy()
    const[:, 1] = 1.0
    assert ev.marker_spearman(ref, const, genes=[1]) != ev.marker_spearman(ref, const, genes=[1])
    t = np.array([[1.0, 0.0], [1.0, 1.0]])
    p = np.array([[1.0, 1.0], [2.0, 2.0]])
    assert ev.cosine_cell(t, p) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2, rel=1e-12)


def test_dropout_detection_hand():
    observed = np.array([[0, 0, 5], [0, 0, 1]])
    truth = np.array([[3, 0, 5], [0, 2, 1]])  # zeros: (0,0) dropout, (0,1) true, (1,0) true, (1,1) dropout
    prob = np.array([[0.9, 0.2, 0.0], [0.6, 0.7, 0.0]])
    res = ev.dropout_detection(prob, observed, truth)
    # ranking of zeros by prob: (0,0) 0.9 D, (1,1) 0.7 D, (1,0) 0.6 T, (0,1) 0.2 T -> AP = 1
    assert res["dropout_pr_auc"] == pytest.approx(1.0, abs=1e-12)
    # > 0.5: (0,0) D, (1,1) D, (1,0) T -> precision 2/3, recall 1 -> F1 = 0.8
    assert res["dropout_f1"] == pytest.approx(0.8, rel=1e-12)


# --------------------------------------------------------------------------- protocols


def test_masked_protocol_invariants(sim):
    proto = ev.Masked()
    task = proto.prepare(sim.copy(), rng=0)
    x = task.adata.X
    truth, mask = task.truth["true_counts"], task.truth["mask"].toarray()
    # every kept gene is detected in >= 50% of the input cells
    counts = sp.csr_matrix(sim.X)
    detected = pd.Series(np.bincount(counts.indices, minlength=sim.n_vars) / sim.n_obs,
                         index=sim.var_names)
    assert (detected[task.adata.var_names] >= 0.5).all()
    # 10% of the non-zeros are hidden, the method never sees them, the rest is untouched
    assert mask.sum() == round(0.1 * truth.nnz)
    assert (x.toarray()[mask] == 0).all()
    np.testing.assert_array_equal(x.toarray()[~mask], truth.toarray()[~mask])
    np.testing.assert_allclose(task.truth["lib"], x.toarray().sum(1), rtol=1e-12)
    # the truth itself scores perfectly; the same seed gives the same mask
    perfect = proto.score(task, truth.toarray())
    assert perfect["mse"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["pearson"] == pytest.approx(1.0, abs=1e-12)
    again = proto.prepare(sim.copy(), rng=0)
    assert (again.truth["mask"] != task.truth["mask"]).nnz == 0


def test_mcv_protocol_invariants(sim):
    proto = ev.MCV()
    task = proto.prepare(sim.copy(), rng=0)
    train, test = task.adata.X, task.truth["test"]
    full = sp.csr_matrix(sim.X)[:, :][np.flatnonzero(np.isin(sim.obs_names, task.adata.obs_names))]
    full = full[:, np.flatnonzero(np.isin(sim.var_names, task.adata.var_names))]
    np.testing.assert_array_equal((train + test).toarray(), full.toarray())
    assert task.truth["train_sum"] == pytest.approx(train.sum(), rel=1e-12)
    assert 0.85 < train.sum() / full.sum() < 0.95
    res = proto.score(task, test.toarray() * task.truth["train_sum"] / test.sum())
    assert res["mcv_mse"] == pytest.approx(0.0, abs=1e-12)
    assert set(res) == {"mcv_mse", "mcv_poisson", "mcv_poisson_mcv", "zeros_imputed"}


def _separated_sim():
    from screpair import simulate

    return simulate.splat(n_obs=120, n_vars=150, group_prob=(0.5, 0.5), de_prob=0.4,
                          de_fac_loc=1.5, lib_loc=8.0, rng=1)


def test_clustering_protocol_known_answer():
    sim = _separated_sim()
    proto = ev.Clustering(n_pcs=10)
    task = proto.prepare(sim, rng=0)
    assert task.adata.n_obs == sim.n_obs
    truth = sp.csr_matrix(sim.layers["true_counts"])[:, np.flatnonzero(
        np.isin(sim.var_names, task.adata.var_names))].toarray()
    good = proto.score(task, truth)
    assert good["ari"] > 0.9 and good["purity"] > 0.95 and good["entropy"] < 0.2
    noise = np.random.default_rng(0).poisson(5.0, size=truth.shape).astype(float)
    bad = proto.score(task, noise)
    assert bad["ari"] < 0.2 and bad["silhouette"] < good["silhouette"]
    assert proto.embedding(task, truth).shape == (sim.n_obs, 2)


def test_clustering_protocol_drops_unlabelled_and_needs_labels(counts_adata):
    ad = counts_adata.copy()
    ad.obs["group"] = ad.obs["group"].astype(object)
    ad.obs.iloc[:5, ad.obs.columns.get_loc("group")] = np.nan
    task = ev.Clustering(n_pcs=5).prepare(ad, rng=0)
    assert task.adata.n_obs == ad.n_obs - 5
    del ad.obs["group"]
    with pytest.raises(ValueError, match="needs cell labels"):
        ev.Clustering().prepare(ad, rng=0)


def test_deg_protocol_reference_scores_itself_perfectly(counts_adata):
    proto = ev.DEG(k=10)
    task = proto.prepare(counts_adata.copy(), rng=0)
    assert task.truth["source"] == "raw"
    res = proto.score(task, task.adata.X.toarray())
    assert res["deg_jaccard"] == pytest.approx(1.0) and res["deg_f1"] == pytest.approx(1.0)
    assert res["lfc_pearson"] == pytest.approx(1.0, abs=1e-12)
    # the raw reference's per-cell values are the input's own: no marker_spearman
    assert "marker_spearman" not in res
    assert res["deg_auc"] > 0.9
    flat = proto.score(task, np.ones(task.adata.shape))
    assert flat["deg_f1"] < 0.6


def test_deg_protocol_uses_simulation_truth():
    sim = _separated_sim()
    proto = ev.DEG(k=20)
    task = proto.prepare(sim, rng=0)
    assert task.truth["source"] == "true_counts"
    genes = np.flatnonzero(np.isin(sim.var_names, task.adata.var_names))
    truth = sp.csr_matrix(sim.layers["true_counts"])[:, genes].toarray()
    res = proto.score(task, truth)
    assert res["deg_jaccard"] == pytest.approx(1.0)
    assert res["marker_spearman"] == pytest.approx(1.0, abs=1e-12)  # against the true counts
    assert res["lfc_pearson"] == pytest.approx(1.0, abs=1e-12)


def test_lfc_pearson_hand():
    from screpair.evaluate._protocols import _lfc_pearson

    def table(group, lfc):
        return pd.DataFrame({"group": group, "gene": np.arange(len(lfc)), "logfc": lfc})

    ref = pd.concat([table("a", [1.0, 2.0, 3.0, 4.0]), table("b", [0.0, 1.0, 0.0, 1.0])])
    # a: 2x the reference (r = 1) with an infinite fold change left out; b: reversed (r = -1)
    res = pd.concat([table("a", [2.0, 4.0, 6.0, np.inf]), table("b", [1.0, 0.0, 1.0, 0.0])])
    assert _lfc_pearson(ref, res) == pytest.approx(0.0, abs=1e-12)
    # r of a hand-computed case: x = (1, 2, 3), y = (1, 3, 2): r = 0.5
    ref3, res3 = table("a", [1.0, 2.0, 3.0]), table("a", [1.0, 3.0, 2.0])
    assert _lfc_pearson(ref3, res3) == pytest.approx(0.5, abs=1e-12)
    # a group whose fold changes are constant has no r: the mean is over the others
    res_flat = pd.concat([table("a", [2.0, 4.0, 6.0, 8.0]), table("b", [1.0, 1.0, 1.0, 1.0])])
    assert _lfc_pearson(ref, res_flat) == pytest.approx(1.0, abs=1e-12)


def test_dropout_protocol_oracle(sim):
    from screpair.methods import Posterior

    proto = ev.Dropout()
    task = proto.prepare(sim.copy(), rng=0)
    truth = task.truth["true_counts"].toarray()
    oracle = Posterior(mean=truth, dropout_prob=(truth > 0).astype(float))
    res = proto.score(task, truth, oracle)
    assert res["dropout_pr_auc"] == pytest.approx(1.0) and res["dropout_f1"] == pytest.approx(1.0)
    assert res["mse_log"] == pytest.approx(0.0, abs=1e-12)
    assert res["dropout_ece"] == pytest.approx(0.0, abs=1e-12)
    assert "dropout_pr_auc" not in proto.score(task, truth, Posterior(mean=truth))
    assert proto.calibration(task, Posterior(mean=truth)) is None


def test_degrade_protocol_oracle(sim):
    proto = ev.Degrade(bias_3p=0.5, dropout_rate=0.2, noise_sd=0.1)
    ad = sim.copy()
    ad.X = ad.layers["true_counts"].copy()
    task = proto.prepare(ad, rng=0)
    res = proto.score(task, _perfect(task))
    assert res["mse_log"] == pytest.approx(0.0, abs=1e-12)
    assert res["cosine_cell"] == pytest.approx(1.0, abs=1e-12)
    damaged = proto.score(task, task.adata.X.toarray())
    assert damaged["mse_log"] > 0.01 and damaged["mse_log_dropped"] > damaged["mse_log"]


def _perfect(task):
    """The perfect repair: the clean profile at the degraded input's library size."""
    truth = task.truth["true_counts"].toarray()
    return truth * (task.truth["lib_in"] / truth.sum(1))[:, None]


def test_expression_recovery_hand():
    from screpair.evaluate import _metrics as M

    truth = np.array([[1, 0, 2], [0, 3, 0]])
    pred = np.array([[0.6, 0.4, 0.0], [0.5, 2.0, 0.1]])
    res = M.expression_recovery(truth, pred)
    # called (>= 0.5): (0,0) (1,0) (1,1); expressed: (0,0) (0,2) (1,1) -> TP 2, FP 1, FN 1
    assert res["expr_f1"] == pytest.approx(2 / 3, rel=1e-12)
    # pred / row sum (1.0, 2.6): (1,1) .77 P, (0,0) .6 P, (0,1) .4, (1,0) .19, (1,2) .04, (0,2) 0 P
    assert res["expr_pr_auc"] == pytest.approx((1 + 1 + 3 / 6) / 3, rel=1e-12)
    # the boolean truth gives the same; all expressed -> NaN
    assert M.expression_recovery(truth > 0, pred) == res
    assert all(np.isnan(v) for v in M.expression_recovery(np.ones((2, 3)), pred).values())
    # depth rescales the output before the call: row 0 x 2 -> (1.2, 0.8, 0) calls (0,1) too
    # (FP 2, TP 2, FN 1 -> F1 4/7); a scalar applies to every row; PR-AUC is unchanged
    deep = M.expression_recovery(truth, pred, depth=np.array([2.0, 1.0]))
    assert deep["expr_f1"] == pytest.approx(4 / 7, rel=1e-12)
    assert deep["expr_pr_auc"] == res["expr_pr_auc"]
    # x 10: everything but (0,2) is called ((1,2): 0.1 x 10 = 1) -> TP 2, FP 3, FN 1 -> F1 1/2
    assert M.expression_recovery(truth, pred, depth=10.0)["expr_f1"] == pytest.approx(
        2 * 2 / (2 * 2 + 3 + 1), rel=1e-12
    )


_DAMAGE = {"bias_3p": 1.0, "dropout_rate": 0.5, "noise_sd": 0.3}
_PROFILE = {"mse_log", "pearson_log", "cosine_cell", "mse_log_dropped"}
_EXPR = {"expr_pr_auc", "expr_f1"}
_LABELLED = {"silhouette", "deg_jaccard", "deg_f1", "marker_spearman"}


@pytest.fixture(scope="module")
def degrade_task(sim):
    proto = ev.Degrade(k=10, n_pcs=10, **_DAMAGE)
    ad = sim.copy()
    ad.X = ad.layers["true_counts"].copy()
    return proto, proto.prepare(ad, rng=0)


def test_degrade_protocol_biological_scores_of_clean_truth(degrade_task):
    proto, task = degrade_task
    res = proto.score(task, _perfect(task))
    assert set(res) == _PROFILE | _EXPR | _LABELLED
    # expr_f1 too: the perfect repair is at the degraded (smaller) library size, and the call is
    # made at the clean depth
    for key in ("expr_pr_auc", "expr_f1", "deg_jaccard", "deg_f1", "pearson_log"):
        assert res[key] == pytest.approx(1.0, abs=1e-12), key
    # rescaling by lib_in / lib_clean perturbs ties between equal clean values at 1e-16
    assert res["marker_spearman"] == pytest.approx(1.0, abs=1e-6)
    assert res["mse_log"] == pytest.approx(0.0, abs=1e-12)
    # the clean counts themselves call the same entries expressed
    assert proto.score(task, task.truth["true_counts"].toarray())["expr_f1"] == 1.0
    # dense and sparse outputs score the same
    import scipy.sparse as sp

    assert proto.score(task, sp.csr_matrix(_perfect(task))) == pytest.approx(res, abs=1e-12)


def test_degrade_protocol_degraded_input_scores_worse(degrade_task):
    from screpair.evaluate import _metrics as M

    proto, task = degrade_task
    clean = proto.score(task, _perfect(task))
    damaged = task.adata.X.toarray()
    before = proto.score(task, damaged)
    assert before["expr_pr_auc"] < clean["expr_pr_auc"] - 0.05
    assert before["deg_jaccard"] < clean["deg_jaccard"] - 0.1
    assert before["silhouette"] < clean["silhouette"]
    # profile scores: log1p(CP10k) of the scored genes; truth at the clean library size (all
    # genes), the output at the degraded input's
    genes = task.truth["genes"]
    truth = task.truth["true_counts"].toarray()
    t = M.log1p_norm(truth[:, genes], truth.sum(1), scale=1e4)
    p = M.log1p_norm(damaged[:, genes], damaged.sum(1), scale=1e4)
    assert before["mse_log"] == pytest.approx(np.mean((t - p) ** 2), rel=1e-12)
    assert before["cosine_cell"] == pytest.approx(M.cosine_cell(t, p), rel=1e-12)
    hit = task.truth["dropped"]
    assert hit.shape == t.shape and hit.any()
    assert before["mse_log_dropped"] == pytest.approx(np.mean((t - p)[hit] ** 2), rel=1e-12)


def test_degrade_protocol_scored_genes_and_labels(sim):
    from screpair.evaluate._protocols import _variable_genes

    ad = sim.copy()
    ad.X = ad.layers["true_counts"].copy()
    ad.obs["group"] = ad.obs["group"].astype(object)
    ad.obs.iloc[:7, ad.obs.columns.get_loc("group")] = np.nan
    proto = ev.Degrade(n_top_genes=30, k=10, n_pcs=5, **_DAMAGE)
    task = proto.prepare(ad, rng=0)
    genes = task.truth["genes"]
    assert genes.size == 30
    from screpair.pp._pp import hvg_dispersion

    truth = task.truth["true_counts"]
    cand = _variable_genes(truth, None)
    hv = hvg_dispersion(truth[:, cand], 30)["highly_variable"].to_numpy()
    np.testing.assert_array_equal(genes, cand[hv])
    assert task.truth["clean_log"].shape == (task.adata.n_obs, 30)
    # unlabelled cells are left out of the label scores only
    assert task.truth["labels"].size == task.adata.n_obs - 7
    assert "nan" not in set(task.truth["labels"])
    assert set(proto.score(task, task.adata.X)) == _PROFILE | _EXPR | _LABELLED


def test_degrade_protocol_without_labels(sim):
    ad = sim.copy()
    ad.X = ad.layers["true_counts"].copy()
    del ad.obs["group"]
    proto = ev.Degrade(k=10, n_pcs=5, **_DAMAGE)
    task = proto.prepare(ad, rng=0)
    assert "labels" not in task.truth
    res = proto.score(task, task.adata.X.toarray())
    assert set(res) == _PROFILE | _EXPR
    assert proto.score(task, _perfect(task))["expr_pr_auc"] == pytest.approx(1.0)


def test_degrade_protocol_reference_split(sim, monkeypatch):
    from screpair.evaluate._benchmark import run_method
    from screpair.evaluate._protocols import MODERATE_DAMAGE
    from screpair.methods._torch import TrainConfig
    from screpair.methods.autoencoder import DAEImputer
    from screpair.methods.diffusion import PairConfig

    ad = sim.copy()
    ad.X = ad.layers["true_counts"].copy()
    with pytest.raises(ValueError, match="reference_frac"):
        ev.Degrade(reference_frac=1.0)
    assert ev.Degrade().degrade_params == MODERATE_DAMAGE
    proto = ev.Degrade(k=10, n_pcs=5, reference_frac=0.4, **_DAMAGE)
    task = proto.prepare(ad, rng=0)
    ref = task.reference
    assert ref is not None and task.adata.n_obs + ref.n_obs <= ad.n_obs
    assert abs(ref.n_obs - 0.4 * ad.n_obs) <= 1
    assert not set(ref.obs_names) & set(task.adata.obs_names)  # disjoint cells
    assert list(ref.var_names) == list(task.adata.var_names)
    # the reference is the clean counts of its cells; only the other cells are degraded
    src = ad[ref.obs_names, ref.var_names].X
    np.testing.assert_array_equal(ref.X.toarray(), src.toarray())
    assert task.truth["true_counts"].shape == task.adata.shape
    assert ev.Degrade(k=10, n_pcs=5, **_DAMAGE).prepare(ad, rng=0).reference is None
    # methods trained on clean profiles fit on the reference; the others ignore it
    params = {"train": TrainConfig(n_epochs=1, progress=False), "pairs": PairConfig(n_views=1)}
    fitted = []
    orig = DAEImputer.fit

    def spy(self, data, **kw):
        fitted.append(data.n_obs)
        return orig(self, data, **kw)

    monkeypatch.setattr(DAEImputer, "fit", spy)
    out, _ = run_method("dae", task.adata, params=params, reference=ref)
    assert fitted == [ref.n_obs] and out.shape == task.adata.shape
    out, _ = run_method("knn", task.adata, reference=ref)
    assert out.shape == task.adata.shape


def test_get_protocol():
    assert isinstance(ev.get_protocol("mcv", train_frac=0.8), ev.MCV)
    with pytest.raises(ValueError, match="unknown protocol"):
        ev.get_protocol("nope")


def test_smfish_protocol_hand(tmp_path):
    from anndata import AnnData

    # two conditions, two genes; FISH gene "A" in condition "x" has Gini 0.75 ([0, 0, 0, 4])
    fish = pd.DataFrame({
        "condition": ["x"] * 4 + ["x"] * 4 + ["y"] * 2,
        "gene": ["A"] * 4 + ["B"] * 4 + ["A"] * 2,
        "mrna_count": [0, 0, 0, 4, 1, 1, 1, 1, 1, 3],
        "cell_area": [1.0] * 10,
    })
    path = tmp_path / "fish.csv"
    fish.to_csv(path, index=False)
    x = np.array([[1, 5], [1, 5], [1, 5], [1, 5], [2, 2], [6, 2]], dtype=float)
    ad = AnnData(x, obs=pd.DataFrame({"condition": list("xxxxyy")}, index=[f"c{i}" for i in range(6)]))
    ad.var_names = ["A", "B"]
    proto = ev.get_protocol("smfish", fish_path=str(path))
    task = proto.prepare(ad, rng=0)
    assert [p[:2] for p in task.truth["pairs"]] == [("x", "A"), ("x", "B"), ("y", "A")]
    np.testing.assert_allclose([p[2] for p in task.truth["pairs"]], [0.75, 0.0, 0.25], rtol=1e-12)
    # FISH (mean, CV, Fano): [0, 0, 0, 4] -> (1, sqrt 3, 3); [1, 1, 1, 1] -> (1, 0, 0);
    # [1, 3] -> (2, 0.5, 0.5)
    np.testing.assert_allclose([p[3] for p in task.truth["pairs"]],
                               [(1, np.sqrt(3), 3), (1, 0, 0), (2, 0.5, 0.5)], rtol=1e-12)
    # library-normalised: x cells are identical (Gini 0, 0); y cells: A = 2/4, 6/8 -> [0.5, 0.75]
    res = proto.score(task, x)
    g_y = ev.gini([0.5, 0.75])
    expected = np.sqrt(((0 - 0.75) ** 2 + 0.0 + (g_y - 0.25) ** 2) / 3)
    assert res["gini_rmse"] == pytest.approx(expected, rel=1e-12)
    # single-cell, at median library size 6: x A [1] * 4 -> (1, 0, 0), x B [5] * 4 -> (5, 0, 0),
    # y A [3, 4.5] -> (3.75, 0.2, 0.15)
    assert res["cv_rmse"] == pytest.approx(np.sqrt((3 + 0 + 0.3**2) / 3), rel=1e-12)
    assert res["cv_pearson"] == pytest.approx(
        np.corrcoef([0, 0, 0.2], [np.sqrt(3), 0, 0.5])[0, 1], rel=1e-12)
    assert res["mean_pearson"] == pytest.approx(
        np.corrcoef(np.log10([1, 5, 3.75]), np.log10([1, 1, 2]))[0, 1], rel=1e-12)
    assert np.isnan(res["fano_pearson"])  # one pair with both Fano factors > 0: no r


def test_deg_protocol_bulk_reference_hand(tmp_path, counts_adata):
    ad = counts_adata.copy()
    names = list(ad.var_names)
    # bulk: gene 0 up in g0 (CPM 4e5 vs 1e5), gene 1 up in g1; genes 2.. flat; gene "X" unknown
    g0 = [400_000, 100_000] + [500_000 / (len(names) - 2)] * (len(names) - 2)
    g1 = [100_000, 400_000] + [500_000 / (len(names) - 2)] * (len(names) - 2)
    bulk = pd.DataFrame({"g0_a": g0, "g0_b": g0, "g1_a": g1}, index=names)
    bulk.loc["X"] = [5, 5, 5]
    path = tmp_path / "bulk.csv"
    bulk.to_csv(path)
    proto = ev.DEG(bulk_path=str(path), k=1, n_top_genes=None)
    task = proto.prepare(ad, rng=0)
    assert task.truth["source"] == "bulk"
    ref = task.truth["ref"]
    up = ref[ref.pval_adj < 0.05]
    assert sorted(zip(up.group, up.gene, strict=True)) == [("g0", 0), ("g1", 1)]
    res = proto.score(task, task.adata.X.toarray())
    assert "marker_spearman" not in res and -1.0 <= res["lfc_pearson"] <= 1.0
    lfc = ref[(ref.group == "g0") & (ref.gene == 0)].logfc.iloc[0]
    cpm0 = 400_000 / (sum(g0) + 5) * 1e6
    cpm1 = 100_000 / (sum(g1) + 5) * 1e6
    assert lfc == pytest.approx(np.log2((cpm0 + 1) / (cpm1 + 1)), rel=1e-9)
    ad.obs["group"] = ["zz"] * 50 + ["g0"] * 50
    with pytest.raises(ValueError, match="no bulk sample"):
        ev.DEG(bulk_path=str(path)).prepare(ad, rng=0)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, screpair.evaluate; "
            "print(any(m in sys.modules for m in ('torch', 'matplotlib', 'scvi', 'magic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dropout_calibration_and_ece_by_hand():
    # zeros at (0,1), (0,2), (1,0), (1,2); dropouts (true > 0) at (0,1) and (1,0)
    observed = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    truth = np.array([[3.0, 1.0, 0.0], [4.0, 2.0, 0.0]])
    prob = np.array([[0.0, 0.95, 0.15], [0.85, 0.0, 0.05]])
    cal = ev.dropout_calibration(prob, observed, truth, n_bins=10)
    # bins [0, 0.1): 0.05 (true zero); [0.1, 0.2): 0.15 (true zero); [0.8, 0.9): 0.85 (dropout);
    # [0.9, 1]: 0.95 (dropout)
    np.testing.assert_allclose(cal["bin_lo"], [0.0, 0.1, 0.8, 0.9], atol=1e-12)
    np.testing.assert_allclose(cal["mean_prob"], [0.05, 0.15, 0.85, 0.95], rtol=1e-12)
    np.testing.assert_allclose(cal["frac_dropout"], [0.0, 0.0, 1.0, 1.0], atol=0)
    assert cal["n"].tolist() == [1, 1, 1, 1]
    # ECE = mean of |0.05 - 0|, |0.15 - 0|, |0.85 - 1|, |0.95 - 1| = (0.05 + 0.15 + 0.15 + 0.05) / 4
    assert ev.dropout_ece(cal) == pytest.approx(0.1, rel=1e-12)


def test_zeros_imputed_by_hand():
    observed = sp.csr_matrix(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))  # 4 zeros
    imputed = np.array([[1.0, 0.5, 0.0], [0.0, 1e-3, 2.0]])  # 2 of them made positive
    assert ev.zeros_imputed(observed, imputed) == pytest.approx(0.5, rel=1e-12)
    assert ev.zeros_imputed(observed, sp.csr_matrix(imputed)) == pytest.approx(0.5, rel=1e-12)
    assert ev.zeros_imputed(observed, imputed, tol=0.01) == pytest.approx(0.25, rel=1e-12)
    assert ev.zeros_imputed(observed, observed.toarray()) == 0.0
