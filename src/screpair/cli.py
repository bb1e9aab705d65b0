"""Command-line interface: ``screpair <command> ...``.

Each command has a parser builder ``_add_<cmd>(sub)`` and a handler ``_cmd_<cmd>(args) -> int``,
both listed in ``_COMMANDS``. Heavy imports happen inside handlers, after parsing. Errors are printed
as one line on stderr with exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__

EXIT_ERROR = 2


class CLIError(Exception):
    """An error with a message meant for the user."""


# --------------------------------------------------------------------------- helpers


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks on error")


def _load_config(path: str | None) -> dict:
    """Method parameters from a JSON or TOML file (flags given on the command line win)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        msg = f"config file not found: {path}"
        raise CLIError(msg)
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            cfg = tomllib.loads(text)
        else:
            cfg = json.loads(text)
    except Exception as e:  # noqa: BLE001 - reported as one line
        msg = f"could not parse config file {path}: {e}"
        raise CLIError(msg) from None
    if not isinstance(cfg, dict):
        msg = f"config file {path} must hold a mapping of parameter names to values."
        raise CLIError(msg)
    return cfg


def _summary_line(adata, key: str | None = None) -> str:
    import numpy as np
    import scipy.sparse as sp

    x = adata.X if key is None else adata.layers[key]
    nnz = x.nnz if sp.issparse(x) else int(np.count_nonzero(x))
    return f"{adata.n_obs} cells x {adata.n_vars} genes, {1 - nnz / max(adata.n_obs * adata.n_vars, 1):.1%} zeros"


# --------------------------------------------------------------------------- impute


def _add_impute(sub) -> None:
    from .methods import available_methods

    p = sub.add_parser("impute", help="impute / repair a count matrix")
    p.add_argument("input", help="input counts: .h5ad, 10x directory or .h5, .csv/.tsv")
    p.add_argument("output", help="output file (.h5ad keeps every slot; .csv writes the new layer)")
    p.add_argument("--method", default="alra", help=f"one of: {', '.join(available_methods())}")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    p.add_argument("--key-added", default=None, help="name of the output layer (default: method)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--config", default=None, help="JSON/TOML file of method parameters")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="text input: cells in rows (--transpose) or genes in rows (--no-transpose); default: auto")
    _common(p)


def _cmd_impute(args) -> int:
    import screpair

    params = _load_config(args.config)
    adata = screpair.read(args.input, transpose=args.transpose)
    screpair.impute(adata, method=args.method, layer=args.layer, key_added=args.key_added,
                    rng=args.seed, **params)
    key = args.key_added or args.method
    _write_result(adata, args.output, key)
    print(f"imputed with {args.method!r}: {_summary_line(adata, key)} -> {args.output} "
          f"(layers[{key!r}], {adata.uns[key]['seconds']:.1f} s)")
    return 0


def _write_result(adata, path: str, key: str) -> None:
    """Write ``adata``: ``.h5ad`` keeps every slot; text formats get the ``key`` layer."""
    import screpair

    is_h5ad = Path(path).name.lower().endswith(".h5ad")
    screpair.write(adata, path, layer=None if is_h5ad else key)


# --------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a count file: shape, sparsity, count check, labels")
    p.add_argument("input")
    p.add_argument("--layer", default=None)
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None)
    _common(p)


def _cmd_info(args) -> int:
    import warnings

    import numpy as np

    import screpair

    from ._utils import _layer_matrix, get_counts, library_size

    adata = screpair.read(args.input, transpose=args.transpose)
    print(f"{args.input}: {_summary_line(adata) if args.layer is None else adata.shape}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = get_counts(adata, args.layer)
        lib = library_size(x)
        print(f"counts: OK (raw integers); library size median {np.median(lib):.0f}, "
              f"range {lib.min():.0f}-{lib.max():.0f}")
        for w in caught:
            print(f"note: {w.message}")
    except (ValueError, KeyError) as e:
        _layer_matrix(adata, args.layer)
        print(f"counts: NOT raw counts: {e}")
    layers = ", ".join(adata.layers.keys()) or "none"
    print(f"layers: {layers}")
    labels = [c for c in adata.obs.columns if 1 < adata.obs[c].nunique() <= max(50, adata.n_obs // 10)]
    for c in labels:
        vc = adata.obs[c].value_counts()
        top = ", ".join(f"{k} {v}" for k, v in vc.head(5).items())
        print(f"label obs[{c!r}]: {len(vc)} values ({top}{', …' if len(vc) > 5 else ''})")
    if not labels:
        print("labels: none found in obs")
    return 0


# --------------------------------------------------------------------------- demo


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the default method on the bundled demo data")
    p.add_argument("output", nargs="?", default=None, help="optional .h5ad output path")
    p.add_argument("--method", default="alra")
    p.add_argument("--seed", type=int, default=0)
    _common(p)


def _cmd_demo(args) -> int:
    import numpy as np

    import screpair

    from . import datasets

    adata = datasets.demo()
    print(f"demo data: {datasets.DEMO_DESCRIPTION}; {_summary_line(adata)}")
    screpair.impute(adata, method=args.method, rng=args.seed)
    imp = adata.layers[args.method]
    x = adata.X.toarray()
    zeros = x == 0
    filled = float(np.mean(imp[zeros] > 0.5)) if zeros.any() else 0.0
    print(f"{args.method}: {adata.uns[args.method]['seconds']:.1f} s; "
          f"{filled:.1%} of the {zeros.mean():.0%} zero entries now hold >= 0.5 counts; "
          f"layer {args.method!r} written")
    if "cell_type" in adata.obs:
        from sklearn.metrics import silhouette_score

        def sil(m):
            lib = m.sum(1, keepdims=True)
            lg = np.log1p(m / np.maximum(lib, 1) * 1e4)
            from sklearn.decomposition import PCA

            pcs = PCA(20, random_state=0).fit_transform(lg)
            return silhouette_score(pcs, adata.obs["cell_type"].astype(str))

        print(f"cell-type silhouette (PCA of log-normalized): raw {sil(x):.3f} -> "
              f"{args.method} {sil(np.asarray(imp)):.3f}")
    if args.output:
        screpair.write(adata, args.output)
        print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- simulate


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="simulate Splat counts with known truth (true_counts, dropout_mask)")
    p.add_argument("output", help="output file (.h5ad keeps the truth layers; .csv writes the observed counts)")
    p.add_argument("--preset", choices=["default", "cnnimpute"], default="default",
                   help="base parameters: Splatter's defaults, or the cnnImpute paper's 2000 x 4000 setting")
    p.add_argument("--n-obs", type=int, default=None, help="number of cells (default: the preset's)")
    p.add_argument("--n-vars", type=int, default=None, help="number of genes (default: the preset's)")
    p.add_argument("--group-prob", default=None, help="comma-separated group probabilities, e.g. 0.3,0.7")
    p.add_argument("--lib-loc", type=float, default=None, help="log-normal library size meanlog")
    p.add_argument("--dropout-mid", type=float, default=None, help="logistic dropout midpoint")
    p.add_argument("--dropout-shape", type=float, default=None, help="logistic dropout shape")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _common(p)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(":", ",").split(",") if v.strip())
    except ValueError:
        msg = f"{flag} takes numbers separated by commas, got {text!r}."
        raise CLIError(msg) from None


def _cmd_simulate(args) -> int:
    import time

    import screpair

    from . import simulate

    start = time.perf_counter()
    group_prob = None if args.group_prob is None else _floats(args.group_prob, "--group-prob")
    sim = simulate.splat(args.n_obs, args.n_vars, preset=args.preset, group_prob=group_prob,
                         lib_loc=args.lib_loc, dropout_mid=args.dropout_mid,
                         dropout_shape=args.dropout_shape, rng=args.seed)
    seconds = time.perf_counter() - start
    screpair.write(sim, args.output)
    truth = sim.layers["true_counts"]
    dropped = sim.layers["dropout_mask"].nnz / max(truth.nnz, 1)
    print(f"simulated ({args.preset!r}, {sim.obs['group'].nunique()} groups, seed {args.seed}): "
          f"{_summary_line(sim)}; {dropped:.1%} of non-zero true counts dropped "
          f"-> {args.output} ({seconds:.1f} s to simulate)")
    return 0


# --------------------------------------------------------------------------- degrade


def _add_degrade(sub) -> None:
    p = sub.add_parser("degrade", help="damage clean counts like degraded RNA (3' bias, dropout, noise)")
    p.add_argument("input", help="clean counts: .h5ad, 10x directory or .h5, .csv/.tsv")
    p.add_argument("output", help="output file (.h5ad keeps true_counts / dropout_mask)")
    rng_help = "a number, or LOW,HIGH to draw each cell's value uniformly"
    p.add_argument("--bias-3p", default="0", help=f"3' bias intensity >= 0: {rng_help}")
    p.add_argument("--dropout-rate", default="0", help=f"dropout probability in [0, 1]: {rng_help}")
    p.add_argument("--noise-sd", default="0", help=f"Gaussian noise sd on log1p(CP10k): {rng_help}")
    p.add_argument("--gene-length", default=None,
                   help="var column with transcript lengths (default: var['gene_length'] or stand-in lengths)")
    p.add_argument("--rounding", choices=["stochastic", "nearest", "none"], default="stochastic",
                   help="how degraded values become counts")
    p.add_argument("--layer", default=None, help="layer holding the clean counts (default: X)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="text input: cells in rows (--transpose) or genes in rows (--no-transpose); default: auto")
    _common(p)


def _cell_param(text: str, flag: str) -> float | tuple[float, float]:
    vals = _floats(text, flag)
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return vals
    msg = f"{flag} takes a number or LOW,HIGH, got {text!r}."
    raise CLIError(msg)


def _cmd_degrade(args) -> int:
    import screpair

    from . import simulate

    adata = screpair.read(args.input, transpose=args.transpose)
    deg = simulate.degrade(adata, layer=args.layer,
                           bias_3p=_cell_param(args.bias_3p, "--bias-3p"),
                           dropout_rate=_cell_param(args.dropout_rate, "--dropout-rate"),
                           noise_sd=_cell_param(args.noise_sd, "--noise-sd"),
                           gene_length=args.gene_length, rounding=args.rounding, rng=args.seed)
    screpair.write(deg, args.output)
    clean, damaged = deg.layers["true_counts"].sum(), deg.layers["counts"].sum()
    print(f"degraded (seed {args.seed}): {_summary_line(deg)}; {damaged / max(clean, 1):.1%} of the "
          f"clean counts kept, {deg.layers['dropout_mask'].nnz} non-zero entries dropped -> {args.output}")
    return 0


# --------------------------------------------------------------------------- benchmark


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="compare methods and peers on datasets and protocols")
    p.add_argument("--data", required=True, help="comma-separated .h5ad files (raw counts in X)")
    p.add_argument("--methods", default="raw,knn,alra",
                   help="comma-separated: registered methods and peers raw, gene_mean, magic, scvi")
    p.add_argument("--protocol", default="masked",
                   help="comma-separated: masked, mcv, clustering, deg, dropout, degrade, degrade_reference, smfish")
    p.add_argument("--seeds", default="0", help="comma-separated integer seeds")
    p.add_argument("--out", required=True, help="output folder (results.csv, summary.md, PNGs)")
    p.add_argument("--label-key", default=None, help="obs column of cell labels (default: auto)")
    p.add_argument("--config", default=None,
                   help='JSON/TOML: {"method_params": {"scvi": {"max_epochs": 5}}, "protocol_params": {...}}')
    p.add_argument("--scvi-max-epochs", type=int, default=None, help="scVI epochs (default: scvi's)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNGs")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar over jobs")
    _common(p)


def _names(text: str, flag: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals:
        msg = f"{flag} needs at least one value."
        raise CLIError(msg)
    return vals


def _cmd_benchmark(args) -> int:
    import shlex

    from .evaluate import run_benchmark

    cfg = _load_config(args.config)
    method_params = {k: dict(v) for k, v in cfg.get("method_params", {}).items()}
    protocol_params = {k: dict(v) for k, v in cfg.get("protocol_params", {}).items()}
    if args.scvi_max_epochs is not None:
        method_params.setdefault("scvi", {})["max_epochs"] = args.scvi_max_epochs
    protocols = _names(args.protocol, "--protocol")
    if args.label_key:
        for proto in protocols:
            protocol_params.setdefault(proto, {})["label_key"] = args.label_key
    try:
        seeds = [int(v) for v in _names(args.seeds, "--seeds")]
    except ValueError:
        msg = f"--seeds takes integers separated by commas, got {args.seeds!r}."
        raise CLIError(msg) from None
    parts = ["screpair", "benchmark", "--data", args.data, "--methods", args.methods,
             "--protocol", args.protocol, "--seeds", args.seeds, "--out", args.out]
    for flag, value in (("--label-key", args.label_key), ("--config", args.config),
                        ("--scvi-max-epochs", args.scvi_max_epochs)):
        if value is not None:
            parts += [flag, str(value)]
    command = shlex.join(parts)
    res = run_benchmark(_names(args.data, "--data"), _names(args.methods, "--methods"), protocols,
                        seeds, args.out, method_params=method_params,
                        protocol_params=protocol_params, plots=args.plots,
                        progress=args.progress and not args.quiet, command=command)
    n_ok = int((res.groupby(["dataset", "protocol", "method", "seed"])["status"].first() == "ok").sum())
    n_jobs = res.groupby(["dataset", "protocol", "method", "seed"]).ngroups
    print(f"benchmark: {n_ok}/{n_jobs} jobs ok -> {args.out}/results.csv, summary.md")
    for _, r in res[res["status"] != "ok"].iterrows():
        print(f"  {r['status']}: {r['dataset']}/{r['protocol']}/{r['method']}/seed {r['seed']}: "
              f"{r['error']}")
    return 0


# --------------------------------------------------------------------------- dropout


def _add_dropout(sub) -> None:
    p = sub.add_parser("dropout", help="dropout probability of every zero (cnnImpute/scImpute)")
    p.add_argument("input", help="input counts: .h5ad, 10x directory or .h5, .csv/.tsv")
    p.add_argument("output", help="output .h5ad (adds layers['dropout_prob'] and the fitted parameters)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    p.add_argument("--groupby", default=None,
                   help="obs column of cell labels (default: cluster with t-SNE + ADPclust)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability above which a zero counts as missing (default 0.5)")
    p.add_argument("--key-added", default="dropout_prob", help="name of the output layer")
    p.add_argument("--seed", type=int, default=0, help="random seed for the clustering")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="text input: cells in rows (--transpose) or genes in rows (--no-transpose); default: auto")
    _common(p)


def _cmd_dropout(args) -> int:
    import screpair

    adata = screpair.read(args.input, transpose=args.transpose)
    screpair.dropout_probability(adata, layer=args.layer, groupby=args.groupby,
                                 threshold=args.threshold, key_added=args.key_added, rng=args.seed)
    info = adata.uns[args.key_added]
    screpair.write(adata, args.output)
    print(f"dropout probabilities for {_summary_line(adata)}: {len(info['clusters'])} clusters "
          f"(obs[{info['groupby']!r}]), {info['missing_fraction_of_zeros']:.1%} of zeros missing "
          f"(p > {args.threshold:g}) -> {args.output} (layers[{args.key_added!r}], "
          f"{info['seconds']:.1f} s)")
    return 0


# --------------------------------------------------------------------------- main

_COMMANDS = {
    "impute": (_add_impute, _cmd_impute),
    "info": (_add_info, _cmd_info),
    "demo": (_add_demo, _cmd_demo),
    "simulate": (_add_simulate, _cmd_simulate),
    "degrade": (_add_degrade, _cmd_degrade),
    "benchmark": (_add_benchmark, _cmd_benchmark),
    "dropout": (_add_dropout, _cmd_dropout),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="screpair",
        description="Repair single-cell RNA-seq count matrices (dropouts, imputation, degraded profiles).",
    )
    parser.add_argument("--version", action="version", version=f"screpair {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``screpair`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._logging import configure_cli_logging

    configure_cli_logging(-1 if args.quiet else args.verbose)
    try:
        return _COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print("screpair: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI turns every error into one line
        if args.debug:
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, KeyError):
            text = text.strip("'\"")
        print(f"screpair: error: {text}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
