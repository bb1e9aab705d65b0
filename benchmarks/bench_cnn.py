"""Speed: the full cnnImpute pipeline vs scVI's default training on pbmc3k (2,700 cells, all genes).

Each method runs in its own subprocess (so peak memory is per method): cnn = dropout model
(clustering + dropout probabilities) + target / input-gene selection + training + imputation of
all missing entries, at the defaults (``--preset paper``: the paper's settings); scVI =
``SCVI.setup_anndata`` + ``SCVI(adata).train()`` with defaults on CPU +
``get_normalized_expression``. scVI needs scvi-tools, which is not a screpair dependency:
``--scvi-python`` names the interpreter of an environment that has it (e.g. one made with
``pip install torch==2.13.0 && pip install -e ".[bench]"``).

Usage::

    python benchmarks/bench_cnn.py --scvi-python /tmp/benchvenv/bin/python   # both + the ratio
    python benchmarks/bench_cnn.py --only cnn      # one method (prints one JSON line)
    python benchmarks/bench_cnn.py --preset paper --cnn-epochs 2   # the paper's settings, quick
    python benchmarks/bench_cnn.py --threads 1     # torch intra-op threads for both (same for both)

Goals (issue 18): cnn/scVI < 1, cnn under 300 s, cnn peak RSS under 2 GB. Timings on a shared
2-core machine are pessimistic and noisy; compare the ratio.
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


class _Phases:
    """Collects the ``log_task`` timings ("<task> … done (3.2 s)") of one run."""

    def __init__(self):
        import logging
        import re

        self.pattern = re.compile(r"^(.*) … done \((\d+(?:\.\d+)?) s\)$")
        self.seconds: dict[str, float] = {}
        handler = logging.Handler(logging.INFO)
        handler.emit = self._emit
        root = logging.getLogger("screpair")
        root.setLevel(logging.INFO)
        root.addHandler(handler)

    def _emit(self, record) -> None:
        m = self.pattern.match(record.getMessage())
        if m:
            self.seconds[m.group(1)] = self.seconds.get(m.group(1), 0.0) + float(m.group(2))


def run_cnn(args) -> dict:
    """The full pipeline through the estimator (what ``screpair.impute`` runs), with its steps."""
    import anndata as ad

    from screpair.methods.cnn import CNNImputer

    phases = _Phases()
    adata = ad.read_h5ad(DATA)
    t0 = time.perf_counter()
    train = {"progress": args.progress, "device": "cpu"}
    if args.cnn_epochs:
        train["n_epochs"] = args.cnn_epochs
    kw = {"dropout_model": args.dropout_model} if args.dropout_model else {}
    est = CNNImputer(rng=0, train=train, preset=args.preset, **kw)
    est.fit(adata)
    t_fit = time.perf_counter() - t0
    est.transform(adata)
    secs = time.perf_counter() - t0
    h = est.history_
    return {
        "method": "cnn",
        "preset": args.preset,
        "dropout_model": est.dropout_model,
        "seconds": secs,
        "fit_seconds": t_fit,
        "peak_mb": _peak_mb(),
        "steps": {k: round(v, 1) for k, v in phases.seconds.items()},
        "n_groups": len(est.groups_),
        "input_len": int(est.input_index_.shape[1]),
        "n_targets": int(sum(len(g.targets) for g in est.groups_)),
        "n_weights": int(sum(p.numel() for p in est.module_.parameters())),
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
    t1 = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=args.progress, **kw)
    t_train = time.perf_counter() - t1
    model.get_normalized_expression(library_size="latent")
    secs = time.perf_counter() - t0
    n_ep = int(len(model.history["elbo_train"]))
    default_epochs = min(round(20000 / adata.n_obs * 400), 400)  # scvi-tools' default rule
    out = {
        "method": "scvi",
        "seconds": secs,
        "peak_mb": _peak_mb(),
        "epochs": n_ep,
        "seconds_per_epoch": t_train / n_ep,
        "default_epochs": default_epochs,
    }
    if n_ep < default_epochs:  # capped run: the default training's time, from the epoch cost
        out["default_seconds_estimate"] = secs + t_train / n_ep * (default_epochs - n_ep)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["cnn", "scvi"])
    p.add_argument("--preset", default="default", choices=["default", "paper"])
    p.add_argument(
        "--dropout-model", default=None, choices=["zinb", "scimpute"], help="cnn's (default: its)"
    )
    p.add_argument(
        "--scvi-python",
        default=sys.executable,
        help="python of an environment with scvi-tools (default: this one)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--cnn-epochs", type=int, default=0, help="cap cnn epochs (0: the preset's)"
    )
    p.add_argument(
        "--scvi-epochs", type=int, default=0, help="cap scVI epochs (0: its default, 400 here)"
    )
    args = p.parse_args()
    if args.only:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        res = run_cnn(args) if args.only == "cnn" else run_scvi(args)
        print(json.dumps(res), flush=True)
        return
    results = {}
    for method in ("cnn", "scvi"):
        python = sys.executable if method == "cnn" else args.scvi_python
        cmd = [
            python,
            __file__,
            "--only",
            method,
            "--preset",
            args.preset,
            *(["--dropout-model", args.dropout_model] if args.dropout_model else []),
            "--threads",
            str(args.threads),
            "--cnn-epochs",
            str(args.cnn_epochs),
            "--scvi-epochs",
            str(args.scvi_epochs),
        ]
        done = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            print(f"{method} failed (exit {done.returncode}); see the error above", flush=True)
            continue
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[method]), flush=True)
    if "cnn" not in results:
        sys.exit(1)
    c, mb = results["cnn"]["seconds"], results["cnn"]["peak_mb"]
    line = f"pbmc3k 2700 x 13714, cnn ({args.preset}): {c:.0f} s, peak RSS {mb:.0f} MB"
    if "scvi" in results:
        sc = results["scvi"]
        s = sc.get("default_seconds_estimate", sc["seconds"])
        how = (
            f"{sc['epochs']} of its {sc['default_epochs']} default epochs run, "
            f"{sc['seconds']:.0f} s; default training estimated from the epoch cost"
            if "default_seconds_estimate" in sc
            else f"{sc['epochs']} epochs, its default"
        )
        line += (
            f"; scVI {s:.0f} s ({how}; peak RSS {sc['peak_mb']:.0f} MB); cnn/scVI = {c / s:.2f}"
        )
    else:
        line += "; scVI not run (no scvi-tools: pass --scvi-python)"
    print(line)
    ok = c < 300 and mb < 2048 and ("scvi" not in results or c < s)
    print(f"goals (ratio < 1, < 300 s, < 2 GB): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
