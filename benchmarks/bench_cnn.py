"""Speed: the full cnnImpute pipeline vs scVI's default training on pbmc3k (2,700 cells, all genes).

Each method runs in its own subprocess (so peak memory is per method): cnn = dropout model
(clustering + scImpute mixture) + input-gene selection + training + imputation of all missing
entries; scVI = ``SCVI.setup_anndata`` + ``SCVI(adata).train()`` with defaults on CPU.

Usage::

    python benchmarks/bench_cnn.py                 # both, prints wall time, peak RSS and the ratio
    python benchmarks/bench_cnn.py --only cnn      # one method (prints one JSON line)
    python benchmarks/bench_cnn.py --threads 1     # torch intra-op threads for both (same for both)
    python benchmarks/bench_cnn.py --cnn-epochs 2 --scvi-epochs 5   # quick: per-epoch costs only

Timings on a shared 2-core machine are pessimistic and noisy; compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "pbmc3k_10x"
    / "pbmc3k_2700cells_13714genes.h5ad"
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cnn(args) -> dict:
    import anndata as ad

    import screpair

    adata = ad.read_h5ad(DATA)
    t0 = time.perf_counter()
    screpair.impute(adata, "cnn", rng=0, progress=False, device="cpu")
    secs = time.perf_counter() - t0
    uns = adata.uns["cnn"]
    return {
        "method": "cnn",
        "seconds": secs,
        "peak_mb": _peak_mb(),
        "inner_seconds": uns["seconds"],
    }


def run_cnn_detail(args) -> dict:
    """Same pipeline through the estimator, with the step sizes (groups, inputs, epochs)."""
    import anndata as ad

    from screpair.methods.cnn import CNNImputer

    adata = ad.read_h5ad(DATA)
    t0 = time.perf_counter()
    kw = {"n_epochs": args.cnn_epochs} if args.cnn_epochs else {}
    est = CNNImputer(rng=0, progress=args.progress, device="cpu", **kw).fit(adata)
    t_fit = time.perf_counter() - t0
    est.transform(adata)
    secs = time.perf_counter() - t0
    h = est.history_
    return {
        "method": "cnn",
        "seconds": secs,
        "fit_seconds": t_fit,
        "peak_mb": _peak_mb(),
        "n_groups": len(est.groups_),
        "input_len": int(est.input_index_.shape[1]),
        "n_targets": int(sum(len(g.targets) for g in est.groups_)),
        "epochs": int(len(h)),
        "train_seconds": float(h["seconds"].iloc[-1]) if len(h) else 0.0,
        "seconds_per_epoch": float(h["seconds"].iloc[-1] / len(h)) if len(h) else 0.0,
        "missing_frac": float((est.dropout_prob_ > est.threshold).mean()),
        "best_epoch": int(h["val_loss"].idxmin()) + 1 if len(h) else 0,
        "val_loss": [round(float(v), 5) for v in h["val_loss"]],
    }


def run_scvi(args) -> dict:
    import logging
    import warnings

    import anndata as ad
    import scvi

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    adata = ad.read_h5ad(DATA)
    scvi.settings.seed = 0
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    kw = {"max_epochs": args.scvi_epochs} if args.scvi_epochs else {}
    model.train(accelerator="cpu", enable_progress_bar=args.progress, **kw)
    model.get_normalized_expression(library_size="latent")
    secs = time.perf_counter() - t0
    n_ep = int(len(model.history["elbo_train"]))
    return {
        "method": "scvi",
        "seconds": secs,
        "peak_mb": _peak_mb(),
        "epochs": n_ep,
        "seconds_per_epoch": secs / n_ep,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["cnn", "scvi"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--cnn-epochs", type=int, default=0, help="cap cnn epochs (0: default, 150 + early stop)"
    )
    p.add_argument(
        "--scvi-epochs", type=int, default=0, help="cap scVI epochs (0: its default, 400 here)"
    )
    args = p.parse_args()
    if args.only:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        res = run_cnn_detail(args) if args.only == "cnn" else run_scvi(args)
        print(json.dumps(res), flush=True)
        return
    results = {}
    for method in ("cnn", "scvi"):
        cmd = [
            sys.executable,
            __file__,
            "--only",
            method,
            "--threads",
            str(args.threads),
            "--cnn-epochs",
            str(args.cnn_epochs),
            "--scvi-epochs",
            str(args.scvi_epochs),
        ]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[method]), flush=True)
    c, s = results["cnn"]["seconds"], results["scvi"]["seconds"]
    print(
        f"pbmc3k 2700 x 13714: cnn {c:.0f} s, scVI {s:.0f} s, cnn/scVI = {c / s:.2f} "
        f"(peak RSS cnn {results['cnn']['peak_mb']:.0f} MB, scVI {results['scvi']['peak_mb']:.0f} MB)"
    )


if __name__ == "__main__":
    main()
