"""Benchmark SAVER end to end on PBMC 3k (2,700 cells x 13,714 genes): time, peak memory, and a
masked-entry accuracy next to other registered methods.

Usage::

    python benchmarks/bench_saver.py [--data PATH] [--n-jobs 1] [--methods saver,knn,alra]
                                     [--mask-frac 0.1] [--seed 0] [--no-mask] [--no-fast]

Steps:

1. ``screpair.impute(adata, method="saver")`` on the full matrix: wall time and peak RSS
   (``resource.getrusage``, the whole process, so it includes reading the data).
2. Masked protocol (unless ``--no-mask``): a fraction of the non-zero entries is set to zero, each
   method imputes the masked matrix, and the imputed values at the masked entries are compared with
   the held-out counts after library-size normalization (``log1p(x / L * 1e4)``, with ``L`` the
   masked matrix's library size): RMSE and Pearson correlation. "raw" is the masked matrix itself
   (every held-out entry is 0).

Timings are wall-clock on whatever machine runs this; on a shared 2-core CI box they are
pessimistic.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

import screpair

DEFAULT = Path("/work/shared/data/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad")


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 1024


def mask_nonzeros(x: sp.csr_matrix, frac: float, rng: np.random.Generator):
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    nz = np.flatnonzero(x.data)
    pick = rng.choice(nz, size=int(frac * nz.size), replace=False)
    coo = x.tocoo()
    rows, cols, vals = coo.row[pick], coo.col[pick], coo.data[pick].copy()
    x.data[pick] = 0.0
    x.eliminate_zeros()
    return x, rows, cols, vals


def masked_scores(imputed, rows, cols, vals, lib) -> tuple[float, float]:
    imp = imputed[rows, cols]
    imp = np.asarray(imp.todense()).ravel() if sp.issparse(imp) else np.asarray(imp).ravel()
    scale = 1e4 / lib[rows]
    a, b = np.log1p(vals * scale), np.log1p(np.maximum(imp, 0) * scale)
    rmse = float(np.sqrt(np.mean((a - b) ** 2)))
    r = float(np.corrcoef(a, b)[0, 1]) if np.std(b) > 0 else float("nan")
    return rmse, r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT)
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--methods", default="saver,knn")
    p.add_argument("--mask-frac", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SAVER fast mode (CV on 300 genes, estimated lambda.min for the rest)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    adata = ad.read_h5ad(args.data)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    print(f"data: {args.data.name} {adata.n_obs} cells x {adata.n_vars} genes, nnz {adata.X.nnz}")
    saver_params = {"n_jobs": args.n_jobs, "progress": args.progress, "fast": args.fast}

    t0 = time.perf_counter()
    screpair.impute(adata, method="saver", rng=args.seed, **saver_params)
    secs = time.perf_counter() - t0
    print(f"saver end to end: {secs:.1f} s, peak RSS {peak_rss_mb():.0f} MB")
    print(
        f"  layers: saver {adata.layers['saver'].shape}, saver_var; "
        f"mean/raw total ratio {adata.layers['saver'].sum() / adata.X.sum():.3f}"
    )

    if not args.mask:
        return 0
    rng = np.random.default_rng(args.seed)
    xm, rows, cols, vals = mask_nonzeros(adata.X, args.mask_frac, rng)
    lib = np.asarray(xm.sum(1)).ravel()
    keep_cells = lib > 0
    masked = ad.AnnData(xm[keep_cells] if not keep_cells.all() else xm)
    masked.var_names = adata.var_names
    if not keep_cells.all():  # keep the held-out entries of the kept cells only
        new_row = np.cumsum(keep_cells) - 1
        ok = keep_cells[rows]
        rows, cols, vals = new_row[rows[ok]], cols[ok], vals[ok]
        lib = lib[keep_cells]
    print(f"masked protocol: {rows.size} held-out non-zero entries ({args.mask_frac:.0%})")
    rmse, r = masked_scores(masked.X, rows, cols, vals, lib)
    print(f"  {'raw':>8}: rmse {rmse:.4f}  pearson {r:.4f}")
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        params = saver_params if method == "saver" else {}
        t0 = time.perf_counter()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = screpair.impute(masked, method=method, rng=args.seed, copy=True, **params)
        secs = time.perf_counter() - t0
        rmse, r = masked_scores(out.layers[method], rows, cols, vals, lib)
        print(f"  {method:>8}: rmse {rmse:.4f}  pearson {r:.4f}  ({secs:.1f} s)")
    print(f"peak RSS overall {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
