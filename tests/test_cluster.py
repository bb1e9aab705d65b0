"""Cell clustering of cnnImpute: log2 CPM, 3-D t-SNE, ADPclust (density peaks), k-means."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, silhouette_score

from screpair.dropout import adpclust, cluster, cluster_cells, log_cpm
from screpair.dropout._cluster import amise_bandwidth, density_delta, silhouette_from_dist


def _blobs(rng, centers, n_per, sd=0.3):
    centers = np.asarray(centers, dtype=float)
    y = np.vstack([c + rng.normal(0, sd, (n_per, centers.shape[1])) for c in centers])
    return y, np.repeat(np.arange(len(centers)), n_per)


def test_log_cpm_hand_computed(array_type):
    x = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 4.0]])
    got = log_cpm(array_type(x))
    got = got.toarray() if sp.issparse(got) else got
    expected = np.array(
        [
            [np.log2(250_001), np.log2(750_001), 0.0],
            [0.0, 0.0, 0.0],  # a cell without counts stays at 0
            [np.log2(250_001), np.log2(250_001), np.log2(500_001)],
        ]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    med = log_cpm(x, target_sum=None)  # scale to the median library size (6)
    np.testing.assert_allclose(med[0, :2], np.log2([6 / 4 + 1, 18 / 4 + 1]), rtol=1e-12)


def test_amise_bandwidth_formula():
    assert amise_bandwidth(1000, 3) == pytest.approx(
        (4 / 5) ** (1 / 7) * 1000 ** (-1 / 7), rel=1e-12
    )
    assert amise_bandwidth(100, 1) == pytest.approx((4 / 3) ** 0.2 * 100**-0.2, rel=1e-12)


def test_density_delta_hand_computed():
    # points 0, 1, 2, 10 on a line; h = 1
    pos = np.array([0.0, 1.0, 2.0, 10.0])
    d = np.abs(pos[:, None] - pos[None, :])
    f, delta = density_delta(d, 1.0)
    e1, e4 = np.exp(-0.5), np.exp(-2.0)
    np.testing.assert_allclose(f[:3], [1 + e1 + e4, 1 + 2 * e1, 1 + e1 + e4], rtol=1e-12)
    assert f[3] == pytest.approx(1 + np.exp(-32) + np.exp(-40.5) + np.exp(-50), rel=1e-12)
    # densest is point 1; points 0 and 2 tie (index order breaks it): 0 then 2; then 10
    # delta(0) = |0 - 1| = 1, delta(2) = min(|2 - 1|, |2 - 0|) = 1, delta(10) = 8; delta(1) = max = 8
    np.testing.assert_allclose(delta, [1.0, 8.0, 1.0, 8.0], rtol=1e-12)


def test_silhouette_matches_sklearn():
    rng = np.random.default_rng(0)
    y, _ = _blobs(rng, [[0, 0], [3, 0], [0, 3]], 20, sd=1.0)
    d = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1))
    labels = rng.integers(0, 3, y.shape[0])
    labels[0] = 3  # a singleton cluster scores 0 in both
    expected = silhouette_score(d, labels, metric="precomputed")
    assert silhouette_from_dist(d, labels) == pytest.approx(expected, rel=1e-10)


def test_adpclust_finds_separated_blobs():
    rng = np.random.default_rng(1)
    y, truth = _blobs(rng, [[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6]], 50, sd=0.5)
    labels, centers, sil, h, cands = adpclust(y)
    assert centers.size == 4
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0, abs=1e-12)
    assert sorted(truth[centers]) == [0, 1, 2, 3]  # one density peak per blob
    assert sil == pytest.approx(max(c[3] for c in cands), abs=1e-12)
    assert len({round(c[0], 12) for c in cands}) == 10  # 10 bandwidths tried
    fixed = adpclust(y, n_clusters=3)
    assert fixed[1].size == 3


def test_adpclust_rejects_bad_parameters():
    y = np.random.default_rng(2).normal(size=(20, 3))
    with pytest.raises(ValueError, match="n_clusters"):
        adpclust(y, n_clusters=1)
    with pytest.raises(ValueError, match="f_cut"):
        adpclust(y, f_cut=(1.2,))


def _separable_counts(rng, n_per=50, n_genes=200, n_groups=3):
    base = rng.gamma(2.0, 2.0, n_genes)
    groups = np.repeat(np.arange(n_groups), n_per)
    fold = np.ones((n_groups, n_genes))
    for k in range(n_groups):
        de = rng.choice(n_genes, 40, replace=False)
        fold[k, de] = rng.choice([0.1, 8.0], 40)
    lam = base * fold[groups] * rng.lognormal(0, 0.2, (groups.size, 1))
    return rng.poisson(lam).astype(float), groups


def test_cluster_cells_recovers_groups_and_is_seeded(array_type):
    rng = np.random.default_rng(3)
    x, groups = _separable_counts(rng)
    res = cluster_cells(array_type(x), rng=0)
    assert res.embedding.shape == (x.shape[0], 3)
    assert res.labels.dtype.kind == "i" and res.labels.shape == (x.shape[0],)
    assert res.n_clusters == res.labels.max() + 1 == res.centers.size
    assert adjusted_rand_score(groups, res.labels) >= 0.95
    again = cluster_cells(array_type(x), rng=0)
    np.testing.assert_array_equal(again.labels, res.labels)
    np.testing.assert_allclose(again.embedding, res.embedding, rtol=0, atol=0)


def test_cluster_cells_without_opentsne_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openTSNE", None)  # makes the import fail
    x, _ = _separable_counts(np.random.default_rng(6), n_per=10)
    with pytest.raises(ImportError) as info:
        cluster_cells(x, rng=0)
    assert any("pip install openTSNE" in note for note in info.value.__notes__)


def test_cluster_cells_small_input():
    rng = np.random.default_rng(4)
    x, _ = _separable_counts(rng, n_per=6, n_genes=50, n_groups=2)
    res = cluster_cells(x, rng=0, n_clusters=2)  # 12 cells: perplexity lowered to (n - 1) / 3
    assert res.n_clusters == 2 and res.embedding.shape == (12, 3)
    with pytest.raises(ValueError, match="at least 4 cells"):
        cluster_cells(x[:3], rng=0)


def test_cluster_writes_obs_and_obsm():
    from anndata import AnnData

    rng = np.random.default_rng(5)
    x, groups = _separable_counts(rng, n_per=30)
    ad = AnnData(X=sp.csr_matrix(x))
    out = cluster(ad, rng=0, copy=True)
    assert "X_tsne" not in ad.obsm and "screpair_cluster" not in ad.obs
    assert out.obs["screpair_cluster"].dtype == "category"
    assert out.obsm["X_tsne"].shape == (90, 3)
    info = out.uns["screpair_cluster"]
    assert info["n_clusters"] == out.obs["screpair_cluster"].nunique()
    assert adjusted_rand_score(groups, out.obs["screpair_cluster"]) >= 0.95
    assert cluster(ad, rng=0, key_added="cl") is None and "cl" in ad.obs


@pytest.mark.slow
def test_cluster_cells_cnnimpute_preset():
    """ARI on the cnnImpute simulation preset (2000 cells x 4000 genes, 5 groups) >= 0.9 (issue 4).

    Uses the default preprocessing (HVGs, 1e4 scaling, unit-variance genes, 10 PCs); cnnImpute's
    exact log2(CPM + 1) of all genes lets the zero/non-zero pattern dominate this preset.
    """
    from screpair import simulate

    sim = simulate.splat(preset="cnnimpute", rng=0)
    res = cluster_cells(sim.layers["counts"], rng=0)
    ari = adjusted_rand_score(sim.obs["group"], res.labels)
    print(f"cnnimpute preset: {res.n_clusters} clusters, ARI {ari:.3f}")
    assert res.n_clusters == 5
    assert ari >= 0.9
