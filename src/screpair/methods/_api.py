"""The single AnnData-writing wrapper around every imputation method."""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._logging import get_logger, log_task
from .._utils import RNGLike, get_counts, nonempty, prepare_adata, var_names
from ._base import BaseImputer, Posterior
from ._registry import get_method

logger = get_logger(__name__)


def make_estimator(method: str | BaseImputer, *, rng: RNGLike = 0, **params) -> BaseImputer:
    """Build the estimator for ``method`` (a registered name or an estimator instance)."""
    if isinstance(method, BaseImputer):
        if params:
            method = method.set_params(**params)
        return method
    if not isinstance(method, str):
        msg = f"method must be a method name or a BaseImputer, got {type(method).__name__}."
        raise TypeError(msg)
    cls = get_method(method)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(params) - accepted
    if unknown:
        msg = (
            f"method {method!r} got unknown parameter(s) {sorted(unknown)}; "
            f"it accepts {sorted(accepted)}."
        )
        raise TypeError(msg)
    if "rng" in accepted:
        params.setdefault("rng", rng)
    return cls(**params)


def jsonable(value: Any) -> Any:
    """Turn parameters into values h5ad/JSON can store (no None, no objects)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        vals = [jsonable(v) for v in value]
        return vals if all(isinstance(v, (int, float, str, bool)) for v in vals) else str(vals)
    if isinstance(value, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return value
    if value is None:
        return "None"
    return repr(value)


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
    adata = prepare_adata(adata, copy, "impute")
    key = key_added or est.name

    x = get_counts(adata, layer)
    cells, genes = nonempty(x)
    names = var_names(adata)
    if cells.all() and genes.all():
        sub_x = x
    else:
        sub_x = x[np.flatnonzero(cells)][:, np.flatnonzero(genes)]
    obs = adata.obs.iloc[np.flatnonzero(cells)].copy()
    var = adata.var.iloc[np.flatnonzero(genes)].copy()  # methods may read columns (gene_length)
    var.index = names[genes]
    rows, cols = np.flatnonzero(cells), np.flatnonzero(genes)
    layers = {  # other layers travel along (e.g. a precomputed dropout_prob), read-only
        k: v if cells.all() and genes.all() else v[rows][:, cols] for k, v in adata.layers.items()
    }
    sub = AnnData(X=sub_x, obs=obs, var=var, layers=layers)

    start = time.perf_counter()
    with log_task(f"imputing {sub.n_obs} cells x {sub.n_vars} genes with {est.name!r}", logger):
        post: Posterior = est.fit(sub).posterior(sub)
    seconds = time.perf_counter() - start

    shape = adata.shape
    adata.layers[key] = _as_layer(_scatter(post.mean, cells, genes, shape))
    if post.var is not None:
        adata.layers[f"{key}_var"] = _as_layer(_scatter(post.var, cells, genes, shape))
    if post.dropout_prob is not None:
        adata.layers["dropout_prob"] = _as_layer(_scatter(post.dropout_prob, cells, genes, shape))
    for name, m in post.extra.items():
        adata.layers[f"{key}_{name}"] = _as_layer(_scatter(m, cells, genes, shape))
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
