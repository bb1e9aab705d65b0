"""Benchmark clustering + dropout probabilities (cnnImpute steps 1-2) end to end.

Usage::

    python benchmarks/bench_dropout.py [--n-obs 3000] [--n-vars 20000] [--seed 0] [--n-jobs 1]
                                       [--skip-cluster] [--baron PATH]

Steps:

1. Simulate ``n_obs x n_vars`` counts with ``screpair.simulate.splat`` (5 groups as in the
   cnnImpute preset, logistic dropout shape -0.5, midpoint 1), not timed.
2. ``cluster_cells`` (log2 CPM, PCA 50, 3-D t-SNE, ADPclust, k-means) and ``fit_dropout`` (the
   vectorised scImpute EM, all clusters x all genes): wall time of each and of the whole, peak RSS
   (``resource.getrusage``: the whole process, simulation included), ARI of the clusters against
   the simulated groups, and how well the dropout probability separates dropout zeros from true
   zeros: average precision (PR-AUC) of the stored probabilities and of the exact log-odds, next to
   the fraction of dropouts among the zeros (the baseline a random score gets).
3. With ``--baron`` (default: the shared Baron 2016 mouse pancreas file, if present): ARI of the
   clustering against ``obs["cell_type"]``.

Timings are wall-clock on whatever machine runs this; on a shared 2-core box they are pessimistic.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

BARON = Path("/work/shared/data/baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad")


def peak_rss_mb() -> float:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 1024


def zero_scores(x: sp.csr_matrix, mask: sp.csr_matrix, fit, codes: np.ndarray):
    """(is_dropout, stored prob, exact log-odds) over every zero entry, built cluster by cluster."""
    from screpair.dropout import POINT  # noqa: F401 - documents the scale

    ys, ps, ls = [], [], []
    logit = np.where(fit.valid, fit.zero_logit, -np.inf)
    for c in range(fit.clusters.size):
        rows = np.flatnonzero(codes == c)
        xs = x[rows].toarray() == 0
        ms = mask[rows].toarray().astype(bool)
        ys.append(ms[xs])
        ps.append(np.broadcast_to(fit.zero_prob[c], xs.shape)[xs])
        ls.append(np.broadcast_to(logit[c], xs.shape)[xs])
    y, p, lo = np.concatenate(ys), np.concatenate(ps), np.concatenate(ls)
    lo = np.where(np.isfinite(lo), lo, np.nanmin(lo[np.isfinite(lo)]) - 1.0)
    return y, p, lo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-obs", type=int, default=3000)
    ap.add_argument("--n-vars", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-jobs", type=int, default=1)
    ap.add_argument("--skip-cluster", action="store_true", help="use the true groups (EM only)")
    ap.add_argument("--baron", default=str(BARON))
    args = ap.parse_args(argv)
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("screpair").setLevel(logging.INFO)

    from sklearn.metrics import adjusted_rand_score, average_precision_score

    from screpair import simulate
    from screpair.dropout import cluster_cells, fit_dropout

    t0 = time.perf_counter()
    sim = simulate.splat(n_obs=args.n_obs, n_vars=args.n_vars, preset="cnnimpute", rng=args.seed)
    x = sp.csr_matrix(sim.layers["counts"])
    groups = sim.obs["group"].cat.codes.to_numpy()
    print(
        f"simulated {x.shape[0]} cells x {x.shape[1]} genes, "
        f"{1 - x.nnz / np.prod(x.shape):.1%} zeros ({time.perf_counter() - t0:.1f} s, not timed)"
    )

    start, cpu0 = time.perf_counter(), time.process_time()
    if args.skip_cluster:
        labels, t_cluster = groups, 0.0
    else:
        res = cluster_cells(x, rng=args.seed, n_jobs=args.n_jobs)
        t_cluster = time.perf_counter() - start
        labels = res.labels
        print(
            f"cluster_cells: {t_cluster:.1f} s, {res.n_clusters} clusters, "
            f"silhouette {res.silhouette:.3f}, ARI vs groups "
            f"{adjusted_rand_score(groups, labels):.3f}"
        )
    t1 = time.perf_counter()
    fit = fit_dropout(x, labels)
    t_em = time.perf_counter() - t1
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    print(f"fit_dropout: {t_em:.1f} s; status {fit.status_counts()}")
    print(
        f"TOTAL clustering + EM: {total:.1f} s wall, {cpu:.1f} s CPU (all threads) "
        f"(goal < 60 s wall on 2 cores); peak RSS {peak_rss_mb():.0f} MB"
    )
    if hasattr(os, "getloadavg"):
        print(
            f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
            "(timings are pessimistic when it exceeds the CPU count)"
        )

    y, p, lo = zero_scores(x, sim.layers["dropout_mask"].tocsr(), fit, fit.cell_cluster)
    base = y.mean()
    print(f"dropout zeros among zeros (PR-AUC baseline): {base:.3f}")
    print(
        f"PR-AUC, stored prob (float): {average_precision_score(y, p):.3f}; "
        f"exact log-odds: {average_precision_score(y, lo):.3f}; "
        f"missing (p > 0.5): {np.mean(p > 0.5):.1%} of zeros, "
        f"precision {y[p > 0.5].mean() if (p > 0.5).any() else float('nan'):.3f}, "
        f"recall {np.mean(p[y] > 0.5):.3f}"
    )

    if args.baron and Path(args.baron).is_file():
        import anndata as ad

        baron = ad.read_h5ad(args.baron)
        t2 = time.perf_counter()
        res = cluster_cells(baron.X, rng=args.seed, n_jobs=args.n_jobs)
        print(
            f"Baron mouse pancreas ({baron.n_obs} cells): {res.n_clusters} clusters in "
            f"{time.perf_counter() - t2:.1f} s, ARI vs cell_type "
            f"{adjusted_rand_score(baron.obs['cell_type'].astype(str), res.labels):.3f} "
            f"({baron.obs['cell_type'].nunique()} types)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
