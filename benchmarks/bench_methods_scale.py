"""Memory and time of knn, alra, saver and cnn as the number of cells grows (issue 16), before
and after the fit-small / transform-by-rows rewrite, and the accuracy cost of the scalable parts.

Data: pbmc3k (2,700 cells x 13,714 genes) replicated to ``n`` cells in memory by binomial
thinning (cell ``i`` is a thinning of cell ``i mod 2700`` with probability drawn uniformly from
[0.5, 1], seed 0), CSR float64.

Usage::

    nice python benchmarks/bench_methods_scale.py --methods knn,alra --cells 10000,30000 \\
        --old-src /tmp/wt_old/src [--block 2000]
    nice python benchmarks/bench_methods_scale.py --accuracy [--methods knn,alra,saver,cnn]

cnn trains for ``--cnn-epochs`` epochs here (3; the time of a full training is the epochs times
the time per epoch, which both versions share); its new code fits the dropout model on
``--cnn-dropout-cells`` sampled cells (default: cnn's ``n_dropout_cells``, 10,000) and trains
on every cell (up to ``n_train_cells``, 50,000). Version ``whole``: the new code with the
posterior of all rows at once (the in-memory path).

Each (method, cells, version) runs in its own subprocess (``PYTHONPATH`` = ``--old-src`` for the
old code, this checkout's ``src`` for the new): peak RSS (``ru_maxrss``) minus the RSS after the
data were built ("method" memory), and wall time of ``fit`` plus the posterior of every cell. The
old code computes the posterior of all rows at once (what it can do); the new code computes it in
blocks of ``--block`` rows (what the chunked file pipeline does), each block discarded after use,
so the new numbers exclude the dense all-cells output (``n x 13,714 x 8`` bytes, e.g. 3.3 GB at
30,000 cells) that the old code must hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path("/work/shared/data/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad")
BARON = Path("/work/shared/data/baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad")
NEW_SRC = Path(__file__).resolve().parents[1] / "src"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _counts(path: Path):
    import anndata as ad
    import scipy.sparse as sp

    x = sp.csr_matrix(ad.read_h5ad(path).X, dtype=np.float64)
    keep = np.asarray((x > 0).sum(0)).ravel() > 0
    return x[:, keep]


def replicate(n: int, seed: int = 0):
    """``n`` cells: binomial thinnings of pbmc3k's cells (cyclically), CSR float64."""
    import scipy.sparse as sp

    base = _counts(DATA)
    rng = np.random.default_rng(seed)
    src = np.arange(n) % base.shape[0]
    x = sp.csr_matrix(base[src])
    p = rng.uniform(0.5, 1.0, n)
    x.data = rng.binomial(x.data.astype(np.int64), np.repeat(p, np.diff(x.indptr))).astype(float)
    x.eliminate_zeros()
    lib = np.asarray(x.sum(1)).ravel()
    x = x[lib > 0]
    x = x[:, np.asarray((x > 0).sum(0)).ravel() > 0]
    x = sp.csr_matrix(x)
    x.sort_indices()
    return x


CNN_EPOCHS = 3
#: cnn's epoch limit in --accuracy (``--cnn-acc-epochs``; None: the default training)
CNN_ACC_EPOCHS: int | None = None
#: cnn's n_dropout_cells in the new code's runs (``--cnn-dropout-cells``; None: its default)
CNN_DROPOUT_CELLS: int | None = None


def _params(method: str) -> dict:
    return {"saver": {"progress": False, "n_jobs": 1},
            "cnn": {"train": {"n_epochs": CNN_EPOCHS, "progress": False}}}.get(method, {})


def worker(method: str, n: int, version: str, block: int) -> dict:
    import screpair

    x = replicate(n)
    rss0 = _rss_mb()
    params = _params(method)
    if method == "cnn" and version != "old" and CNN_DROPOUT_CELLS is not None:
        params["n_dropout_cells"] = CNN_DROPOUT_CELLS
    est = screpair.get_method(method)(rng=0, **params)
    t0 = time.perf_counter()
    est.fit(x)
    t_fit = time.perf_counter() - t0
    check = 0.0
    if version in ("old", "whole"):  # "whole": the new code, all rows at once (in memory)
        check = float(np.asarray(est.posterior(x).mean[:, :50]).sum())
    else:
        from screpair.methods._base import data_context

        ctx = data_context(x, x)
        for start in range(0, x.shape[0], block):
            rows = slice(start, min(start + block, x.shape[0]))
            sub = ctx.__class__(**{**ctx.__dict__, "rows": rows})
            check += float(np.asarray(est._posterior_validated(x[rows], sub).mean[:, :50]).sum())
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "cells": x.shape[0], "genes": x.shape[1], "version": version,
            "fit_s": round(t_fit, 1), "total_s": round(total, 1), "data_mb": round(rss0),
            "peak_mb": round(peak), "method_mb": round(peak - rss0), "check": check}


def run_one(method, n, version, block, old_src) -> dict:
    env = dict(os.environ, PYTHONPATH=str(old_src if version == "old" else NEW_SRC))
    cmd = [sys.executable, __file__, "--worker", method, str(n), version, "--block", str(block),
           "--cnn-epochs", str(CNN_EPOCHS)]
    if CNN_DROPOUT_CELLS is not None:
        cmd += ["--cnn-dropout-cells", str(CNN_DROPOUT_CELLS)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"method": method, "cells": n, "version": version,
                "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _old_output(method: str, path: Path, old_src: Path) -> np.ndarray:
    """``method``'s all-cells output on ``path`` from the old code (a subprocess)."""
    out = Path(f"/tmp/bench_scale_old_{method}_{path.stem}.npy")
    if not out.exists():
        code = (f"import sys, numpy as np; sys.path.insert(0, {str(NEW_SRC.parent / 'benchmarks')!r});"
                "import bench_methods_scale as b, screpair;"
                f"x = b._counts(b.Path({str(path)!r}));"
                f"est = screpair.get_method({method!r})(rng=0, **b._params({method!r}));"
                f"np.save({str(out)!r}, est.fit_transform(x))")
        env = dict(os.environ, PYTHONPATH=str(old_src))
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return np.load(out)


def _masked(est, x, seed: int = 0) -> float:
    """RMSE of log1p(CP10k) at 10 % of the non-zeros, hidden before fitting (bench_saver's
    masked protocol)."""
    from bench_saver import mask_nonzeros, masked_scores

    from screpair import _norm

    xm, r, c, v = mask_nonzeros(x, 0.1, np.random.default_rng(seed))
    keep = np.asarray(xm.sum(1)).ravel() > 0
    if not keep.all():  # a cell whose counts were all hidden: unmask it
        xm, r, c, v = mask_nonzeros(x, 0.1, np.random.default_rng(seed + 1))
    imputed = est.fit_transform(xm)
    return masked_scores(imputed, r, c, v, _norm.library_size(xm))[0]


def accuracy(methods: list[str], old_src: Path) -> None:
    """What the scalable parts change, on pbmc3k and baron: knn's approximate neighbours (vs
    exact: neighbour recall, MSE of log1p(CP10k)); alra and knn vs the old code (max abs
    difference on log1p); saver's prior from a sample of cells (``n_fit_cells`` 1,000 of 2,700
    on pbmc3k, 300 of 822 on baron) vs all cells: MSE of log1p and the masked-protocol RMSE."""
    from screpair import _norm
    from screpair.methods.knn import KNNImputer
    from screpair.methods.saver import SaverImputer

    sys.path.insert(0, str(NEW_SRC.parent / "benchmarks"))
    for name, path, n_fit in (("pbmc3k", DATA, 1000), ("baron", BARON, 300)):
        x = _counts(path)
        if "knn" in methods:
            ex = KNNImputer(rng=0).fit(x)
            new = ex.transform(x)
            d = np.abs(np.log1p(new) - np.log1p(_old_output("knn", path, old_src))).max()
            print(f"knn {name}: new vs old code max|dlog1p| {d:.3g}", flush=True)
            ap = KNNImputer(rng=0, exact_max_cells=0).fit(x)
            recall = np.mean([np.intersect1d(a, b).size / a.size
                              for a, b in zip(ap.neighbors_, ex.neighbors_, strict=True)])
            le, la = _norm.log_normalize(new), _norm.log_normalize(ap.transform(x))
            mse = float(np.mean((le - la) ** 2))
            print(f"knn {name}: approximate vs exact neighbours: recall {recall:.4f}, "
                  f"MSE(log1p CP10k) {mse:.3g} ({mse / le.var():.2g} of the variance); masked "
                  f"RMSE exact {_masked(KNNImputer(rng=0), x):.4f}, approximate "
                  f"{_masked(KNNImputer(rng=0, exact_max_cells=0), x):.4f}", flush=True)
        if "alra" in methods:
            import screpair

            new = screpair.get_method("alra")(rng=0).fit_transform(x)
            old = _old_output("alra", path, old_src)
            d = np.abs(np.log1p(new) - np.log1p(old)).max()
            print(f"alra {name}: new vs old code max|dlog1p| {d:.3g}, identical "
                  f"{np.array_equal(new, old)}", flush=True)
        if "saver" in methods:
            kw = {"rng": 0, "progress": False, "n_jobs": 1}
            full = SaverImputer(n_fit_cells=None, **kw).fit_transform(x)
            sub = SaverImputer(n_fit_cells=n_fit, **kw).fit_transform(x)
            a, b = _norm.log_normalize(full), _norm.log_normalize(sub)
            mse = float(np.mean((a - b) ** 2))
            r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
            print(f"saver {name}: prior from {n_fit} of {x.shape[0]} cells vs all: MSE(log1p "
                  f"CP10k) {mse:.3g} ({mse / a.var():.2g} of the variance), r {r:.5f}; masked "
                  f"RMSE all cells {_masked(SaverImputer(n_fit_cells=None, **kw), x):.4f}, "
                  f"sample {_masked(SaverImputer(n_fit_cells=n_fit, **kw), x):.4f}", flush=True)
        if "cnn" in methods and name == "pbmc3k":
            _cnn_accuracy(x, n_fit)


def _cnn_accuracy(x, n_fit: int) -> None:
    """cnn (defaults, full training) on pbmc3k with the dropout model fitted on ``n_fit`` sampled
    cells, and with the networks trained on ``n_fit`` sampled cells, vs all cells: masked RMSE,
    and for the dropout model the agreement of the missing entries with the all-cells fit."""
    from screpair.dropout import DropoutModel
    from screpair.methods.cnn import CNNImputer

    kw = {"rng": 0, "train": {"progress": False}}
    if CNN_ACC_EPOCHS is not None:
        kw["train"]["n_epochs"] = CNN_ACC_EPOCHS
    full = DropoutModel(rng=0).fit(x)
    sub = DropoutModel(n_fit_cells=n_fit, rng=0).fit(x)
    from sklearn.metrics import adjusted_rand_score

    a = full.prob_ > 0.5
    b = sub.probabilities(x, rows=slice(0, x.shape[0]))[0] > 0.5  # by rows: prob_ not held
    both = a.multiply(b).nnz
    print(f"cnn pbmc3k: dropout model on {n_fit} of {x.shape[0]} cells vs all: cluster ARI "
          f"{adjusted_rand_score(full.labels_, sub.labels_):.3f} ({len(full.clusters_)} vs "
          f"{len(sub.clusters_)} clusters); missing entries {a.nnz:,} vs {b.nnz:,}, "
          f"{both / max(a.nnz, 1):.3f} of all-cells' also in the sample's", flush=True)
    for label, extra in (("all cells", {}), (f"dropout model on {n_fit}",
                                             {"n_dropout_cells": n_fit}),
                         (f"training on {n_fit}", {"n_train_cells": n_fit})):
        t0 = time.perf_counter()
        rmse = _masked(CNNImputer(**kw, **extra), x)
        print(f"cnn pbmc3k {label}: masked RMSE {rmse:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="knn,alra,saver")
    p.add_argument("--cells", default="10000,30000")
    p.add_argument("--versions", default="old,new")
    p.add_argument("--old-src", type=Path, default=Path("/tmp/wt_old/src"))
    p.add_argument("--block", type=int, default=2000)
    p.add_argument("--accuracy", action="store_true",
                   help="measure what the scalable parts change (of --methods) instead")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "CELLS", "VERSION"))
    p.add_argument("--cnn-epochs", type=int, default=3,
                   help="cnn's training epochs in the memory / time runs")
    p.add_argument("--cnn-dropout-cells", type=int, default=None,
                   help="cnn's n_dropout_cells in the new code's runs (default: cnn's)")
    p.add_argument("--cnn-acc-epochs", type=int, default=None,
                   help="cnn's epoch limit in --accuracy (default: full training)")
    a = p.parse_args(argv)
    global CNN_EPOCHS, CNN_DROPOUT_CELLS, CNN_ACC_EPOCHS
    CNN_EPOCHS, CNN_DROPOUT_CELLS, CNN_ACC_EPOCHS = (a.cnn_epochs, a.cnn_dropout_cells,
                                                     a.cnn_acc_epochs)
    if a.worker:
        m, n, v = a.worker
        print(json.dumps(worker(m, int(n), v, a.block)))
        return 0
    if a.accuracy:
        accuracy(a.methods.split(","), a.old_src)
        return 0
    rows = []
    for method in a.methods.split(","):
        for n in map(int, a.cells.split(",")):
            res = {}
            for v in a.versions.split(","):  # each result printed as soon as it is there
                res[v] = run_one(method, n, v, a.block, a.old_src)
                print(json.dumps(res[v]), flush=True)
                rows.append(res[v])
            o, w = res.get("old", {}), res.get("new", {})
            if "peak_mb" in o and "peak_mb" in w:
                print(f"| {method} | {n:,} | {o['total_s']} s / {w['total_s']} s "
                      f"({o['total_s'] / max(w['total_s'], 1e-9):.2f}x) | "
                      f"{o['method_mb']} MB / {w['method_mb']} MB "
                      f"({o['method_mb'] / max(w['method_mb'], 1):.1f}x) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
