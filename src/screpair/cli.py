"""Command-line interface: ``screpair <command> ...``.

Each command has a parser builder ``_add_<cmd>(sub)`` and a handler ``_cmd_<cmd>(args) -> int``,
both listed in ``_COMMANDS``. Heavy imports happen inside handlers, after parsing, so ``--help``
and argument errors are instant. Everything that can be checked without the data (output path,
names, method, parameters, seed) is checked before the input is read. Errors and warnings are
printed as one line on stderr; errors exit with code 2 (``--debug`` shows the traceback), Ctrl-C
with 130 and SIGTERM with 143, leaving the old output file or none.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__

EXIT_ERROR = 2
EXIT_FAILED_JOBS = 1
EXIT_INTERRUPT = 130
EXIT_TERMINATED = 143
MAX_SEED = 2**32 - 1


class CLIError(Exception):
    """An error with a message meant for the user."""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler (a BaseException, like KeyboardInterrupt)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``screpair: error: ...``, exit 2), no usage dump."""

    def error(self, message: str):
        prog = self.prog
        print(f"screpair: error: {prog.removeprefix('screpair ')}: {message} "
              f"(see '{prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


# --------------------------------------------------------------------------- helpers


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        msg = f"must be an integer from 0 to {MAX_SEED}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (also the input itself) and existing "
                        "layers of the output's name; the input layer is never replaced")


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-counts", action="store_true",
                   help="skip the check that integer input looks like raw counts rather than "
                        "rounded normalized values (integers are still required)")


def _check_output(path: str, *, inputs: Sequence[str] = (), overwrite: bool = False,
                  h5ad_only: bool = False) -> Path:
    """Check an output path before any work (:func:`screpair.io.check_output_path`)."""
    from .io import check_output_path

    try:
        return check_output_path(path, inputs=inputs, overwrite=overwrite,
                                 formats=("h5ad",) if h5ad_only else None,
                                 overwrite_hint="--overwrite")
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as e:
        raise CLIError(str(e)) from None


def _check_name(value: str | None, flag: str) -> None:
    if value is not None:
        from ._utils import check_layer_name

        check_layer_name(value, flag)


def _check_not_input_layer(args) -> None:
    from ._utils import check_not_input_layer

    check_not_input_layer(args.key_added or getattr(args, "method", None), args.layer,
                          "--key-added")


def _set_trust(args) -> None:
    if getattr(args, "trust_counts", False):
        from ._utils import TRUST_COUNTS_ENV

        os.environ[TRUST_COUNTS_ENV] = "1"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    p.add_argument("--debug", action="store_true", help="show tracebacks on error")


def _load_config(path: str | None) -> dict:
    """Method parameters from a JSON or TOML file (flags given on the command line win).

    A nested table (``{"train": {"lr": 3e-4}}``) is passed on as a dict, which a method with
    config parameters reads as "its default config with these fields changed"
    (:func:`screpair.methods._torch.resolve_config`).
    """
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
    p.add_argument("--seed", type=_seed, default=0, help="random seed")
    p.add_argument("--config", default=None,
                   help='JSON/TOML file of method parameters; a nested table updates a config of '
                        'the method, e.g. {"train": {"lr": 3e-4}}')
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="text input: cells in rows (--transpose) or genes in rows (--no-transpose); default: auto")
    p.add_argument("--genes", default=None,
                   help="output only these genes: hvg:N (the N most variable), a boolean var "
                        "column, or gene names separated by commas; the method still sees every "
                        "gene (uses the chunked path; the output file holds those genes only)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="read and write by blocks of this many cells (the chunked path; "
                        ".h5ad/.zarr output); default: chosen from --max-memory")
    p.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 8G (default: half of this machine's RAM); an input "
                        "whose in-memory run would need more takes the chunked path")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS|FILE",
                   help="run the posterior by blocks on a Dask cluster: the scheduler's address "
                        "(tcp://HOST:PORT) or its scheduler file; .h5ad/.zarr input the workers "
                        "can read, .zarr output (needs screpair[distributed])")
    _overwrite(p)
    _trust(p)
    _common(p)


def _genes_arg(text: str | None):
    """``--genes``: ``hvg:N``, a var column or one gene (a string), or names with commas (a
    list)."""
    if text is None or "," not in text:
        return text
    return _names(text, "--genes")


def _choose_path(args, est, genes) -> tuple[bool, str]:
    """Whether ``impute`` takes the chunked file path, and why (for the log)."""
    from ._chunks import open_rows, store_format
    from .io import output_format
    from .methods._file import format_bytes, in_memory_bytes, memory_budget

    budget = memory_budget(args.max_memory)
    streamable = output_format(args.output)[0] in ("h5ad", "zarr")
    if args.chunk_rows is not None or genes is not None:
        if not streamable:
            flag = "--chunk-rows" if args.chunk_rows is not None else "--genes"
            msg = (f"{flag} writes by blocks: the output must be .h5ad or .zarr, got "
                   f"'{args.output}'.")
            raise CLIError(msg)
        return True, "--chunk-rows" if args.chunk_rows is not None else "--genes"
    if not (streamable and store_format(args.input)):
        return False, "in memory (only .h5ad/.zarr input and output are chunked)"
    try:
        src = open_rows(args.input, args.layer)
    except (ValueError, KeyError, OSError):  # the in-memory path reports it as it always has
        return False, "in memory (the input's counts could not be opened by rows)"
    with src:
        n_layers = 1 + bool(est.has_var) + bool(est.has_dropout_prob)
        need = in_memory_bytes(src.n_obs, src.n_vars, src.nnz(), n_layers)
    where = "default: half of the RAM" if args.max_memory is None else "--max-memory"
    why = (f"in memory would need about {format_bytes(need)}, budget {format_bytes(budget)} "
           f"({where})")
    return need > budget, why


def _cmd_impute(args) -> int:
    _check_name(args.layer, "--layer")
    _check_name(args.key_added, "--key-added")
    _check_not_input_layer(args)
    _check_output(args.output, inputs=[args.input], overwrite=args.overwrite)
    params = _load_config(args.config)
    import screpair

    from .methods._api import make_estimator, quiet_estimator

    est = make_estimator(args.method, rng=args.seed, **params)  # checks name and parameters
    if args.quiet:  # -q: no bars at all, the method's own (epochs, SAVER's batches) included
        quiet_estimator(est, params)
    _set_trust(args)
    genes = _genes_arg(args.genes)
    if args.chunk_rows is not None and args.chunk_rows < 1:
        msg = f"--chunk-rows must be a positive integer, got {args.chunk_rows}."
        raise CLIError(msg)
    from .methods._genes import parse_genes

    parse_genes(genes)
    if not Path(args.input).expanduser().exists():
        msg = f"no such file or directory: '{args.input}'"
        raise FileNotFoundError(msg)
    if args.scheduler is not None:  # checked before connecting, connected before the work
        from .methods._dask import check_run, connect

        check_run(est, Path(args.input).expanduser(), Path(args.output).expanduser())
        client = connect(args.scheduler)
        try:
            return _impute_dask(args, est, genes, client)
        finally:
            client.close()
    chunked, why = _choose_path(args, est, genes)
    import logging

    logging.getLogger("screpair").info("impute: %s path (%s)", "chunked" if chunked else
                                       "in-memory", why)
    if chunked:
        rec = screpair.impute_file(args.input, args.output, est, layer=args.layer,
                                   key_added=args.key_added, genes=genes,
                                   chunk_rows=args.chunk_rows, max_memory=args.max_memory,
                                   overwrite=args.overwrite, progress=not args.quiet,
                                   transpose=args.transpose)
        key = args.key_added or args.method
        n_genes = rec.get("n_genes_imputed", "all")
        print(f"imputed with {args.method!r} by blocks of {rec['chunk_rows']} cells ({why}): "
              f"{n_genes} genes -> {args.output} (layers[{key!r}], {rec['seconds']:.1f} s)")
        return 0
    adata = screpair.read(args.input, transpose=args.transpose)
    screpair.impute(adata, est, layer=args.layer, key_added=args.key_added,
                    overwrite=args.overwrite)
    key = args.key_added or args.method
    _write_result(adata, args.output, key)
    print(f"imputed with {args.method!r}: {_summary_line(adata, key)} -> {args.output} "
          f"(layers[{key!r}], {adata.uns[key]['seconds']:.1f} s)")
    return 0


def _impute_dask(args, est, genes, client) -> int:
    import logging

    import screpair

    logging.getLogger("screpair").info("impute: chunked path on the Dask cluster at %s",
                                       args.scheduler)
    rec = screpair.impute_file(args.input, args.output, est, layer=args.layer,
                               key_added=args.key_added, genes=genes, chunk_rows=args.chunk_rows,
                               max_memory=args.max_memory, overwrite=args.overwrite,
                               progress=not args.quiet, transpose=args.transpose,
                               client=client)
    key = args.key_added or args.method
    n_genes = rec.get("n_genes_imputed", "all")
    print(f"imputed with {args.method!r} by blocks of {rec['chunk_rows']} cells on "
          f"{rec['dask']['n_workers']} Dask worker(s): {n_genes} genes -> {args.output} "
          f"(layers[{key!r}], {rec['seconds']:.1f} s)")
    return 0


def _write_result(adata, path: str, key: str) -> None:
    """Write ``adata``: ``.h5ad`` / ``.zarr`` keep every slot; text formats get the ``key`` layer."""
    import screpair

    is_store = screpair.io.output_format(path)[0] in ("h5ad", "zarr")
    screpair.write(adata, path, layer=None if is_store else key)


# --------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a count file: shape, sparsity, count check, labels")
    p.add_argument("input")
    p.add_argument("--layer", default=None, help="layer to check ('raw': adata.raw.X; default: X)")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None)
    _trust(p)
    _common(p)


def _cmd_info(args) -> int:
    import warnings

    import numpy as np

    import screpair

    from ._utils import _layer_matrix, get_counts, library_size

    _set_trust(args)
    adata = screpair.read(args.input, transpose=args.transpose)
    shown = args.layer is None and adata.X is not None
    print(f"{args.input}: {_summary_line(adata) if shown else adata.shape}")
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
    p.add_argument("--seed", type=_seed, default=0)
    _overwrite(p)
    _common(p)


def _cmd_demo(args) -> int:
    from .methods._registry import get_method

    if args.output:
        _check_output(args.output, overwrite=args.overwrite, h5ad_only=True)
    get_method(args.method)
    import numpy as np

    import screpair

    from . import datasets

    adata = datasets.demo()
    print(f"demo data: {datasets.DEMO_DESCRIPTION}; {_summary_line(adata)}")
    screpair.impute(adata, method=args.method, rng=args.seed)
    imp = adata.layers[args.method]
    imp = imp.toarray() if hasattr(imp, "toarray") else np.asarray(imp)  # alra's may be CSR
    x = adata.X.toarray()
    zeros = x == 0
    filled = float(np.mean(imp[zeros] > 0.5)) if zeros.any() else 0.0
    print(f"{args.method}: {adata.uns[args.method]['seconds']:.1f} s; "
          f"{filled:.1%} of the {zeros.mean():.0%} zero entries now hold >= 0.5 counts; "
          f"layer {args.method!r} written")
    if "cell_type" in adata.obs:
        from sklearn.metrics import silhouette_score

        from . import _norm

        def sil(m):
            lg = _norm.log_normalize(m, _norm.CP10K)
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
    p.add_argument("--seed", type=_seed, default=0, help="random seed")
    _overwrite(p)
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

    _check_output(args.output, overwrite=args.overwrite)
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
    p.add_argument("--seed", type=_seed, default=0, help="random seed")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="text input: cells in rows (--transpose) or genes in rows (--no-transpose); default: auto")
    _overwrite(p)
    _trust(p)
    _common(p)


def _cell_param(text: str, flag: str) -> float | tuple[float, float]:
    vals = _floats(text, flag)
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 2:
        return vals
    msg = f"{flag} takes a number or LOW,HIGH, got {text!r}."
    raise CLIError(msg)


def _check_damage(damage: dict) -> None:
    highs = {"dropout_rate": 1.0}
    for name, value in damage.items():
        flag = "--" + name.replace("_", "-")
        values = value if isinstance(value, tuple) else (value,)
        high = highs.get(name, float("inf"))
        if any(not (0.0 <= v <= high) for v in values):
            bounds = f"in [0, {high:g}]" if high < float("inf") else ">= 0"
            msg = f"{flag} must be {bounds}, got {','.join(f'{v:g}' for v in values)}."
            raise CLIError(msg)


def _cmd_degrade(args) -> int:
    import screpair

    from . import simulate

    _check_name(args.layer, "--layer")
    _check_output(args.output, inputs=[args.input], overwrite=args.overwrite)
    damage = {"bias_3p": _cell_param(args.bias_3p, "--bias-3p"),
              "dropout_rate": _cell_param(args.dropout_rate, "--dropout-rate"),
              "noise_sd": _cell_param(args.noise_sd, "--noise-sd")}
    _check_damage(damage)
    _set_trust(args)
    adata = screpair.read(args.input, transpose=args.transpose)
    deg = simulate.degrade(adata, layer=args.layer, **damage, gene_length=args.gene_length,
                           rounding=args.rounding, rng=args.seed)
    screpair.write(deg, args.output)
    clean, damaged = deg.layers["true_counts"].sum(), deg.layers["counts"].sum()
    print(f"degraded (seed {args.seed}): {_summary_line(deg)}; {damaged / max(clean, 1):.1%} of the "
          f"clean counts kept, {deg.layers['dropout_mask'].nnz} non-zero entries dropped -> {args.output}")
    return 0


# --------------------------------------------------------------------------- benchmark


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="compare methods and peers on datasets and protocols")
    p.add_argument("--suite", default=None, choices=("papers", "quick"),
                   help="a named suite instead of --data/--protocol: 'papers' (every protocol on "
                        "every dataset of --data-dir, 5 seeds where the protocol is random, "
                        "hours) or 'quick' (demo data, minutes); --methods / --seeds override "
                        "the suite's")
    p.add_argument("--data-dir", default=None,
                   help="folder of the suite's datasets (default: $SCREPAIR_DATA or ../shared/data)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="--suite: continue from the jobs an interrupted run finished (jobs.csv)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rewrite results.csv, summary.md and the figures in --out "
                        "from the jobs recorded there so far (with --suite: every run's "
                        "jobs.csv; works while the suite is still running)")
    p.add_argument("--data", default=None, help="comma-separated .h5ad files (raw counts in X)")
    p.add_argument("--methods", default=None,
                   help="comma-separated: registered methods and peers raw, gene_mean, cqn, "
                        "magic, scvi (default: raw,knn,alra, or the suite's)")
    p.add_argument("--protocol", default="masked",
                   help="comma-separated: masked, mcv, clustering, deg, dropout, degrade, "
                        "degrade_reference, smfish, downsample")
    p.add_argument("--seeds", default=None, help="comma-separated integer seeds (default: 0)")
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


_BENCHMARK_KEYS = ("method_params", "protocol_params")


def _cmd_benchmark(args) -> int:
    import shlex

    from .evaluate import run_benchmark

    cfg = _load_config(args.config)
    unknown = sorted(set(cfg) - set(_BENCHMARK_KEYS))
    if unknown:
        msg = (f"config file {args.config}: unknown key(s) {unknown}; accepted: "
               f"{', '.join(_BENCHMARK_KEYS)}.")
        raise CLIError(msg)
    for key in _BENCHMARK_KEYS:
        value = cfg.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            msg = (f"config file {args.config}: {key!r} must map names to tables of parameters, "
                   f'e.g. {{"{key}": {{"knn": {{"k": 10}}}}}}.')
            raise CLIError(msg)
    if args.report_only:
        return _benchmark_report(args)
    if (args.suite is None) == (args.data is None):
        msg = "benchmark needs exactly one of --data (files) and --suite (papers or quick)."
        raise CLIError(msg)
    if args.suite is not None:
        from .evaluate._suites import check_suite

        check_suite(args.suite, data_dir=args.data_dir)
    else:
        for path in _names(args.data, "--data"):
            if not Path(path).expanduser().exists():
                msg = f"--data: no such file: '{path}'"
                raise CLIError(msg)
    method_params = {k: dict(v) for k, v in cfg.get("method_params", {}).items()}
    protocol_params = {k: dict(v) for k, v in cfg.get("protocol_params", {}).items()}
    if args.scvi_max_epochs is not None:
        method_params.setdefault("scvi", {})["max_epochs"] = args.scvi_max_epochs
    protocols = _names(args.protocol, "--protocol")
    if args.label_key:
        for proto in protocols:
            protocol_params.setdefault(proto, {})["label_key"] = args.label_key
    try:
        seeds = None if args.seeds is None else [_seed(v) for v in _names(args.seeds, "--seeds")]
    except argparse.ArgumentTypeError:
        msg = f"--seeds takes integers from 0 to {MAX_SEED} separated by commas, got {args.seeds!r}."
        raise CLIError(msg) from None
    methods = None if args.methods is None else _names(args.methods, "--methods")
    parts = ["screpair", "benchmark"]
    for flag, value in (("--suite", args.suite), ("--data-dir", args.data_dir),
                        ("--data", args.data), ("--methods", args.methods),
                        ("--protocol", None if args.suite else args.protocol),
                        ("--seeds", args.seeds), ("--out", args.out),
                        ("--label-key", args.label_key), ("--config", args.config),
                        ("--scvi-max-epochs", args.scvi_max_epochs)):
        if value is not None:
            parts += [flag, str(value)]
    command = shlex.join(parts)
    progress = args.progress and not args.quiet
    if args.suite is not None:
        from .evaluate import run_suite

        res = run_suite(args.suite, args.out, data_dir=args.data_dir, methods=methods,
                        seeds=seeds, method_params=method_params, plots=args.plots,
                        progress=progress, resume=args.resume, command=command)
    else:
        res = run_benchmark(_names(args.data, "--data"), methods or ["raw", "knn", "alra"],
                            protocols, seeds or [0], args.out, method_params=method_params,
                            protocol_params=protocol_params, plots=args.plots,
                            progress=progress, command=command)
    n_ok = int((res.groupby(["dataset", "protocol", "method", "seed"])["status"].first() == "ok").sum())
    n_jobs = res.groupby(["dataset", "protocol", "method", "seed"]).ngroups
    print(f"benchmark: {n_ok}/{n_jobs} jobs ok -> {args.out}/results.csv, summary.md")
    failed = res[res["status"] != "ok"].drop_duplicates(["dataset", "protocol", "method", "seed"])
    for _, r in failed.iterrows():
        print(f"  {r['status']}: {r['dataset']}/{r['protocol']}/{r['method']}/seed {r['seed']}: "
              f"{r['error']}")
    if n_ok < n_jobs:
        print(f"screpair: error: {n_jobs - n_ok} of {n_jobs} benchmark jobs failed (listed above; "
              "results of the others are written)", file=sys.stderr)
        return EXIT_FAILED_JOBS
    return 0


def _benchmark_report(args) -> int:
    """``benchmark --report-only``: the report of what --out holds, nothing run."""
    import shlex

    from .evaluate._benchmark import collect_results, write_outputs

    parts = ["screpair", "benchmark", *(["--suite", args.suite] if args.suite else []),
             "--out", args.out, "--report-only"]
    command = shlex.join(parts)
    if args.suite is not None:
        from .evaluate._suites import report_suite

        try:
            res = report_suite(args.suite, args.out, plots=args.plots, command=command)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    else:
        res = collect_results(args.out)
        if res.empty:
            msg = (f"--report-only: no jobs recorded in '{args.out}' (no jobs.csv or "
                   "results.csv there).")
            raise CLIError(msg)
        write_outputs(res, args.out, plots=args.plots, command=command)
    jobs = res.drop_duplicates(["dataset", "protocol", "method", "seed"])
    n_ok = int((jobs["status"] == "ok").sum())
    print(f"benchmark report: {n_ok} ok and {len(jobs) - n_ok} failed or skipped jobs -> "
          f"{args.out}/results.csv, summary.md")
    return 0


# --------------------------------------------------------------------------- dropout


def _add_dropout(sub) -> None:
    p = sub.add_parser("dropout", help="dropout probability of every zero (ZINB or scImpute)")
    p.add_argument("input", help="input counts: .h5ad, 10x directory or .h5, .csv/.tsv")
    p.add_argument("output", help="output .h5ad (adds layers['dropout_prob'] and the fitted "
                                  "parameters; .csv/.tsv writes the probability layer)")
    p.add_argument("--model", choices=("zinb", "scimpute"), default="zinb",
                   help="zinb: zero-inflated NB with size factors and a logistic dropout curve "
                        "(default); scimpute: scImpute's gamma-normal mixture (cnnImpute paper)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    p.add_argument("--groupby", default=None,
                   help="obs column of cell labels (default: cluster with t-SNE + ADPclust)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability above which a zero counts as missing (default 0.5)")
    p.add_argument("--key-added", default="dropout_prob", help="name of the output layer")
    p.add_argument("--seed", type=_seed, default=0, help="random seed for the clustering")
    p.add_argument("--transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="text input: cells in rows (--transpose) or genes in rows (--no-transpose); default: auto")
    _overwrite(p)
    _trust(p)
    _common(p)


def _cmd_dropout(args) -> int:
    _check_name(args.layer, "--layer")
    _check_name(args.key_added, "--key-added")
    _check_not_input_layer(args)
    _check_output(args.output, inputs=[args.input], overwrite=args.overwrite)
    if not 0.0 <= args.threshold <= 1.0:
        msg = f"--threshold must be in [0, 1], got {args.threshold:g}."
        raise CLIError(msg)
    import screpair

    _set_trust(args)
    adata = screpair.read(args.input, transpose=args.transpose)
    screpair.dropout_probability(adata, layer=args.layer, groupby=args.groupby, model=args.model,
                                 threshold=args.threshold, key_added=args.key_added, rng=args.seed,
                                 overwrite=args.overwrite)
    info = adata.uns[args.key_added]
    _write_result(adata, args.output, args.key_added)
    print(f"dropout probabilities ({args.model}) for {_summary_line(adata)}: "
          f"{len(info['clusters'])} clusters "
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
    parser = _Parser(
        prog="screpair",
        description="Repair single-cell RNA-seq count matrices (dropouts, imputation, degraded profiles).",
    )
    parser.add_argument("--version", action="version", version=f"screpair {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, without source path or code excerpt."""
    text = " ".join(str(message).split())
    print(f"screpair: warning: {text}", file=sys.stderr)


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``screpair`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._logging import configure_cli_logging

    configure_cli_logging(-1 if args.quiet else args.verbose)
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    old_show, warnings.showwarning = warnings.showwarning, _show_warning
    old_trust = os.environ.get("SCREPAIR_TRUST_COUNTS")
    try:
        with warnings.catch_warnings():  # shown once each, as one line; -q: errors only
            warnings.simplefilter("ignore" if args.quiet else "default")
            return _COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print("screpair: interrupted; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPT
    except _Terminated:
        print("screpair: terminated (SIGTERM); no partial output was left", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:  # noqa: BLE001 - the CLI turns every error into one line
        if args.debug:
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, KeyError):
            text = text.strip("'\"")
        print(f"screpair: error: {text}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        warnings.showwarning = old_show
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
        if old_trust is None:
            os.environ.pop("SCREPAIR_TRUST_COUNTS", None)
        else:
            os.environ["SCREPAIR_TRUST_COUNTS"] = old_trust


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
