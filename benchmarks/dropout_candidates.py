"""Measure dropout-model candidates on four Splat settings with the models' own clusters (issue 20).

Usage: ``python benchmarks/dropout_candidates.py`` (about 8 min on 2 cores). Prints PR-AUC,
expected calibration error (10 equal bins) and the fraction of zeros above 0.5 for: scImpute's
mixture, the ZINB model after 15 / up to 50 EM updates, the logistic curve alone, the NB zero
probability alone (1 - P0, a ranking only), the ZINB with one cluster, and kNN(15) expected
counts plugged into the ZINB fit (the last three use the fit of the 50-update run). Numbers are
in benchmarks/RESULTS.md (section dropout).
"""

import time

import numpy as np
import scipy.sparse as sp
from scipy.special import expit
from sklearn.decomposition import PCA
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors

from screpair import simulate
from screpair.dropout import cluster_cells, fit_dropout
from screpair.dropout._zinb import _posterior, fit_zinb_dropout, nb_zero_logprob


def ece(p, y):
    b = np.minimum((p * 10).astype(int), 9)
    return sum(
        abs(p[b == i].mean() - y[b == i].mean()) * (b == i).mean()
        for i in range(10)
        if (b == i).any()
    )


settings = [
    dict(),
    dict(dropout_mid=0.0, dropout_shape=-1.0),
    dict(dropout_mid=2.0, dropout_shape=-1.0),
    dict(dropout_mid=1.0, dropout_shape=-0.3),
]
for extra in settings:
    sim = simulate.splat(preset="cnnimpute", rng=0, **extra)
    x = sp.csr_matrix(sim.X)
    tru = sp.csr_matrix(sim.layers["true_counts"])
    xd = x.toarray()
    zero = xd == 0
    y = (tru.toarray() > 0)[zero]
    res = cluster_cells(x, rng=0)
    print(
        f"## setting {extra or 'cnnimpute preset (mid 1, shape -0.5)'}: base rate {y.mean():.3f}, own clusters k={res.n_clusters}",
        flush=True,
    )

    def rep(name, p, dt, y=y):
        print(
            f"  {name:28s} PR-AUC {average_precision_score(y, p):.3f}  ECE {ece(p, y):.3f}  zeros>0.5 {(p > 0.5).mean():.3f}  ({dt:.1f} s)",
            flush=True,
        )

    t = time.time()
    f2 = fit_dropout(x, res.labels)
    rep("scimpute", f2.prob.toarray()[zero], time.time() - t)
    for mi in (15, 50):
        t = time.time()
        fit = fit_zinb_dropout(x, res.labels, max_iter=mi)
        dt = time.time() - t
        rep(f"zinb own max_iter={mi} ({fit.n_iter})", fit.prob.toarray()[zero], dt)
    s = fit.size_factor
    m = s[:, None] * fit.mean[fit.cell_cluster]
    rep(
        "curve only expit(b0+b1 log m)",
        expit(fit.curve[0] + fit.curve[1] * np.log(np.maximum(m, 1e-300)))[zero],
        0,
    )
    rep(
        "NB rank 1-P0 (no curve)",
        np.nan_to_num(-np.expm1(nb_zero_logprob(m, np.maximum(fit.dispersion[None, :], 1e-4))))[
            zero
        ],
        0,
    )
    t = time.time()
    f1 = fit_zinb_dropout(x, np.zeros(x.shape[0]), max_iter=50)
    rep("zinb one cluster", f1.prob.toarray()[zero], time.time() - t)
    # kNN expected counts: mean of y/s over 15 neighbours in PCA of log CPM, zero-corrected by the fit's z
    t = time.time()
    lg = np.log1p(xd / s[:, None])
    pcs = PCA(20, random_state=0).fit_transform(lg)
    nn = NearestNeighbors(n_neighbors=15).fit(pcs)
    _, idx = nn.kneighbors(pcs)
    W = sp.csr_matrix(
        (np.full(idx.size, 1 / 15), (np.repeat(np.arange(x.shape[0]), 15), idx.ravel())),
        shape=(x.shape[0],) * 2,
    )
    phs = np.maximum(fit.dispersion[None, :], 1e-4)
    lp0 = nb_zero_logprob(m, phs)
    z, _ = _posterior(np.log(np.maximum(m, 1e-300)), lp0, fit.curve)
    z = np.where(zero, z, 0)
    mk = (W @ xd + 1.0 * fit.mean[fit.cell_cluster]) / (W @ ((1 - z) * s[:, None]) + 1.0)
    mk = s[:, None] * mk
    _, pk = _posterior(np.log(np.maximum(mk, 1e-300)), nb_zero_logprob(mk, phs), fit.curve)
    pk = np.where(mk > 0, pk, 0)
    rep("kNN(15) means + zinb curve", pk[zero], time.time() - t)
