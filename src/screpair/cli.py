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
    """Write ``adata``; text formats get the ``key`` layer as their matrix."""
    import screpair

    if Path(path).name.lower().endswith((".h5ad",)):
        screpair.write(adata, path)
    else:
        out = adata.copy()
        out.X = out.layers[key]
        screpair.write(out, path)


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


# --------------------------------------------------------------------------- main

_COMMANDS = {
    "impute": (_add_impute, _cmd_impute),
    "info": (_add_info, _cmd_info),
    "demo": (_add_demo, _cmd_demo),
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
