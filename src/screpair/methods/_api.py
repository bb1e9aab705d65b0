"""The single AnnData-writing wrapper around every imputation method."""

from __future__ import annotations

import inspect
import time
import types
import typing
from typing import Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._logging import get_logger, log_task
from .._utils import (
    RNGLike,
    check_output_keys,
    get_counts,
    jsonable,
    nonempty,
    prepare_adata,
    var_names,
)
from ._base import BaseImputer, DataContext, Posterior, moved_params_error
from ._registry import get_method

logger = get_logger(__name__)


def make_estimator(method: str | BaseImputer, *, rng: RNGLike = 0, **params) -> BaseImputer:
    """Build the estimator for ``method`` (a registered name or an estimator instance)."""
    if isinstance(method, BaseImputer):
        if params:
            moved = moved_params_error(type(method), params)
            if moved is not None:
                raise moved
            method = method.set_params(**params)
        return method
    if not isinstance(method, str):
        msg = f"method must be a method name or a BaseImputer, got {type(method).__name__}."
        raise TypeError(msg)
    cls = get_method(method)
    moved = moved_params_error(cls, params)  # a name that moved into a nested config
    if moved is not None:
        raise moved
    accepted = {
        k
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    unknown = set(params) - accepted
    if unknown:
        msg = (
            f"method {method!r} got unknown parameter(s) {sorted(unknown)}; "
            f"it accepts {sorted(accepted)}."
        )
        raise TypeError(msg)
    _check_param_types(cls, method, params)
    if "rng" in accepted:
        params.setdefault("rng", rng)
        _check_seed(params["rng"])
    est = cls(**params)
    check = getattr(est, "_check_params", None)
    if check is not None:  # ranges and combinations, before any data are read
        check()
    return est


#: seeds are stored in ``uns`` (HDF5 int64) and saved models: keep them in range
MAX_SEED = 2**63 - 1


def _check_seed(rng) -> None:
    if isinstance(rng, (bool, np.bool_)) or (
        isinstance(rng, (int, np.integer)) and not 0 <= rng <= MAX_SEED
    ):
        msg = f"rng must be None, a numpy Generator or an integer from 0 to 2**63 - 1, got {rng!r}."
        raise ValueError(msg)


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
           type(None): "null (None)"}


def _allowed(hint) -> list | None:
    """The simple alternatives of a type hint (types or Literal values); ``None``: not simple."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return [("literal", v) for v in typing.get_args(hint)]
    if origin in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(hint):
            sub = _allowed(arg)
            if sub is None:
                return None
            out += sub
        return out
    return [hint] if hint in _SIMPLE else None


def _matches(value, alt) -> bool:
    if isinstance(alt, tuple):  # ("literal", v)
        return not isinstance(value, bool) and value == alt[1] or value is alt[1]
    if alt is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if alt is int:
        return isinstance(value, (int, np.integer))
    if alt is float:
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, alt)


def _check_param_types(cls, method: str, params: dict) -> None:
    """Name the parameter whose value has the wrong type (e.g. ``k="abc"``), before any work.

    Only parameters annotated with simple types (int, float, bool, str, None, Literal and their
    unions) are checked; the estimator checks the rest itself.
    """
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: leave the checks to the class
        return
    for name, value in params.items():
        alts = _allowed(hints.get(name))
        if alts is None or any(_matches(value, a) for a in alts):
            continue
        want = " or ".join(repr(a[1]) if isinstance(a, tuple) else _SIMPLE[a] for a in alts)
        msg = f"method {method!r}: parameter {name!r} must be {want}, got {value!r}."
        raise TypeError(msg)


def _scatter(block, cells: np.ndarray, genes: np.ndarray, shape: tuple[int, int]):
    """Place the result for the non-empty cells/genes back into a full-size matrix of zeros."""
    if cells.all() and genes.all():
        return block
    if sp.issparse(block):
        block = block.tocoo()
        rows, cols = np.flatnonzero(cells), np.flatnonzero(genes)
        return sp.csr_matrix((block.data, (rows[block.row], cols[block.col])), shape=shape)
    out = np.zeros(shape, dtype=block.dtype)
    out[np.ix_(cells, genes)] = block
    return out


def _subset(x, rows: np.ndarray, cols: np.ndarray):
    """The counts of the cells ``rows`` and genes ``cols``, in the form ``get_counts`` returns
    (CSR with sorted indices, or a C-ordered ndarray)."""
    sub = x[rows][:, cols]
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub)
        sub.sort_indices()
        return sub
    return np.ascontiguousarray(sub)


def _as_layer(m):
    if m is None:
        return None
    if sp.issparse(m):
        return sp.csr_matrix(m, dtype=np.float32)
    return np.asarray(m, dtype=np.float32)


def impute(
    adata: AnnData,
    method: str | BaseImputer = "alra",
    *,
    layer: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
    overwrite: bool = False,
    rng: RNGLike = 0,
    **params,
) -> AnnData | None:
    """Impute / repair the counts of ``adata`` with one of screpair's methods.

    Parameters
    ----------
    adata
        Cells x genes. Raw counts in ``X`` or in ``layers[layer]``.
    method
        A registered method name (see :func:`screpair.available_methods`) or an estimator.
    layer
        Layer holding the raw counts; ``None`` uses ``X``.
    key_added
        Name of the output layer; defaults to the method name.
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Allow the output to replace existing ``layers`` / ``uns`` entries of the same name. Without
        it such a name is an error (raised before any work); the layer holding the input counts
        is never replaced.
    rng
        Seed or ``numpy.random.Generator`` for methods with randomness.
    **params
        Method parameters (see each estimator's docstring).

    Returns
    -------
    ``None``, or a copy when ``copy=True``. Writes

    - ``.layers[key_added | method]``: imputed counts on the count scale (float32);
    - ``.layers[f"{key}_var"]``: posterior variance, for methods that have one;
    - ``.layers["dropout_prob"]``: dropout probabilities, for methods that compute them;
    - ``.uns[key]``: ``{"method", "params", "layer", "version", "seconds", ...}``.

    Cells and genes with no counts are set aside (with a warning) and returned unchanged.
    ``X`` and every other slot are left untouched.
    """
    from .. import __version__

    if not isinstance(adata, AnnData):  # before building the estimator: the clearer error
        prepare_adata(adata, copy, "impute")
    est = make_estimator(method, rng=rng, **params)
    key = key_added or est.name
    outputs = [key]
    if est.has_var:
        outputs.append(f"{key}_var")
    if est.has_dropout_prob and getattr(est, "dropout_layer", None) != "dropout_prob":
        outputs.append("dropout_prob")
    check_output_keys(adata, outputs, layer=layer, overwrite=overwrite, uns=(key,))
    adata = prepare_adata(adata, copy, "impute")

    x = get_counts(adata, layer)
    cells, genes = nonempty(x)
    names = var_names(adata)
    rows, cols = np.flatnonzero(cells), np.flatnonzero(genes)
    if cells.all() and genes.all():
        sub_x = x
    else:
        sub_x = _subset(x, rows, cols)
    obs = adata.obs.iloc[rows].copy()
    var = adata.var.iloc[cols].copy()  # methods may read columns (gene_length)
    var.index = names[genes]
    read = {getattr(est, "dropout_layer", None)} & set(adata.layers)  # layers a method reads
    layers = {k: adata.layers[k] if cells.all() and genes.all() else adata.layers[k][rows][:, cols]
              for k in read}

    start = time.perf_counter()
    n_obs, n_vars = sub_x.shape
    with log_task(f"imputing {n_obs} cells x {n_vars} genes with {est.name!r}", logger):
        if est._is_template():  # hand over the validated counts: no second get_counts
            ctx = DataContext(var_names=var.index, obs=obs, var=var, layers=layers, n_obs=n_obs,
                              rows=slice(0, n_obs))
            post: Posterior = est._fit_validated(sub_x, ctx)._posterior_validated(sub_x, ctx)
        else:  # an estimator with its own public fit / posterior validates an AnnData itself
            sub = AnnData(X=sub_x, obs=obs, var=var, layers=layers)
            post = est.fit(sub).posterior(sub)
    seconds = time.perf_counter() - start

    shape = adata.shape
    late = [k for k, m in ((f"{key}_var", post.var), ("dropout_prob", post.dropout_prob))
            if m is not None and k not in outputs and k != getattr(est, "dropout_layer", None)]
    check_output_keys(adata, late, layer=layer, overwrite=overwrite)  # estimators without flags
    outputs += late
    adata.layers[key] = _as_layer(_scatter(post.mean, cells, genes, shape))
    if post.var is not None:
        adata.layers[f"{key}_var"] = _as_layer(_scatter(post.var, cells, genes, shape))
    if post.dropout_prob is not None and "dropout_prob" in outputs:
        adata.layers["dropout_prob"] = _as_layer(_scatter(post.dropout_prob, cells, genes, shape))
    adata.uns[key] = {
        "method": est.name,
        "params": jsonable(est.get_params(deep=False)),
        "layer": jsonable(layer),
        "version": __version__,
        "seconds": float(seconds),
        "n_cells_set_aside": int((~cells).sum()),
        "n_genes_set_aside": int((~genes).sum()),
    }
    return adata if copy else None
