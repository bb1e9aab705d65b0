"""Parity harness: every seeded output of screpair, saved once and compared after a change.

Runs every registered method (``screpair.available_methods()``) at fixed seeds on

- ``demo``: 200 cells (seed 0) x the 1,000 most-detected genes of ``screpair.datasets.demo()``;
- ``splat``: ``screpair.simulate.splat(n_obs=150, n_vars=300, rng=0)``;

with tiny neural settings (1-2 epochs), plus ``screpair.dropout_probability`` (``groupby=``, each
dropout model), ``screpair.cluster``, ``simulate.splat`` / ``degrade`` / ``degrade_log`` /
``mask`` / ``mcv_split`` and the ``pp`` functions. Every output array is a named entry.

Usage::

    nice python benchmarks/check_parity.py --save /tmp/parity_baseline    # before a change
    nice python benchmarks/check_parity.py --compare /tmp/parity_baseline # after it
    ... [--only alra,knn,degrade]                                         # a subset of cases

``--compare`` prints, per output, whether it is bit-identical and the maximum absolute
difference on the log1p scale (``log1p(x)`` for non-negative arrays, the values themselves
otherwise), and exits with status 1 when any difference exceeds ``--tol`` (1e-5) or an output is
missing or changed shape. Outputs are written as ``.npz`` (one file per case); keep them out of
the repository (e.g. under /tmp).

Parameters that a later commit may change the default of are passed explicitly (the dropout
model of ``cnn`` and ``dropout_probability``), and only when the running version has them, so the
same script runs before and after; ``cnn``'s settings are passed nested (``module`` / ``train`` /
``targets``) when the running version has those configs, else flat.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

TINY_TRAIN = {
    "n_epochs": 2, "batch_size": 32, "lr": 2e-3, "patience": 0, "progress": False, "device": "cpu"
}
TINY_DIFFUSION = {
    "patch_size": 8, "d_model": 32, "n_layers": 2, "n_heads": 2, "dim_feedforward": 64
}
TINY_AE = {"hidden": 64, "latent": 8, "dropout": 0.1, "kl_weight": 0.1}
TINY_PAIRS = {"n_top_genes": 60, "n_views": 2}
#: cnn's settings in nested form (module / train / targets, each updating the preset's config);
#: versions before the nested configs take the same values flat (``_flat_cnn``)
TINY_CNN = {
    "module": {"n_hidden": 16},
    "train": {"n_epochs": 2, "batch_size": 32, "lr": 1e-3, "progress": False, "device": "cpu"},
    "targets": {"subset_size": 32, "min_subsets": 1},
}
SEED = 0


def _accepts(func: Callable, name: str) -> bool:
    return name in inspect.signature(func).parameters


def _dense(a) -> np.ndarray:
    if sp.issparse(a):
        a = a.toarray()
    if hasattr(a, "to_numpy"):
        a = a.to_numpy()
    return np.asarray(a)


# ---- data -------------------------------------------------------------------------------------
def demo_subset():
    """200 cells (seed 0) x the 1,000 most-detected genes of the bundled demo data, CSR counts."""
    import screpair

    ad = screpair.datasets.demo()
    cells = np.sort(np.random.default_rng(0).choice(ad.n_obs, 200, replace=False))
    ad = ad[cells].copy()
    x = sp.csr_matrix(ad.X)
    detected = np.asarray((x > 0).sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-detected, kind="stable")[:1000])
    ad = ad[:, genes].copy()
    ad.X = sp.csr_matrix(ad.X, dtype=np.float32)
    ad.layers["counts"] = ad.X.copy()
    return ad, "cell_type"


def splat_small():
    import screpair

    ad = screpair.simulate.splat(n_obs=150, n_vars=300, rng=0)
    return ad, "group"


DATASETS = {"demo": demo_subset, "splat": splat_small}


# ---- cases: each returns {name: array} --------------------------------------------------------
def method_params(method: str) -> dict:
    import screpair

    cls = screpair.get_method(method)
    if method in ("diffusion",):
        return {"module": TINY_DIFFUSION, "train": TINY_TRAIN, "pairs": TINY_PAIRS,
                "n_samples": 2, "n_inference_steps": 4}
    if method in ("dae", "vae"):
        return {"module": TINY_AE, "train": TINY_TRAIN, "pairs": TINY_PAIRS}
    if method == "cnn":
        if _accepts(cls, "train"):  # nested configs
            params = {k: dict(v) for k, v in TINY_CNN.items()}
        else:  # the flat parameters of earlier versions: the same settings
            params = {k: v for section in TINY_CNN.values() for k, v in section.items()}
        if _accepts(cls, "dropout_model"):
            params["dropout_model"] = "scimpute"
        return params
    if method == "saver":
        return {"progress": False, "n_jobs": 1}
    return {}


def run_method(method: str, ad) -> dict:
    import screpair

    ad = ad.copy()
    before = set(ad.layers)
    screpair.impute(ad, method, layer="counts", rng=SEED, **method_params(method))
    return {f"layer:{k}": _dense(ad.layers[k]) for k in sorted(set(ad.layers) - before)}


def run_dropout(ad, groupby: str) -> dict:
    import screpair

    out = {}
    models = ["scimpute", "zinb"] if _accepts(screpair.dropout_probability, "model") else [None]
    for model in models:
        kw = {} if model is None else {"model": model}
        b = ad.copy()
        screpair.dropout_probability(b, layer="counts", groupby=groupby, rng=SEED, **kw)
        tag = model or "default"
        out[f"{tag}:prob"] = _dense(b.layers["dropout_prob"])
        for key in sorted(b.varm):
            out[f"{tag}:varm:{key}"] = _dense(b.varm[key]).astype(np.float64)
    return out


def run_cluster(ad) -> dict:
    import screpair

    b = ad.copy()
    screpair.cluster(b, layer="counts", rng=SEED)
    return {"labels": np.asarray(b.obs["screpair_cluster"].astype(str)), "tsne": b.obsm["X_tsne"]}


def _layers(ad, prefix: str = "") -> dict:
    out = {f"{prefix}X": _dense(ad.X)}
    out.update({f"{prefix}layer:{k}": _dense(v) for k, v in sorted(ad.layers.items())})
    return out


def run_simulate(ad) -> dict:
    from screpair import simulate

    out = {}
    for rounding in ("stochastic", "nearest", "none"):
        d = simulate.degrade(ad, layer="counts", bias_3p=0.5, dropout_rate=0.3, noise_sd=0.2,
                             rounding=rounding, rng=SEED)
        out.update(_layers(d, f"degrade_{rounding}:"))
    per_cell = np.linspace(0.0, 0.6, ad.n_obs)
    d = simulate.degrade(ad, layer="counts", bias_3p=per_cell, dropout_rate=per_cell[::-1],
                         noise_sd=0.3, rng=SEED + 1)
    out.update(_layers(d, "degrade_percell:"))
    gl = simulate.default_gene_length(ad.var_names)
    out["default_gene_length"] = np.asarray(gl)
    y = _dense(simulate.log_normalize(_dense(ad.layers["counts"])))
    out["log_normalize"] = y
    res = simulate.degrade_log(y, bias_3p=0.4, dropout_rate=0.2, noise_sd=0.1, gene_length=gl,
                               rng=SEED)
    for field in ("log", "dropped", "bias_3p", "dropout_rate", "noise_sd", "retention"):
        if hasattr(res, field):
            out[f"degrade_log:{field}"] = _dense(getattr(res, field))
    m, truth = simulate.mask(ad, layer="counts", frac=0.1, rng=SEED)
    out.update(_layers(m, "mask:"))
    out["mask:truth"] = _dense(truth)
    a, b = simulate.mcv_split(ad, layer="counts", rng=SEED)
    out.update(_layers(a, "mcv_train:"))
    out.update(_layers(b, "mcv_test:"))
    return out


def run_splat() -> dict:
    from screpair import simulate

    out = _layers(simulate.splat(n_obs=150, n_vars=300, rng=0), "default:")
    cnn = simulate.splat(n_obs=120, n_vars=200, preset="cnnimpute", rng=1)
    out.update(_layers(cnn, "cnnimpute:"))
    out.update(_layers(simulate.splat(n_obs=100, n_vars=150, group_prob=[0.5, 0.5],
                                      dropout_type="experiment", keep_intermediates=True, rng=2),
                       "groups:"))
    return out


def run_pp(ad) -> dict:
    from screpair import pp

    x = ad.layers["counts"]
    out = {
        "size_factors": pp.size_factors(x),
        "normalize": _dense(pp.normalize(x)),
        "normalize_median": _dense(pp.normalize(x, target_sum=None)),
        "log1p": _dense(pp.log1p(x)),
        "log1p_2": _dense(pp.log1p(x, base=2)),
    }
    b = ad.copy()
    pp.highly_variable_genes(b, n_top_genes=100, layer="counts")
    out.update({f"hvg:{k}": _dense(b.var[k]) for k in b.var.columns})
    c = pp.filter_genes(ad, min_cells=5, layer="counts", copy=True)
    c = pp.filter_cells(c, min_genes=50, layer="counts", copy=True)
    out["filter:shape"] = np.asarray(c.shape)
    out["filter:X"] = _dense(c.layers["counts"])
    return out


def cases(only: set[str] | None):
    """Yield ``(name, thunk)`` for every case (``dataset/what``)."""
    import screpair

    for dname, make in DATASETS.items():
        for method in screpair.available_methods():
            yield f"{dname}/{method}", (lambda m=method, mk=make: run_method(m, mk()[0]))
        yield f"{dname}/dropout", (lambda mk=make: run_dropout(*mk()))
        yield f"{dname}/simulate", (lambda mk=make: run_simulate(mk()[0]))
        yield f"{dname}/pp", (lambda mk=make: run_pp(mk()[0]))
    yield "splat/cluster", lambda: run_cluster(splat_small()[0])
    yield "splat/splat", run_splat


# ---- save / compare ---------------------------------------------------------------------------
def _file(root: Path, case: str) -> Path:
    return root / (case.replace("/", "__") + ".npz")


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[bool, float]:
    if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
        same = a.shape == b.shape and bool(np.all(a.astype(str) == b.astype(str)))
        return same, 0.0 if same else np.inf
    same = a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if a.shape != b.shape:
        return False, np.inf
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if np.nanmin(a64, initial=0.0) >= 0 and np.nanmin(b64, initial=0.0) >= 0:
        a64, b64 = np.log1p(a64), np.log1p(b64)
    with np.errstate(invalid="ignore"):
        d = np.abs(a64 - b64)
    nan_mismatch = np.isnan(a64) != np.isnan(b64)
    if nan_mismatch.any():
        return same, np.inf
    return same, float(np.nanmax(d, initial=0.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, metavar="DIR")
    group.add_argument("--compare", type=Path, metavar="DIR")
    parser.add_argument("--only", default=None, help="comma-separated substrings of case names")
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import screpair

    print(f"screpair from {Path(screpair.__file__).parent}", flush=True)
    only = None if args.only is None else [s for s in args.only.split(",") if s]
    root = args.save or args.compare
    if args.save:
        root.mkdir(parents=True, exist_ok=True)
    failed = False
    for case, thunk in cases(None):
        if only is not None and not any(s in case for s in only):
            continue
        start = time.perf_counter()
        out = {k: np.asarray(v) for k, v in thunk().items()}
        seconds = time.perf_counter() - start
        if args.save:
            np.savez_compressed(_file(root, case), **out)
            print(f"{case}: saved {len(out)} outputs ({seconds:.1f} s)", flush=True)
            continue
        path = _file(root, case)
        if not path.exists():
            print(f"{case}: no baseline", flush=True)
            failed = True
            continue
        with np.load(path, allow_pickle=True) as ref:
            names = sorted(set(ref.files) | set(out))
            for name in names:
                if name not in ref.files or name not in out:
                    where = "baseline" if name not in ref.files else "new run"
                    print(f"{case} {name}: MISSING in {where}", flush=True)
                    failed = True
                    continue
                same, d = _diff(ref[name], out[name])
                bad = d > args.tol
                failed |= bad
                flag = "  <-- beyond tol" if bad else ""
                print(f"{case} {name}: bit-identical={'yes' if same else 'no'} "
                      f"max|dlog1p|={d:.3g}{flag}", flush=True)
        print(f"{case}: ({seconds:.1f} s)", flush=True)
    if args.compare:
        print("PARITY FAILED" if failed else "parity ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
