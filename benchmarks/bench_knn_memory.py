"""kNN at scale (issue 16): fit memory before / after the folded weights and the sampled PCA,
and the accuracy cost of fitting the PCA on a sample (``KNNImputer(n_fit_cells=...)``).

Two parts, each printed as a table (and written as JSON with ``--out``):

``--accuracy``
    A Splat simulation (``--acc-cells`` cells x 1,000 genes, 5 groups, about 17 % non-zero)
    smoothed with the PCA fitted on ``--acc-sample`` cells against the PCA on all cells (same
    rng; and the PCA on all cells with another rng, the scale of what a seed changes): the
    recall of the neighbour sets (mean share of a cell's ``k`` neighbours that are also its
    neighbours with the full PCA), the MSE between the outputs' log1p(CP10k) values, the share
    of neighbours in the cell's group and the MSE against the true means, with exact
    neighbours (``exact_max_cells`` above the cells: the PCA's part alone) and the default ones
    (pynndescent above 8,192 cells).
``--memory``
    For each ``--shapes`` (cells x genes, e.g. ``20000x1000``) a Splat file written with
    bounded memory (``simulate.splat(out=...)``, cached in ``--data``); then, each in a fresh
    process: the estimator's fit plus the posterior by blocks of ``--chunk-rows`` rows on the
    counts read beforehand (the memory kNN adds to the counts a caller holds), for the kNN of
    ``--before`` (a git revision of ``src/screpair/methods/knn.py``, loaded beside the current
    one) and the current one (at the default ``n_fit_cells`` and at ``--sample``), and
    ``screpair.impute_file(path, out, KNNImputer(), chunk_rows=...)`` as a whole (counts read,
    fit, blocks written) with either. Neighbours are exact here (``exact_max_cells`` above the
    cells): pynndescent's first call in a process compiles its numba kernels, about 250 MB of
    traced allocations whatever the number of cells (measured at 20,000 and 60,000 points),
    which would hide what kNN itself holds. It reports the tracemalloc peak (numpy / scipy
    buffers) and the process's peak RSS (``ru_maxrss``, imports included).

    python benchmarks/bench_knn_memory.py --accuracy --memory --out knn_memory.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

BEFORE = "5ce6315^"  # the knn.py that held a normalized copy and a full log copy


def _splat(n: int, g: int, *, out=None, keep: bool = False, rng: int = 0, **params):
    from screpair.simulate import splat

    # about 17 % non-zero at 1,000 genes with lib_loc 7.3; the same depth per gene for more genes
    return splat(n, g, lib_loc=7.3 + math.log(g / 1000), group_prob=[0.2] * 5, out=out,
                 keep_intermediates=keep, overwrite=out is not None, rng=rng, **params)


def _log1p_cp10k(m):
    from screpair import _norm

    return _norm.log_normalize(m, _norm.CP10K)


def accuracy(n: int, sample: int, k: int = 15, *, de_fac_loc: float | None = None,
             approximate: bool = True) -> list[dict]:
    """The PCA on ``sample`` cells against the PCA on all ``n`` (rng 0), and, as the scale of
    what changes anyway, the PCA on all cells with another seed (rng 1): neighbour-set recall
    against the all-cells rng-0 neighbours, MSE of the outputs' log1p(CP10k) values against
    its output, the share of neighbours in the cell's own group and the MSE against the
    log1p(CP10k) of the true cell means (Splat's ``cell_means``). ``de_fac_loc``: Splat's
    (default 0.1: groups that barely separate; 1.0: distinct groups)."""
    import scipy.sparse as sp

    from screpair.methods.knn import KNNImputer

    sim = _splat(n, 1000, keep=True, **({} if de_fac_loc is None else
                                        {"de_fac_loc": de_fac_loc}))
    x = sp.csr_matrix(sim.X, dtype=np.float64)
    truth = _log1p_cp10k(np.asarray(sim.layers["cell_means"], dtype=np.float64))
    group = np.asarray(sim.obs["group"])
    del sim
    print(f"accuracy: {n} cells x 1000 genes, {x.nnz / np.prod(x.shape):.1%} non-zero, "
          f"PCA sample {sample}, de_fac_loc {de_fac_loc or 'default'}", flush=True)
    rows = []
    for label, exact in (("exact neighbours", n + 1), ("default neighbours", 8192))[
            :2 if approximate else 1]:
        fits = {}
        for name, cap, seed in (("all", None, 0), ("all, rng 1", None, 1),
                                (f"sample {sample}", sample, 0)):
            t0 = time.perf_counter()
            est = KNNImputer(k=k, n_fit_cells=cap, exact_max_cells=exact, rng=seed)
            out = _log1p_cp10k(est.fit_transform(x))
            fits[name] = (est.neighbors_, out, time.perf_counter() - t0)
        nb0, v0, _ = fits["all"]
        for name, (nb, v, sec) in fits.items():
            row = {"neighbours": label, "fit": name, "cells": n, "de_fac_loc": de_fac_loc,
                   "seconds": sec,
                   "recall_vs_all": float(np.mean([np.intersect1d(a, b).size / k
                                                   for a, b in zip(nb, nb0, strict=True)])),
                   "mse_vs_all": float(np.mean((v - v0) ** 2)),
                   "same_group": float(np.mean(group[nb] == group[:, None])),
                   "mse_vs_truth": float(np.mean((v - truth) ** 2))}
            print(f"  {label}, {name:12s}: recall {row['recall_vs_all']:.4f}, MSE vs all "
                  f"{row['mse_vs_all']:.4g}, neighbours in own group {row['same_group']:.4f}, "
                  f"MSE vs truth {row['mse_vs_truth']:.5f} ({sec:.1f} s)", flush=True)
            rows.append(row)
    return rows


def _load_knn(rev: str):
    """The ``KNNImputer`` of ``knn.py`` at git revision ``rev``, as a module of the package."""
    src = subprocess.run(["git", "show", f"{rev}:src/screpair/methods/knn.py"], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout
    path = Path(f"/tmp/_knn_{rev.replace('^', '_parent').replace('/', '_')}.py")
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("screpair.methods._knn_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.KNNImputer


def _measure(case: dict) -> dict:
    """One case in this process: traced peak and wall time of the work."""
    cls = _load_knn(case["before"]) if case["impl"] == "before" else None
    if cls is None:
        from screpair.methods.knn import KNNImputer as cls
    params = {} if case.get("n_fit_cells") is None else {"n_fit_cells": case["n_fit_cells"]}
    # exact neighbours: pynndescent's first call compiles numba kernels, whose ~250 MB of
    # traced compile-time allocations (at any number of cells) would hide kNN's own memory
    est = cls(rng=0, exact_max_cells=case["cells"] + 1, **params)
    path, chunk = case["path"], case["chunk_rows"]
    if case["what"] == "impute_file":  # everything: counts read, fit, blocks written
        import screpair

        tracemalloc.start()
        t0 = time.perf_counter()
        screpair.impute_file(path, Path(case["tmp"]) / "knn_out.h5ad", est, chunk_rows=chunk,
                             overwrite=True, progress=False)
    else:  # what kNN adds to the counts a caller holds: fit + posterior by blocks
        import dataclasses

        import anndata as ad

        from screpair._utils import get_counts
        from screpair.methods._base import data_context

        x = get_counts(ad.read_h5ad(path), None)
        ctx = data_context(x, x)
        tracemalloc.start()
        t0 = time.perf_counter()
        est._fit_validated(x, ctx)
        for lo in range(0, x.shape[0], chunk):
            rows = slice(lo, min(lo + chunk, x.shape[0]))
            est._posterior_validated(x[rows], dataclasses.replace(ctx, rows=rows))
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {**case, "traced_peak_mb": peak / 2**20, "seconds": seconds,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory(shapes, data: Path, chunk: int, before: str, sample: int) -> list[dict]:
    import h5py

    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in shapes:
        n, g = (int(v) for v in shape.lower().split("x"))
        path = data / f"splat_{n}x{g}.h5ad"
        if not path.exists():
            t0 = time.perf_counter()
            _splat(n, g, out=path)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        with h5py.File(path, "r") as f:
            nnz = int(f["X"]["data"].shape[0])
        cases = [{"what": "estimator", "impl": "before"}, {"what": "estimator", "impl": "after"},
                 {"what": "estimator", "impl": "after", "n_fit_cells": sample},
                 {"what": "impute_file", "impl": "before"},
                 {"what": "impute_file", "impl": "after"}]
        for case in cases:
            case = {**case, "path": str(path), "cells": n, "genes": g, "nnz": nnz,
                    "chunk_rows": chunk, "tmp": str(data), "before": before}
            res = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                                 check=True, capture_output=True, text=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  {n}x{g} ({12 * nnz / 2**20:.0f} MB of float64 CSR counts) "
                  f"{row['what']:11s} {row['impl']:6s} "
                  f"n_fit_cells={row.get('n_fit_cells') or 'default':>7}: traced peak "
                  f"{row['traced_peak_mb']:.0f} MB, max RSS {row['max_rss_mb']:.0f} MB, "
                  f"{row['seconds']:.1f} s", flush=True)
            rows.append(row)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--acc-cells", type=int, default=20_000)
    p.add_argument("--acc-sample", type=int, default=5_000)
    p.add_argument("--acc-de-fac-loc", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--exact-only", action="store_true", help="accuracy: no pynndescent runs")
    p.add_argument("--memory", action="store_true")
    p.add_argument("--shapes", nargs="+", default=["20000x1000", "50000x2000"])
    p.add_argument("--sample", type=int, default=10_000, help="n_fit_cells of the sampled case")
    p.add_argument("--chunk-rows", type=int, default=2000)
    p.add_argument("--before", default=BEFORE, help="git revision of the 'before' knn.py")
    p.add_argument("--data", type=Path, default=Path("/tmp/bench_knn_memory"))
    p.add_argument("--out", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(_measure(json.loads(args.case))))
        return
    result = {}
    if args.accuracy:
        result["accuracy"] = [row for de in args.acc_de_fac_loc for row in accuracy(
            args.acc_cells, args.acc_sample, de_fac_loc=de, approximate=not args.exact_only)]
    if args.memory:
        result["memory"] = memory(args.shapes, args.data, args.chunk_rows, args.before,
                                  args.sample)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
