"""The issue-8 goal comparison on the ``degrade`` protocol: diffusion vs dae, vae, MAGIC, input.

Protocol (transductive, as ``screpair.impute`` is used on a user's data): clean real counts ->
``simulate.degrade`` (moderate setting below) -> each method sees only the degraded counts
(the neural methods train on pairs made by degrading them again) -> the repaired profiles are
compared with the clean ones. ``--mode reference`` instead fits the neural methods on the clean
profiles of half of the cells and repairs the degraded other half (the paper's use:
``fit(reference).transform(degraded)``); MAGIC and the input are scored on the same half.

Moderate setting (per cell, fixed): ``bias_3p=0.5`` (a median-length transcript keeps
exp(-0.5) = 61% of its log signal; one set of gene lengths per dataset and seed drawn from
LogNormal(log 2 kb, 0.7) and stored in ``var["gene_length"]``, which the neural methods' pair
maker also uses, as it would use real transcript-length annotation),
``dropout_rate=0.3`` and ``noise_sd=0.2`` on the log1p(CP10k) scale, stochastic rounding.

Scores, on the log1p(CP10k) scale over the clean data's top ``--n-eval-genes`` HVGs (every
output is normalized by the degraded cell's observed library size, the project's count-scale
convention): MSE vs clean, Pearson r over all entries, and the mean per-cell Pearson r.
The biological scores (PR-AUC/F1, silhouette, DEG Jaccard, marker Spearman) belong to the
evaluate module's ``degrade`` protocol and are not computed here.

Usage::

    python benchmarks/diffusion_degrade.py [--datasets pbmc3k,baron] [--seeds 0]
        [--max-seconds 180] [--mode transductive|reference] [--out results.csv]
        [--cells 1200 --genes 4000] [--params JSON]

Issue 18 runs (``benchmarks/RESULTS.md``, diffusion levers)::

    python benchmarks/diffusion_degrade.py --datasets bladder --cells 1200 --genes 4000 \
        --methods dae,diffusion --max-seconds 1e9 --n-eval-genes 4000
    python benchmarks/diffusion_degrade.py --datasets kidney --cells 1200 \
        --methods dae,diffusion --max-seconds 1e9
    python benchmarks/diffusion_degrade.py --datasets baron --methods diffusion --max-seconds 1e9 \
        --params '{"diffusion": {"module": {"val_metric": "repair"}}}'

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

DATA = Path("/work/shared/data")
DATASETS = {
    "pbmc4k": DATA / "scdcc_benchmark/pbmc4k_10x_top2000genes.h5ad",
    "kidney": DATA / "scdcc_benchmark/human_kidney_top2000genes.h5ad",
    "bladder": DATA / "scdcc_benchmark/mouse_bladder_2100cells_allgenes.h5ad",
    "worm": DATA / "scdcc_benchmark/worm_neuron_top2000genes.h5ad",
    "pbmc3k": DATA / "pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad",
    "baron": DATA / "baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad",
}
MODERATE = {"bias_3p": 0.5, "dropout_rate": 0.3, "noise_sd": 0.2}


def _lognorm(x, genes, lib):
    import numpy as np
    import scipy.sparse as sp

    sub = x[:, genes]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    f = np.where(lib > 0, 1e4 / np.where(lib > 0, lib, 1.0), 0.0)
    return np.log1p(np.maximum(sub, 0) * f[:, None])


def _scores(y_hat, y):
    import numpy as np

    mse = float(np.mean((y_hat - y) ** 2))
    r = float(np.corrcoef(y_hat.ravel(), y.ravel())[0, 1])
    a = y_hat - y_hat.mean(1, keepdims=True)
    b = y - y.mean(1, keepdims=True)
    den = np.sqrt((a**2).sum(1) * (b**2).sum(1))
    r_cell = float(
        np.nanmean(np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), np.nan))
    )
    return {"mse": mse, "pearson_r": r, "cell_r": r_cell}


def run_one(name, path, seed, args):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    import screpair
    from screpair.methods import TrainConfig
    from screpair.methods.diffusion import PairConfig

    clean = ad.read_h5ad(path)
    if args.cells or args.genes:  # a smaller data set: random cells, most-detected genes
        sub_rng = np.random.default_rng(123)
        if args.cells and args.cells < clean.n_obs:
            clean = clean[np.sort(sub_rng.choice(clean.n_obs, args.cells, replace=False))].copy()
        if args.genes and args.genes < clean.n_vars:
            det = np.asarray((clean.X > 0).sum(0)).ravel()
            clean = clean[:, np.sort(np.argsort(-det, kind="stable")[: args.genes])].copy()
    clean.X = sp.csr_matrix(clean.X, dtype=np.float32)
    rng = np.random.default_rng(seed)
    # one set of transcript lengths per dataset, known to every method (as annotation would be)
    clean.var["gene_length"] = rng.lognormal(np.log(2000.0), 0.7, clean.n_vars)
    deg = screpair.simulate.degrade(clean, **MODERATE, rng=seed)
    hv = screpair.pp.highly_variable_genes(clean.X, n_top_genes=args.n_eval_genes)
    genes = np.flatnonzero(hv)
    lib_clean = np.asarray(clean.X.sum(1)).ravel()
    lib_obs = np.asarray(deg.layers["counts"].sum(1)).ravel()

    cells = np.arange(clean.n_obs)
    if args.mode == "reference":
        perm = rng.permutation(clean.n_obs)
        ref_cells, cells = np.sort(perm[: clean.n_obs // 2]), np.sort(perm[clean.n_obs // 2 :])
    y = _lognorm(clean.X[cells], genes, lib_clean[cells])
    obs_counts = deg.layers["counts"][cells]
    rows = []

    def record(method, y_hat, seconds):
        s = _scores(y_hat, y)
        rows.append(
            {
                "dataset": name,
                "seed": seed,
                "mode": args.mode,
                "method": method,
                **s,
                "seconds": seconds,
            }
        )
        print(
            f"  {name} seed={seed} {method:10s} mse={s['mse']:.4f} r={s['pearson_r']:.4f} "
            f"cell_r={s['cell_r']:.4f} ({seconds:.0f} s)",
            flush=True,
        )

    record("degraded", _lognorm(obs_counts, genes, lib_obs[cells]), 0.0)
    train = TrainConfig(max_seconds=args.max_seconds, progress=False)
    pairs = PairConfig(n_top_genes=args.n_top_genes)
    for method in args.methods:
        if method == "magic":
            try:
                import magic
            except ImportError:
                print("  magic-impute not installed; skipped")
                continue
            t0 = time.perf_counter()
            x_log = _lognorm(obs_counts, genes, lib_obs[cells])
            y_hat = magic.MAGIC(random_state=seed, verbose=0).fit_transform(x_log)
            record("magic", np.asarray(y_hat), time.perf_counter() - t0)
            continue
        t0 = time.perf_counter()
        extra = dict(args.params.get(method, {}))
        kw = {"train": train, "pairs": pairs}
        for cfg in ("train", "pairs"):  # a table updates the script's config
            if isinstance(extra.get(cfg), dict):
                kw[cfg] = dataclasses.replace(kw[cfg], **extra.pop(cfg))
        est = screpair.methods.make_estimator(method, rng=seed, **kw, **extra)
        var = clean.var[["gene_length"]].copy()
        test = ad.AnnData(X=obs_counts, var=var)
        if args.mode == "reference":
            mean = est.fit(ad.AnnData(X=clean.X[ref_cells], var=var)).transform(test)
        else:  # what screpair.impute does, but keeping var["gene_length"] for the pair maker
            mean = est.fit(test).transform(test)
        record(method, _lognorm(mean, genes, lib_obs[cells]), time.perf_counter() - t0)
    return rows


def _markdown(df) -> str:
    cols = list(df.columns)
    out = ["| dataset | method | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for (ds, m), row in df.iterrows():
        out.append(f"| {ds} | {m} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="pbmc3k,baron")
    p.add_argument("--methods", default="dae,vae,diffusion,magic")
    p.add_argument("--seeds", default="0")
    p.add_argument("--mode", choices=["transductive", "reference"], default="transductive")
    p.add_argument(
        "--max-seconds", type=float, default=180.0, help="training budget per neural method"
    )
    p.add_argument(
        "--n-top-genes", type=int, default=5000, help="HVGs modelled by the neural methods"
    )
    p.add_argument("--n-eval-genes", type=int, default=2000, help="clean HVGs scored")
    p.add_argument("--out", type=Path, default=None, help="write the tidy results as CSV")
    p.add_argument("--cells", type=int, default=0, help="random cells kept (seed 123; 0: all)")
    p.add_argument("--genes", type=int, default=0, help="most-detected genes kept (0: all)")
    p.add_argument(
        "--params", type=json.loads, default={},
        help='JSON of per-method parameters, e.g. \'{"diffusion": {"module": {"val_metric": '
        '"repair"}, "pairs": {"redraw_views": true}}}\'',
    )
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")

    import warnings

    import pandas as pd

    warnings.filterwarnings("ignore", message=".*have no counts.*")
    print(f"load average at start: {os.getloadavg()}")
    rows = []
    for name in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_one(name, DATASETS[name], seed, args)
    df = pd.DataFrame(rows)
    summary = df.groupby(["dataset", "method"], sort=False)[
        ["mse", "pearson_r", "cell_r", "seconds"]
    ].mean()
    print(_markdown(summary))
    if args.out:
        df.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
