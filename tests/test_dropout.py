"""Dropout probabilities: scImpute's gamma-normal mixture (vectorised EM) and the AnnData API."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from scipy import optimize, special, stats

from screpair.dropout import (
    POINT,
    STATUS,
    dropout_probability,
    dropout_weight,
    fit_dropout,
    fit_mixture,
    solve_alpha,
)

# --------------------------------------------------------------------------- reference


def _ref_alpha(v: float) -> float:
    if v <= 0:
        return 20.0
    a0 = (3 - v + np.sqrt((v - 3) ** 2 + 24 * v)) / 12 / v
    if a0 >= 20:
        return 20.0
    return optimize.brentq(lambda a: np.log(a) - special.digamma(a) - v, 1e-8, 1e4, xtol=1e-15)


def _ref_weight(x, p):
    pz1 = p[0] * stats.gamma.pdf(x, p[1], scale=1 / p[2])
    pz2 = (1 - p[0]) * stats.norm.pdf(x, p[3], p[4])
    with np.errstate(invalid="ignore", divide="ignore"):
        pz = pz1 / (pz1 + pz2)
    return np.where(pz1 == 0, 0.0, pz)


def ref_get_mix(x: np.ndarray, point: float = POINT, max_iter: int = 100, tol: float = 0.5):
    """Line-by-line port of scImpute's ``get_mix`` (one gene, plain loop) for comparison."""
    p = np.zeros(5)
    p[0] = np.mean(x == point)
    if p[0] == 0:
        p[0] = 0.01
    p[1:3] = 0.5, 1.0
    rm = x[x > point]
    p[3], p[4] = rm.mean(), rm.std(ddof=1)
    eps, it, ll_old = 10.0, 0, 0.0
    while eps > tol:
        w = _ref_weight(x, p)
        p[0] = w.sum() / w.size
        w2 = 1 - w
        p[3] = np.sum(w2 * x) / w2.sum()
        p[4] = np.sqrt(np.sum(w2 * (x - p[3]) ** 2) / w2.sum())
        s, t, u = w.sum(), np.sum(w * x), np.sum(w * np.log(x))
        p[1] = _ref_alpha(-u / s - np.log(s / t))
        p[2] = s / t * p[1]
        dens = p[0] * stats.gamma.pdf(x, p[1], scale=1 / p[2]) + (1 - p[0]) * stats.norm.pdf(
            x, p[3], p[4]
        )
        ll = np.sum(np.log10(dens))
        eps = (ll - ll_old) ** 2
        ll_old = ll
        it += 1
        if it > max_iter:
            break
    return p, it


def _draw(rng, n, eta, a, b, mu, sd, n_zero_frac=0.0):
    """Values from the mixture; a fraction of the gamma draws replaced by the zero point."""
    z = rng.random(n) < eta
    x = np.where(z, rng.gamma(a, 1 / b, n), rng.normal(mu, sd, n))
    x = np.abs(x) + 1e-9
    if n_zero_frac:
        x[z & (rng.random(n) < n_zero_frac)] = POINT
    return x


def _log10cpm(x: np.ndarray) -> np.ndarray:
    lib = x.sum(1, keepdims=True)
    return np.log10(x / np.where(lib > 0, lib, 1) * 1e6 + 1.01)


def _counts(rng, n_cells=60, n_genes=40, mean=5.0):
    lam = rng.gamma(2.0, mean / 2.0, n_genes) * rng.lognormal(0, 0.2, (n_cells, 1))
    x = rng.poisson(lam).astype(float)
    x[rng.random(x.shape) < 0.3] = 0  # dropouts
    return x


# --------------------------------------------------------------------------- gamma M-step


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0, 2.5, 7.0, 15.0])
def test_solve_alpha_inverts_digamma_equation(alpha):
    v = np.log(alpha) - special.digamma(alpha)
    np.testing.assert_allclose(solve_alpha(np.array([v])), [alpha], rtol=1e-10)


def test_solve_alpha_caps_like_scimpute():
    # v <= 0 has no solution -> 20; a tiny v gives a start value >= 20 -> 20; NaN stays NaN
    out = solve_alpha(np.array([0.0, -1.0, 1e-4, np.nan]))
    np.testing.assert_array_equal(out[:3], [20.0, 20.0, 20.0])
    assert np.isnan(out[3])
    vs = np.array([0.03, 0.2, 1.5])
    np.testing.assert_allclose(solve_alpha(vs), [_ref_alpha(v) for v in vs], rtol=1e-10)


def test_dropout_weight_hand_computed():
    p = (0.3, 0.8, 4.0, 2.0, 0.5)
    x = np.array([POINT, 0.5, 2.0, 3.0])
    g = 0.3 * 4.0**0.8 * x ** (0.8 - 1) * np.exp(-4.0 * x) / special.gamma(0.8)
    n = 0.7 * np.exp(-0.5 * ((x - 2.0) / 0.5) ** 2) / (0.5 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(dropout_weight(x, *p), g / (g + n), rtol=1e-12)
    # the weighted gamma density underflows to exactly 0 -> weight 0 (scImpute's pz[pz1 == 0] = 0)
    assert dropout_weight(np.array([500.0]), 0.3, 2.0, 50.0, 2.0, 0.5)[0] == 0.0


# --------------------------------------------------------------------------- EM


def test_em_matches_scimpute_loop():
    rng = np.random.default_rng(1)
    genes = [
        _draw(rng, 300, 0.4, 0.7, 8.0, 2.2, 0.4, n_zero_frac=0.9),
        _draw(rng, 150, 0.6, 1.5, 10.0, 1.6, 0.3, n_zero_frac=0.5),
        _draw(rng, 500, 0.2, 2.0, 5.0, 3.0, 0.6),
        _draw(rng, 80, 0.05, 0.5, 2.0, 2.5, 0.5),  # few dropouts
    ]
    fit = fit_mixture(np.concatenate(genes), np.array([g.size for g in genes]))
    for i, x in enumerate(genes):
        ref, n_it = ref_get_mix(x)
        got = [fit.eta[i], fit.alpha[i], fit.beta[i], fit.mu[i], fit.sigma[i]]
        np.testing.assert_allclose(got, ref, rtol=1e-7, err_msg=f"gene {i}")
        assert fit.n_iter[i] == n_it
        assert STATUS[fit.status[i]] == "converged"


def test_em_recovers_known_parameters():
    rng = np.random.default_rng(2)
    truth = np.array(
        [  # eta, alpha, beta, mu, sigma
            [0.3, 1.0, 10.0, 2.0, 0.3],
            [0.5, 2.0, 8.0, 2.5, 0.4],
            [0.2, 0.6, 3.0, 3.0, 0.5],
            [0.6, 3.0, 12.0, 1.8, 0.25],
        ]
    )
    n = 20_000
    data = [_draw(rng, n, *t) for t in truth]
    fit = fit_mixture(np.concatenate(data), np.full(len(data), n), tol=1e-10, max_iter=2000)
    assert np.all(fit.status == STATUS.index("converged"))
    est = np.column_stack([fit.eta, fit.alpha, fit.beta, fit.mu, fit.sigma])
    np.testing.assert_allclose(est[:, 0], truth[:, 0], atol=0.02)  # eta
    np.testing.assert_allclose(est[:, 1:3], truth[:, 1:3], rtol=0.1)  # gamma shape, rate
    np.testing.assert_allclose(est[:, 3], truth[:, 3], atol=0.02)  # mu
    np.testing.assert_allclose(est[:, 4], truth[:, 4], rtol=0.05)  # sigma
    # scImpute's own loose stopping rule (0.5 on the squared log10-likelihood change) stays close
    loose = fit_mixture(np.concatenate(data), np.full(len(data), n))
    np.testing.assert_allclose(loose.eta, truth[:, 0], atol=0.05)
    np.testing.assert_allclose(loose.mu, truth[:, 3], atol=0.05)


def test_em_multiplicity_equals_repeated_entries():
    rng = np.random.default_rng(3)
    nz = rng.normal(2.0, 0.4, 70)
    expanded = np.concatenate([np.full(30, POINT), nz])
    collapsed = np.concatenate([[POINT], nz])
    a = fit_mixture(expanded, np.array([100]))
    b = fit_mixture(collapsed, np.array([71]), mult=np.concatenate([[30.0], np.ones(70)]))
    for name in ("eta", "alpha", "beta", "mu", "sigma"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-9)
    assert a.n_iter[0] == b.n_iter[0]


def test_em_blocks_do_not_change_results():
    rng = np.random.default_rng(4)
    genes = [
        _draw(rng, int(rng.integers(50, 200)), 0.4, 1.0, 8.0, 2.0, 0.4, 0.8) for _ in range(30)
    ]
    x, lens = np.concatenate(genes), np.array([g.size for g in genes])
    big = fit_mixture(x, lens)
    small = fit_mixture(x, lens, block_size=300)
    for name in ("eta", "alpha", "beta", "mu", "sigma"):
        np.testing.assert_allclose(getattr(small, name), getattr(big, name), rtol=1e-12)
    np.testing.assert_array_equal(small.n_iter, big.n_iter)


def test_em_degenerate_units():
    rng = np.random.default_rng(5)
    units = [
        np.full(10, POINT),  # all zero
        np.array([POINT] * 9 + [2.0]),  # one non-zero: no spread
        np.array([POINT] * 8 + [2.0, 2.0]),  # identical non-zeros: no spread
        np.array([], dtype=float),  # no entries
        rng.normal(2.5, 0.3, 50),  # no zeros at all: eta starts at 0.01
    ]
    fit = fit_mixture(np.concatenate(units), np.array([u.size for u in units]))
    names = [STATUS[s] for s in fit.status]
    assert names[:4] == ["all_zero", "constant", "constant", "all_zero"]
    assert names[4] in ("converged", "failed")
    assert np.all(np.isnan(fit.eta[:4])) and np.all(np.isnan(fit.mu[:4]))
    if names[4] == "converged":
        ref, _ = ref_get_mix(units[4])
        np.testing.assert_allclose(fit.mu[4], ref[3], rtol=1e-7)


def test_em_rejects_bad_input():
    with pytest.raises(ValueError, match="> 0"):
        fit_mixture(np.array([0.0, 1.0]), np.array([2]))
    with pytest.raises(ValueError, match="unit_len"):
        fit_mixture(np.array([1.0, 2.0]), np.array([3]))


# --------------------------------------------------------------------------- fit_dropout


def test_fit_dropout_matches_per_cluster_reference(array_type):
    rng = np.random.default_rng(6)
    x = _counts(rng, n_cells=60, n_genes=30)
    labels = np.repeat(["a", "b"], 30)
    fit = fit_dropout(array_type(x), labels, min_valid_genes=1)
    assert list(fit.clusters) == ["a", "b"]
    v = _log10cpm(x)
    for c, name in enumerate(fit.clusters):
        rows = labels == name
        for g in range(x.shape[1]):
            col = v[rows, g]
            if STATUS[fit.status[c, g]] not in ("converged", "invalid"):
                continue
            ref, _ = ref_get_mix(col)
            got = [fit.eta[c, g], fit.alpha[c, g], fit.beta[c, g], fit.mu[c, g], fit.sigma[c, g]]
            np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=f"cluster {name} gene {g}")
            if fit.valid[c, g]:
                np.testing.assert_allclose(fit.zero_prob[c, g], _ref_weight(POINT, ref), rtol=1e-9)
    assert fit.valid.sum() > 40  # most units are fitted and usable


def test_fit_dropout_prob_lives_on_zeros_only(array_type):
    rng = np.random.default_rng(7)
    x = _counts(rng, n_cells=50, n_genes=25)
    labels = rng.integers(0, 3, 50)
    fit = fit_dropout(array_type(x), labels, min_valid_genes=1)
    assert sp.isspmatrix_csr(fit.prob) and fit.prob.shape == x.shape
    dense = fit.prob.toarray()
    assert np.all(dense[x != 0] == 0)
    zeros = x == 0
    expected = fit.zero_prob[fit.cell_cluster][zeros]
    np.testing.assert_allclose(dense[zeros], expected, rtol=1e-6)  # float32 storage
    assert np.all((dense >= 0) & (dense <= 1))


def test_fit_dropout_validity_rules_and_fill(monkeypatch):
    # the huge filler gene makes every library ~3e6 (nearly constant): trusted on purpose
    monkeypatch.setenv("SCREPAIR_TRUST_COUNTS", "1")
    rng = np.random.default_rng(8)
    n = 40
    x = _counts(rng, n_cells=n, n_genes=20, mean=20.0)
    # a gene whose non-zero values stay below 1 CPM: mu <= log10(2.01), rejected by find_va_genes
    low = np.where(rng.random(n) < 0.5, 1.0, 0.0)
    low[:2] = [1.0, 2.0]
    filler = np.full(n, 3_000_000.0)  # huge library: one count is < 1 CPM
    x = np.column_stack([x, low, filler, np.zeros(n)])  # last gene: no counts anywhere
    labels = np.zeros(n, dtype=int)
    fit = fit_dropout(x, labels, min_valid_genes=1)
    j_low, j_empty = 20, 22
    assert fit.mu[0, j_low] <= np.log10(2.01)
    assert STATUS[fit.status[0, j_low]] == "invalid" and not fit.valid[0, j_low]
    assert STATUS[fit.status[0, j_empty]] == "empty_gene"
    dense = fit.prob.toarray()
    assert np.all(dense[x[:, j_low] == 0, j_low] == 0)  # default fill 0: not missing
    assert np.all(dense[:, j_empty] == 0)
    filled = fit_dropout(x, labels, min_valid_genes=1, invalid_fill=1.0).prob.toarray()
    assert np.all(filled[x[:, j_low] == 0, j_low] == 1.0)
    assert np.all(filled[:, j_empty] == 0)  # genes without any count are always set aside


def test_fit_dropout_small_and_sparse_clusters():
    rng = np.random.default_rng(9)
    x = _counts(rng, n_cells=41, n_genes=15)
    x[40] = 0
    x[40, 0] = 3.0
    labels = np.array([0] * 40 + [1])  # cluster 1 has a single cell: scImpute skips it
    base = fit_dropout(x, labels, min_valid_genes=1)
    assert np.all(base.status[1] == STATUS.index("small_cluster"))
    assert not base.valid[1].any() and base.prob[40].nnz == 0
    n_valid = int(base.valid[0].sum())
    assert n_valid >= 5
    same = fit_dropout(x, labels, min_valid_genes=n_valid)
    np.testing.assert_array_equal(same.valid, base.valid)
    # a cluster with too few valid genes is skipped as a whole (scImpute: <= 10 valid genes)
    skipped = fit_dropout(x, labels, min_valid_genes=n_valid + 1)
    assert not skipped.valid.any() and skipped.prob.nnz == 0
    assert np.all(skipped.status[base.valid] == STATUS.index("few_valid"))


def test_fit_dropout_sets_aside_empty_cells():
    rng = np.random.default_rng(10)
    x = _counts(rng, n_cells=30, n_genes=20)
    x[5] = 0
    fit = fit_dropout(sp.csr_matrix(x), np.zeros(30, int), min_valid_genes=1)
    assert fit.cell_cluster[5] == -1
    assert fit.prob[5].nnz == 0
    ref = fit_dropout(np.delete(x, 5, axis=0), np.zeros(29, int), min_valid_genes=1)
    np.testing.assert_allclose(fit.zero_prob, ref.zero_prob, rtol=1e-12)


def test_fit_dropout_row_order_invariant():
    rng = np.random.default_rng(11)
    x = _counts(rng, n_cells=60, n_genes=30)
    labels = rng.integers(0, 2, 60)
    perm = rng.permutation(60)
    a = fit_dropout(x, labels, min_valid_genes=1)
    b = fit_dropout(x[perm], labels[perm], min_valid_genes=1)
    np.testing.assert_allclose(b.prob.toarray(), a.prob.toarray()[perm], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(b.mu, a.mu, rtol=1e-10)


def test_fit_dropout_label_errors():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="no cluster label"):
        fit_dropout(x, pd.Series(["a", None, "b", "b"]))
    with pytest.raises(ValueError, match="one entry per cell"):
        fit_dropout(x, [0, 1])


def test_dropout_probability_separates_dropouts_on_splat():
    from sklearn.metrics import average_precision_score

    from screpair import simulate

    sim = simulate.splat(n_obs=300, n_vars=600, preset="cnnimpute", rng=0)
    x = sim.layers["counts"].tocsr()
    fit = fit_dropout(x, sim.obs["group"])
    zeros = x.toarray() == 0
    y = sim.layers["dropout_mask"].toarray().astype(bool)[zeros]
    logit = np.where(fit.valid, fit.zero_logit, -1e9)[fit.cell_cluster][zeros]
    base = y.mean()
    ap_prob = average_precision_score(y, fit.prob.toarray()[zeros])
    ap_logit = average_precision_score(y, logit)
    assert ap_prob > base + 0.05, (ap_prob, base)
    assert ap_logit > base + 0.05, (ap_logit, base)


# --------------------------------------------------------------------------- AnnData API


def _adata(rng, n_cells=60, n_genes=40):
    x = _counts(rng, n_cells=n_cells, n_genes=n_genes)
    ad = AnnData(X=sp.csr_matrix(x.astype(np.float32)))
    ad.obs_names = [f"c{i}" for i in range(n_cells)]
    ad.var_names = [f"g{j}" for j in range(n_genes)]
    ad.obs["group"] = pd.Categorical(np.repeat(["A", "B"], n_cells // 2))
    ad.layers["counts"] = ad.X.copy()
    return ad


def test_dropout_probability_writes_slots():
    ad = _adata(np.random.default_rng(12))
    before = ad.copy()
    out = dropout_probability(ad, groupby="group", model="scimpute", copy=True)
    # copy=True leaves the input alone
    assert set(ad.layers.keys()) == set(before.layers.keys()) and "dropout_prob" not in ad.uns
    assert (
        sp.isspmatrix_csr(out.layers["dropout_prob"])
        and out.layers["dropout_prob"].dtype == np.float32
    )
    fit = fit_dropout(ad.X, ad.obs["group"])
    np.testing.assert_allclose(out.layers["dropout_prob"].toarray(), fit.prob.toarray(), rtol=1e-7)
    for name in ("eta", "alpha", "beta", "mu", "sigma", "zero_prob"):
        df = out.varm[f"dropout_prob_{name}"]
        assert list(df.columns) == ["A", "B"] and df.shape == (40, 2)
        np.testing.assert_allclose(df.to_numpy(), getattr(fit, name).T, rtol=1e-12, equal_nan=True)
    uns = out.uns["dropout_prob"]
    assert uns["groupby"] == "group" and uns["threshold"] == 0.5
    assert uns["n_missing"] == int((fit.prob.data > 0.5).sum())
    # only the new slots changed
    assert (out.X != before.X).nnz == 0
    assert set(out.obs.columns) == set(before.obs.columns)


def test_dropout_probability_layer_and_inplace():
    ad = _adata(np.random.default_rng(13))
    ad.X = sp.csr_matrix(ad.X.shape, dtype=np.float32)  # X empty: counts only in the layer
    assert (
        dropout_probability(ad, layer="counts", groupby="group", key_added="dp", model="scimpute")
        is None
    )
    assert "dp" in ad.layers and "dp_mu" in ad.varm
    ref = fit_dropout(ad.layers["counts"], ad.obs["group"]).prob.toarray()
    np.testing.assert_allclose(ad.layers["dp"].toarray(), ref, rtol=1e-7)


def test_dropout_probability_errors():
    ad = _adata(np.random.default_rng(14))
    with pytest.raises(KeyError, match="not a column"):
        dropout_probability(ad, groupby="nope")
    with pytest.raises(ValueError, match="threshold"):
        dropout_probability(ad, groupby="group", threshold=1.5)
    with pytest.raises(TypeError, match="unused"):
        dropout_probability(ad, groupby="group", perplexity=5)
    with pytest.raises(ValueError, match="view"):
        dropout_probability(ad[:10], groupby="group")
    with pytest.raises(TypeError, match="AnnData"):
        dropout_probability(ad.X, groupby="group")


def test_dropout_probability_needs_overwrite_for_existing_uns(monkeypatch):
    # an existing uns[key_added] (e.g. a result whose layer was deleted) is refused before any
    # fit, with nothing written; overwrite=True replaces it
    import screpair.dropout._api as api

    ad = _adata(np.random.default_rng(15))
    ad.uns["dp"] = {"mine": 1}
    before = ad.copy()

    def no_fit(*args, **kwargs):
        msg = "fitted before the output keys were checked"
        raise AssertionError(msg)

    with monkeypatch.context() as m:
        m.setattr(api, "fit_zinb_dropout", no_fit)
        m.setattr(api, "fit_dropout", no_fit)
        for model in api.DROPOUT_MODELS:
            with pytest.raises(ValueError, match=r"uns\['dp'\] already exists.*overwrite=True"):
                dropout_probability(ad, groupby="group", key_added="dp", model=model)
    assert ad.uns["dp"] == {"mine": 1} and set(ad.layers) == set(before.layers)
    assert set(ad.varm) == set(before.varm) and list(ad.var.columns) == list(before.var.columns)
    dropout_probability(ad, groupby="group", key_added="dp", overwrite=True)
    assert ad.uns["dp"]["model"] == "zinb" and "dp" in ad.layers
    with pytest.raises(ValueError, match=r"layers\['dp'\] already exists"):  # a second run
        dropout_probability(ad, groupby="group", key_added="dp")


def test_dropout_probability_clusters_when_no_groupby(tmp_path):
    import anndata

    from screpair import simulate

    sim = simulate.splat(
        n_obs=80, n_vars=300, group_prob=(0.5, 0.5), de_prob=0.4, de_fac_loc=1.0, rng=1
    )
    sim = sim[:, sim.X.getnnz(axis=0) > 0].copy()  # drop genes without counts (they would warn)
    dropout_probability(sim, rng=0, n_clusters=range(2, 5), model="scimpute")
    assert sim.obsm["X_tsne"].shape == (80, 3)
    assert sim.obs["screpair_cluster"].dtype == "category"
    assert sim.uns["dropout_prob"]["groupby"] == "screpair_cluster"
    k = sim.uns["screpair_cluster"]["n_clusters"]
    assert sim.varm["dropout_prob_mu"].shape == (sim.n_vars, k)
    path = tmp_path / "out.h5ad"
    sim.write_h5ad(path)
    back = anndata.read_h5ad(path)
    np.testing.assert_allclose(
        back.layers["dropout_prob"].toarray(), sim.layers["dropout_prob"].toarray(), rtol=0
    )
    np.testing.assert_allclose(
        back.varm["dropout_prob_mu"].to_numpy(),
        sim.varm["dropout_prob_mu"].to_numpy(),
        equal_nan=True,
    )


def test_cli_dropout(tmp_path):
    import anndata

    from screpair.cli import main

    ad = _adata(np.random.default_rng(15))
    src, dst = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    ad.write_h5ad(src)
    assert (
        main(["dropout", str(src), str(dst), "--groupby", "group", "--threshold", "0.6",
              "--model", "scimpute", "-q"])
        == 0
    )
    out = anndata.read_h5ad(dst)
    assert "dropout_prob" in out.layers and out.uns["dropout_prob"]["threshold"] == 0.6
    ref = fit_dropout(ad.X, ad.obs["group"]).prob.toarray()
    np.testing.assert_allclose(out.layers["dropout_prob"].toarray(), ref, rtol=1e-7)


# --------------------------------------------------------------------------- ZINB dropout model


def test_zinb_zero_probabilities_by_hand():
    from screpair.dropout import nb_zero_logprob, zero_dropout_prob

    # P0 = (1 + phi m)^(-1/phi): m = 2, phi = 0.5 -> 2^-2 = 0.25; m = 4, phi = 1 -> 1/5
    np.testing.assert_allclose(np.exp(nb_zero_logprob([2.0, 4.0], [0.5, 1.0])), [0.25, 0.2],
                               rtol=1e-12)
    # flat curve pi = 1/2: p = pi (1 - P0) / (pi + (1 - pi) P0) = 0.375 / 0.625
    np.testing.assert_allclose(zero_dropout_prob(2.0, 0.5, (0.0, 0.0)), 0.6, rtol=1e-12)
    # pi = 1/4 (b0 = log(1/3)): 0.25 * 0.8 / (0.25 + 0.75 * 0.2) = 0.5
    np.testing.assert_allclose(zero_dropout_prob(4.0, 1.0, (np.log(1 / 3), 0.0)), 0.5, rtol=1e-12)
    # the curve acts on log m: b0 + b1 log m = 0 at m = e^2 for (2, -1) -> pi = 1/2;
    # phi = 1 -> P0 = 1 / (1 + e^2)
    m = np.exp(2.0)
    p0 = 1.0 / (1.0 + m)
    np.testing.assert_allclose(zero_dropout_prob(m, 1.0, (2.0, -1.0)),
                               0.5 * (1 - p0) / (0.5 + 0.5 * p0), rtol=1e-12)
    # known library sizes: gene mean 2, phi 0.5, size factors 0.5 and 2 -> m = 1 and 4,
    # P0 = 1.5^-2 = 4/9 and 3^-2 = 1/9; flat curve pi = 1/2 -> p = (5/9)/(13/9) = 5/13 and
    # (8/9)/(10/9) = 0.8: the deeper cell's zero is more likely a dropout
    np.testing.assert_allclose(zero_dropout_prob(np.array([0.5, 2.0]) * 2.0, 0.5, (0.0, 0.0)),
                               [5 / 13, 0.8], rtol=1e-12)
    # a gene that cannot be expressed (m = 0) never hides a positive count
    assert zero_dropout_prob(0.0, 0.5, (0.0, 0.0)) == 0.0


def test_zinb_gene_inflation_probabilities_by_hand():
    from screpair.dropout import zero_dropout_prob

    # noisy-OR pi = 1 - (1 - c)(1 - g): flat curve c = 1/2 and g = 1/2 -> pi = 3/4; m = 2,
    # phi = 0.5 -> P0 = 1/4; z = 0.75 / (0.75 + 0.25 * 0.25) = 12/13, p = z (1 - P0) = 9/13
    np.testing.assert_allclose(zero_dropout_prob(2.0, 0.5, (0.0, 0.0), 0.5), 9 / 13, rtol=1e-12)
    # c = 1/3 (b0 = log(1/2)), g = 1/3 -> pi = 1 - 4/9 = 5/9; m = 4, phi = 1 -> P0 = 1/5;
    # z = (5/9) / (5/9 + (4/9)(1/5)) = 25/29, p = 25/29 * 4/5 = 20/29
    np.testing.assert_allclose(zero_dropout_prob(4.0, 1.0, (np.log(0.5), 0.0), 1 / 3), 20 / 29,
                               rtol=1e-12)
    # g = 0 is the curve alone; g broadcasts per gene
    np.testing.assert_allclose(zero_dropout_prob([2.0, 2.0], 0.5, (0.0, 0.0), [0.0, 0.5]),
                               [0.6, 9 / 13], rtol=1e-12)
    # a highly expressed gene (m = 50, phi = 0.1 -> P0 = 6^-10): the curve gives
    # c = expit(1 - log 50) ~ 0.05, so a gene term of 0.2 makes its zero a near-certain dropout
    p_curve = zero_dropout_prob(50.0, 0.1, (1.0, -1.0))
    p_gene = zero_dropout_prob(50.0, 0.1, (1.0, -1.0), 0.2)
    c = 1 / (1 + np.exp(-(1 - np.log(50.0))))
    pi, p0 = 1 - (1 - c) * 0.8, 6.0**-10
    np.testing.assert_allclose(p_gene, pi * (1 - p0) / (pi + (1 - pi) * p0), rtol=1e-10)
    assert p_curve > 0.99 and p_gene > p_curve


def test_zinb_gene_inflation_em_update_by_hand():
    # one EM update of the gene term from its starting value g0: g = sum over the zeros of
    # E[gene dropout | y = 0] = z g0 / pi, over the number of cells; z = pi / (pi + (1 - pi) P0),
    # pi = 1 - (1 - c)(1 - g0), c from the starting curve (-1, -0.5), P0 from the starting
    # dispersion 0.1 and the starting (shrunk) cluster means
    from screpair.dropout import fit_zinb_dropout

    x = np.array([[4.0, 0.0, 3.0], [0.0, 2.0, 3.0], [2.0, 0.0, 6.0], [0.0, 1.0, 0.0]])
    lib = x.sum(axis=1)
    s = lib / lib.mean()
    mu = (x.sum(axis=0) + x.sum(axis=0) / s.sum()) / (s.sum() + 1.0)  # shrinkage 1
    m = s[:, None] * mu
    p0 = (1 + 0.1 * m) ** -10.0
    c = 1 / (1 + np.exp(-(-1.0 - 0.5 * np.log(m))))
    g0 = 0.05
    pi = 1 - (1 - c) * (1 - g0)
    z = pi / (pi + (1 - pi) * p0)
    want = np.where(x == 0, z * g0 / pi, 0.0).sum(axis=0) / 4
    fit = fit_zinb_dropout(x, np.zeros(4), max_iter=1, min_prob=0.0, inflation="gene",
                           inflation_init=g0)
    np.testing.assert_allclose(fit.inflation, want[None, :], rtol=1e-10)
    # a prior of N pseudo-cells without inflation divides by 4 + N instead
    fit = fit_zinb_dropout(x, np.zeros(4), max_iter=1, min_prob=0.0, inflation="gene",
                           inflation_init=g0, inflation_prior=4.0)
    np.testing.assert_allclose(fit.inflation, want[None, :] / 2, rtol=1e-10)
    # per cluster: the same sums over each cluster's cells
    lab = np.array([0, 0, 1, 1])
    fit = fit_zinb_dropout(x, lab, max_iter=1, min_prob=0.0, inflation="cluster",
                           inflation_init=g0)
    assert fit.inflation.shape == (2, 3)
    # inflation="none" is the curve alone: no gene term
    fit = fit_zinb_dropout(x, np.zeros(4), max_iter=1, min_prob=0.0, inflation="none")
    assert fit.inflation.shape == (0, 3)


def _assert_reliable(p, y, tol):
    """Reliability: in every decile bin of ``p`` with >= 200 zeros, the fraction of true
    dropouts ``y`` is within ``tol`` of the bin's mean probability."""
    idx = np.minimum((p * 10).astype(int), 9)
    for b in np.unique(idx):
        sel = idx == b
        if sel.sum() >= 200:
            assert abs(p[sel].mean() - y[sel].mean()) < tol, (b, p[sel].mean(), y[sel].mean())


def test_zinb_gene_inflation_recovers_inflated_genes_and_is_calibrated():
    from screpair.dropout import fit_zinb_dropout

    rng = np.random.default_rng(7)
    curve, phi = (0.5, -0.8), 0.2
    x, t = _zinb_sample(rng, 500, 120, curve, phi)
    # a gene term of 0.3 on every third gene, on top of the curve
    g = np.where(np.arange(120) % 3 == 0, 0.3, 0.0)
    x = np.where(rng.random(x.shape) < g, 0.0, x)
    keep = x.sum(axis=0) > 0
    x, t, g = x[:, keep], t[:, keep], g[keep]
    fit = fit_zinb_dropout(sp.csr_matrix(x), np.zeros(500), min_prob=0.0, max_iter=300,
                           tol=1e-12, inflation="gene")
    gi = fit.inflation[0]
    assert abs(np.median(gi[g > 0]) - 0.3) < 0.08, np.median(gi[g > 0])
    assert np.median(gi[g == 0]) < 0.05, np.median(gi[g == 0])
    # reliability: the curve and the gene term trade off along a ridge the EM climbs slowly
    # (after 100 updates the curve is (0.01, -0.66) for (0.5, -0.8) and one bin is 0.13 off;
    # after 300, (0.09, -0.68) and at most 0.073 off), so this test runs 300 updates
    zero = x == 0
    p, y = fit.prob.toarray()[zero], t[zero] > 0
    _assert_reliable(p, y, 0.09)


def test_zinb_prob_uses_size_factors_and_cluster_means(array_type):
    from screpair.dropout import fit_zinb_dropout, zero_dropout_prob

    # library sizes 10, 20, 30, 40 per cluster -> size factors 0.4, 0.8, 1.2, 1.6 (mean 25)
    rng = np.random.default_rng(3)
    base = rng.integers(0, 4, size=(8, 6)).astype(float)
    base[:, 0] = [0, 0, 1, 0, 0, 3, 0, 0]  # a sparse gene with zeros in deep and shallow cells
    base[:, -1] = 0.0
    lib = np.array([10, 20, 30, 40] * 2, dtype=float)
    base[:, -1] = lib - base[:, :-1].sum(axis=1)  # filler gene sets the library sizes exactly
    labels = np.repeat(["a", "b"], 4)
    fit = fit_zinb_dropout(array_type(base), labels, min_prob=0.0)
    np.testing.assert_allclose(fit.size_factor, lib / 25.0, rtol=1e-12)
    assert list(fit.clusters) == ["a", "b"] and list(fit.cell_cluster) == [0, 0, 0, 0, 1, 1, 1, 1]
    # every stored probability is the formula at m = s_i * mean[cluster, gene]
    m = fit.size_factor[:, None] * fit.mean[fit.cell_cluster]
    want = np.where(base == 0, zero_dropout_prob(m, fit.dispersion[None, :], fit.curve), 0.0)
    np.testing.assert_allclose(fit.prob.toarray(), want, rtol=1e-6, atol=1e-7)
    assert fit.prob.dtype == np.float32 and np.all(base[fit.prob.nonzero()] == 0)


def test_dropout_scales_are_screpair_norm(array_type):
    # log_cpm (clustering), scImpute's log10(CPM + 1.01) and the ZINB size factors are _norm's
    # arithmetic, bit for bit; a cell without counts stays out of all three
    from screpair import _norm
    from screpair.dropout import fit_zinb_dropout, log_cpm
    from screpair.dropout._em import _scimpute_log

    rng = np.random.default_rng(5)
    x = rng.poisson(1.5, size=(12, 7)).astype(float)
    x[4] = 0.0
    lib = x.sum(axis=1)

    def dense(m):
        return m.toarray() if sp.issparse(m) else np.asarray(m)

    for kw in ({}, {"target_sum": None}, {"target_sum": 1e4, "base": 10.0}):
        want = _norm.log_normalize(array_type(x), kw.get("target_sum", _norm.CPM),
                                   base=kw.get("base", 2.0))
        np.testing.assert_array_equal(dense(log_cpm(array_type(x), **kw)), dense(want))
    scale = np.where(lib > 0, 1e6 / np.where(lib > 0, lib, 1.0), 0.0)[:, None]
    got = log_cpm(array_type(x), pseudocount=0.5, base=10.0)  # any other pseudocount: dense
    np.testing.assert_allclose(got, np.log10(x * scale + 0.5), rtol=1e-13)
    sci = _scimpute_log(sp.csr_matrix(x))
    np.testing.assert_allclose(sci.data, np.log10(x[x > 0] * scale.repeat(7, 1)[x > 0] + 1.01),
                               rtol=1e-13)
    assert sci.nnz == np.count_nonzero(x)  # the zeros stay implicit (they stand for POINT)
    fit = fit_zinb_dropout(array_type(x), np.repeat([0, 1], 6), max_iter=1)
    want = np.zeros(12)
    want[lib > 0] = _norm.size_factors(lib[lib > 0])  # the mean over the cells with counts
    np.testing.assert_array_equal(fit.size_factor, want)


def test_zinb_mean_is_the_zero_inflated_mean_by_hand():
    # one cluster, three cells of size factor 1, counts (4, 4, 0) of one gene: with dropout
    # weight z at the zero the M-step mean is (8 + a mu_all) / (3 - z + a)
    from screpair.dropout import fit_zinb_dropout

    x = np.array([[4.0, 5.0], [4.0, 5.0], [0.0, 5.0]])
    fit = fit_zinb_dropout(x, np.zeros(3), max_iter=1, shrinkage=1.0, min_prob=0.0)
    # after one update the mean of gene 0 lies between the plain mean (8/3 shrunk) and 8/2
    mu_all = 8.0 / 3.0  # gene sum over the sum of size factors
    plain = (8.0 + mu_all) / (3.0 + 1.0)
    no_zero = (8.0 + mu_all) / (2.0 + 1.0)
    assert plain - 1e-12 <= fit.mean[0, 0] <= no_zero + 1e-12
    # gene 1 has no zeros: its mean is exactly (15 + 5) / (3 + 1) = 5
    np.testing.assert_allclose(fit.mean[0, 1], 5.0, rtol=1e-12)


def _zinb_sample(rng, n_cells, n_genes, curve, phi):
    s = rng.lognormal(0.0, 0.4, n_cells)
    s /= s.mean()
    mu = np.exp(rng.uniform(-2.0, 3.5, n_genes))
    m = s[:, None] * mu
    t = rng.negative_binomial(1.0 / phi, 1.0 / (1.0 + phi * m))
    pi = 1.0 / (1.0 + np.exp(-(curve[0] + curve[1] * np.log(m))))
    d = rng.random(m.shape) < pi
    return np.where(d, 0, t).astype(float), t


def test_zinb_recovers_known_parameters_and_is_calibrated():
    from screpair.dropout import fit_zinb_dropout

    rng = np.random.default_rng(5)
    curve, phi = (0.5, -0.8), 0.2
    x, t = _zinb_sample(rng, 500, 120, curve, phi)
    keep = x.sum(axis=0) > 0
    x, t = x[:, keep], t[:, keep]
    # the EM creeps along the curve / dispersion ridge: run it to convergence
    fit = fit_zinb_dropout(sp.csr_matrix(x), np.zeros(500), min_prob=0.0, max_iter=100, tol=1e-9)
    np.testing.assert_allclose(fit.curve, curve, atol=0.25)
    assert abs(np.median(fit.dispersion) - phi) < 0.05, np.median(fit.dispersion)
    zero = x == 0
    p, y = fit.prob.toarray()[zero], t[zero] > 0
    _assert_reliable(p, y, 0.08)


def test_zinb_calibrated_and_separates_dropouts_on_splat():
    from sklearn.metrics import average_precision_score

    from screpair import evaluate, simulate
    from screpair.dropout import fit_zinb_dropout

    sim = simulate.splat(n_obs=300, n_vars=600, preset="cnnimpute", rng=0)
    x = sim.layers["counts"].tocsr()
    fit = fit_zinb_dropout(x, sim.obs["group"])
    zeros = x.toarray() == 0
    y = (sim.layers["true_counts"].toarray() > 0)[zeros]
    ap = average_precision_score(y, fit.prob.toarray()[zeros])
    assert ap > y.mean() + 0.15, (ap, y.mean())
    calib = evaluate.dropout_calibration(fit.prob, x, sim.layers["true_counts"])
    assert evaluate.dropout_ece(calib) < 0.06, calib
    # far fewer zeros called missing than scImpute's model
    sci = fit_dropout(x, sim.obs["group"])
    assert (fit.prob.data > 0.5).sum() < 0.8 * (sci.prob.data > 0.5).sum()


def test_zinb_sets_aside_empty_cells_and_genes():
    from screpair.dropout import fit_zinb_dropout

    rng = np.random.default_rng(2)
    x = rng.poisson(2.0, size=(20, 6)).astype(float)
    x[3] = 0.0
    x[:, 2] = 0.0
    fit = fit_zinb_dropout(x, np.repeat([0, 1], 10))
    dense = fit.prob.toarray()
    assert np.all(dense[3] == 0) and np.all(dense[:, 2] == 0)
    assert fit.cell_cluster[3] == -1 and fit.size_factor[3] == 0
    assert fit.mean[0, 2] == 0 and fit.dispersion[2] == 0
    assert np.all((dense >= 0) & (dense <= 1)) and np.all(dense[x > 0] == 0)


def test_zinb_errors():
    from screpair.dropout import fit_zinb_dropout

    with pytest.raises(ValueError, match="max_iter"):
        fit_zinb_dropout(np.ones((3, 2)), np.zeros(3), max_iter=0)
    with pytest.raises(ValueError, match="shrinkage"):
        fit_zinb_dropout(np.ones((3, 2)), np.zeros(3), shrinkage=0.0)
    with pytest.raises(ValueError, match="inflation must be"):
        fit_zinb_dropout(np.ones((3, 2)), np.zeros(3), inflation="per-cell")
    with pytest.raises(ValueError, match="inflation_prior"):
        fit_zinb_dropout(np.ones((3, 2)), np.zeros(3), inflation_prior=-1.0)
    with pytest.raises(ValueError, match="inflation_init"):
        fit_zinb_dropout(np.ones((3, 2)), np.zeros(3), inflation_init=0.0)


def test_dropout_probability_zinb_writes_slots():
    from screpair.dropout import fit_zinb_dropout

    ad = _adata(np.random.default_rng(16))
    before = ad.copy()
    out = dropout_probability(ad, groupby="group", copy=True)  # default model: zinb
    assert "dropout_prob" not in ad.layers
    fit = fit_zinb_dropout(ad.X, ad.obs["group"])
    np.testing.assert_allclose(out.layers["dropout_prob"].toarray(), fit.prob.toarray(), rtol=1e-7)
    assert out.layers["dropout_prob"].dtype == np.float32
    df = out.varm["dropout_prob_mean"]
    assert list(df.columns) == ["A", "B"]
    np.testing.assert_allclose(df.to_numpy(), fit.mean.T, rtol=1e-12)
    np.testing.assert_allclose(out.var["dropout_prob_dispersion"], fit.dispersion, rtol=1e-12)
    uns = out.uns["dropout_prob"]
    assert uns["model"] == "zinb" and uns["params"]["model"] == "zinb"
    np.testing.assert_allclose(uns["curve"], fit.curve, rtol=1e-12)
    assert uns["n_missing"] == int((fit.prob.data > 0.5).sum())
    assert (out.X != before.X).nnz == 0
    with pytest.raises(ValueError, match="model"):
        dropout_probability(ad, groupby="group", model="nope")


def test_dropout_probability_zinb_gene_inflation_slots():
    from screpair.dropout import fit_zinb_dropout

    ad = _adata(np.random.default_rng(18))
    out = dropout_probability(ad, groupby="group", inflation="gene", copy=True)
    fit = fit_zinb_dropout(ad.X, ad.obs["group"], inflation="gene")
    np.testing.assert_allclose(out.layers["dropout_prob"].toarray(), fit.prob.toarray(), rtol=1e-7)
    df = out.varm["dropout_prob_inflation"]
    assert list(df.columns) == ["all"]
    np.testing.assert_allclose(df.to_numpy(), fit.inflation.T, rtol=1e-12)
    assert out.uns["dropout_prob"]["params"]["inflation"] == "gene"
    # the default writes no gene term
    assert "dropout_prob_inflation" not in dropout_probability(ad, groupby="group", copy=True).varm
    with pytest.raises(ValueError, match="inflation"):
        dropout_probability(ad, groupby="group", model="scimpute", inflation="gene")


def test_cli_dropout_zinb_default(tmp_path):
    import anndata

    from screpair.cli import main
    from screpair.dropout import fit_zinb_dropout

    ad = _adata(np.random.default_rng(17))
    src, dst = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    ad.write_h5ad(src)
    assert main(["dropout", str(src), str(dst), "--groupby", "group", "-q"]) == 0
    out = anndata.read_h5ad(dst)
    assert out.uns["dropout_prob"]["model"] == "zinb"
    ref = fit_zinb_dropout(ad.X, ad.obs["group"]).prob.toarray()
    np.testing.assert_allclose(out.layers["dropout_prob"].toarray(), ref, rtol=1e-7)
