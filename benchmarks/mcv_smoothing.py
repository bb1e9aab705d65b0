"""Why MAGIC wins Open Problems' MCV MSE, and how much smoothing knn needs (issue 19).

Prepares the MCV task (``screpair.evaluate.MCV``, train_frac 0.9, the suite's seed) of each
dataset, then scores on the benchmark's test split (for the study; no method sees it):

- knn (``KNNImputer``'s neighbours) with neighbourhood size ``k`` and ``t`` repeated smoothing
  steps (``W^t @ X``), averaging the CP10k profiles (``linear``: what ``KNNImputer`` does by
  default), their log1p(CP10k) (``log``) or their log1p(CPM) (``logcpm``: MAGIC's space,
  ``KNNImputer(space="log")``);
- ``KNNImputer(k="mcv")``: k calibrated by molecular cross-validation of the train split only,
  in both spaces and with 1 or 2 steps;
- with ``--magic``: MAGIC at its defaults (t=3) and with t = 1, 2 (magic-impute must be
  installed).

Usage::

    nice -n 19 env PYTHONPATH=src python benchmarks/mcv_smoothing.py pbmc3k baron \
        [--data-dir ../shared/data] [--seed 0] [--magic] [--out mcv_smoothing.csv]
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from screpair import _norm
from screpair.evaluate import MCV, mcv_mse, mcv_poisson
from screpair.evaluate._suites import _data_dir, _dataset
from screpair.methods.knn import KNNImputer, neighbor_matrix

KS = (5, 15, 30, 50, 100, 200)
STEPS = (1, 2, 3)
#: averaged values and the way back to CP10k
SPACES = {
    "linear": (lambda n: n, lambda v: v),
    "log": (np.log1p, np.expm1),
    "logcpm": (lambda n: np.log1p(n * 100.0), lambda v: np.expm1(v) / 100.0),
}


def _scores(task, imputed) -> dict[str, float]:
    t = task.truth
    return {"mcv_mse": mcv_mse(t["test"], imputed),
            "mcv_poisson_mcv": mcv_poisson(t["test"], imputed, train_sum=t["train_sum"],
                                           order="mcv")}


def run(name: str, folder, seed: int, magic: bool) -> list[dict]:
    task = MCV().prepare(ad.read_h5ad(_dataset(name, folder)), rng=seed)
    x = sp.csr_matrix(task.adata.X, dtype=np.float64)
    lib = _norm.library_size(x)
    rows = []

    def add(method, k, t, space, imputed, sec, **extra):
        rows.append({"dataset": name, "seed": seed, "method": method, "k": k, "t": t,
                     "space": space, **_scores(task, imputed), "seconds": sec, **extra})
        r = rows[-1]
        print(f"{name:9s} {method:8s} k={k!s:>4s} t={t!s:>2s} {space:7s} "
              f"mse={r['mcv_mse']:.4f} pois_mcv={r['mcv_poisson_mcv']:.4f} ({sec:.1f}s)",
              flush=True)

    add("raw", 1, 0, "-", x, 0.0)
    knn = KNNImputer(k=max(KS), rng=seed).fit(x)
    norm = _norm.normalize(knn.counts_, _norm.CP10K).toarray()
    for k in KS:
        w = neighbor_matrix(knn.neighbors_, k)
        for space, (fwd, back) in SPACES.items():
            v = fwd(norm)
            for t in STEPS:
                t0 = time.perf_counter()
                v = w @ v
                add("knn", k, t, space, back(v) * (lib / _norm.CP10K)[:, None],
                    time.perf_counter() - t0)
    for space in ("counts", "log"):
        for steps in (1, 2):
            t0 = time.perf_counter()
            est = KNNImputer(k="mcv", space=space, steps=steps, rng=seed).fit(x)
            imputed = est.transform(x)
            add("knn_mcv", int(est.k_), steps, space, imputed, time.perf_counter() - t0,
                inner={k: round(v, 4) for k, v in est.mcv_losses_.items()})
            print("    inner MCV losses:", rows[-1]["inner"], flush=True)
    if magic:
        from screpair.evaluate._peers import MagicImputer

        for t in (1, 2, None):
            t0 = time.perf_counter()
            imputed = MagicImputer(t=t, rng=seed).fit_transform(x)
            add("magic", 5, t or 3, "logcpm", imputed, time.perf_counter() - t0)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("datasets", nargs="+")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--magic", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for name in a.datasets:
        rows += run(name, _data_dir(a.data_dir), a.seed, a.magic)
    if a.out:
        pd.DataFrame(rows).to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
