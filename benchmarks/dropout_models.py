"""cnn with its two dropout models (issue 20): ``dropout_model="zinb"`` (default) vs ``"scimpute"``.

Usage::

    python benchmarks/dropout_models.py OUT [--protocols masked,mcv] [--seeds 0]
        [--n-genes 500] [--n-epochs 150] [--datasets pbmc3k,baron]
        [--models zinb,scimpute] [--no-baselines]

Runs ``raw`` (no denoising), ``gene_mean`` and cnn with each dropout model through
:func:`screpair.evaluate.run_benchmark`, names the cnn runs ``cnn_<model>`` and writes the
combined ``results.csv`` and ``summary.md`` (with ``zeros_imputed``, the fraction of the input's
zeros each output makes positive) into ``OUT``. ``--models`` names entries of ``MODELS``:
``zinb`` (``dropout_model="zinb"`` with ``inflation="none"``: the logistic curve alone, the
model before the gene term), ``zinb_gene`` (``inflation="gene"``: the curve noisy-OR a per-gene
zero inflation), ``zinb_cluster`` (per gene and cluster) and ``scimpute``.

``--n-genes N`` keeps only the N most highly variable genes (``pp.highly_variable_genes``) of
each dataset before the protocol runs (cnn on all 13,714 pbmc3k genes takes ~35-70 min on a
2-core machine); the masked protocol then keeps the genes of those N detected in >= 50% of cells.
``--n-genes 0`` keeps every gene.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata
import pandas as pd

from screpair import pp
from screpair.evaluate import run_benchmark
from screpair.evaluate._benchmark import write_outputs

DATA = Path("/work/shared/data")
MODELS = {
    "zinb": {"dropout_model": "zinb", "dropout_kwargs": {"inflation": "none"}},
    "zinb_gene": {"dropout_model": "zinb", "dropout_kwargs": {"inflation": "gene"}},
    "zinb_cluster": {"dropout_model": "zinb", "dropout_kwargs": {"inflation": "cluster"}},
    "scimpute": {"dropout_model": "scimpute"},
}
DATASETS = {
    "pbmc3k": DATA / "pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad",
    "baron": DATA / "baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad",
    "soumillon": DATA / "soumillon2014_d3/soumillon2014_d3_sc_1754cells.h5ad",
}


def _load(name: str, n_genes: int) -> anndata.AnnData:
    ad = anndata.read_h5ad(DATASETS[name])
    ad = ad[:, ad.X.getnnz(axis=0) > 0].copy()
    if n_genes:
        pp.highly_variable_genes(ad, n_top_genes=n_genes)
        ad = ad[:, ad.var["highly_variable"].to_numpy()].copy()
    ad = ad[ad.X.getnnz(axis=1) > 0].copy()
    return ad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--protocols", default="masked,mcv")
    p.add_argument("--seeds", default="0")
    p.add_argument("--n-genes", type=int, default=500)
    p.add_argument("--n-epochs", type=int, default=150)
    p.add_argument("--datasets", default="pbmc3k,baron")
    p.add_argument("--models", default="zinb,scimpute")
    p.add_argument("--no-baselines", action="store_true", help="skip raw and gene_mean")
    args = p.parse_args()
    suffix = f"_hvg{args.n_genes}" if args.n_genes else ""
    data = {f"{n}{suffix}": _load(n, args.n_genes) for n in args.datasets.split(",")}
    protocols = args.protocols.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    parts, calib = [], []
    if not args.no_baselines:
        parts = [run_benchmark(data, ["raw", "gene_mean"], protocols, seeds, plots=False,
                               progress=False)]
        calib = [pd.DataFrame(parts[0].attrs["calibration"])]
    for model in args.models.split(","):
        name = f"cnn_{model}"
        res = run_benchmark(data, ["cnn"], protocols, seeds, plots=False, progress=False,
                            method_params={"cnn": {**MODELS[model],
                                                   "train": {"n_epochs": args.n_epochs}}})
        calib.append(pd.DataFrame(res.attrs["calibration"]).assign(method=name))
        parts.append(res.assign(method=name))
        out = pd.concat([r.assign() for r in parts], ignore_index=True)
        out.attrs = {}
        cal = pd.concat(calib, ignore_index=True)
        command = ("python benchmarks/dropout_models.py " + args.out
                   + f" --protocols {args.protocols} --seeds {args.seeds} --n-genes {args.n_genes}"
                   + f" --n-epochs {args.n_epochs} --datasets {args.datasets}"
                   + f" --models {args.models}" + (" --no-baselines" * args.no_baselines))
        write_outputs(out, args.out, command=command, calibration=cal)
    print(Path(args.out, "summary.md").read_text())


if __name__ == "__main__":
    main()
