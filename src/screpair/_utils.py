"""Input validation and small shared helpers.

Every public entry point reads its counts through :func:`get_counts`, so the checks and their
messages live in one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

RNGLike = int | np.random.Generator | None
ArrayLike = np.ndarray | sp.spmatrix | sp.sparray
Data = AnnData | np.ndarray | sp.spmatrix | sp.sparray


def as_rng(rng: RNGLike) -> np.random.Generator:
    """``np.random.default_rng`` that passes an existing Generator through."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def torch_seed(rng: np.random.Generator) -> int:
    """Draw a seed for ``torch.Generator.manual_seed`` from a numpy Generator."""
    return int(rng.integers(2**62))


def prepare_adata(adata: AnnData, copy: bool, fn: str) -> AnnData:
    """The AnnData a public ``fn(adata, *, copy)`` writes into: a copy, or ``adata`` itself.

    Raises for non-AnnData input and for views written in place (anndata would silently turn the
    view into a copy, so the caller would never see the result).
    """
    if not isinstance(adata, AnnData):
        msg = f"{fn} expects an AnnData, got {type(adata).__name__}; wrap arrays with AnnData(X)."
        raise TypeError(msg)
    if copy:
        return adata.copy()
    if adata.is_view:
        msg = "adata is a view; pass `copy=True` or call `adata = adata.copy()` first."
        raise ValueError(msg)
    return adata


def _layer_matrix(data: Data, layer: str | None):
    if isinstance(data, AnnData):
        if layer is None:
            if data.X is None:
                msg = "adata.X is empty (None); pass the layer that holds the counts with `layer=`."
                raise ValueError(msg)
            return data.X
        if layer not in data.layers:
            avail = ", ".join(map(repr, data.layers.keys())) or "none"
            msg = f"layer {layer!r} not found in adata.layers (available: {avail})."
            raise KeyError(msg)
        return data.layers[layer]
    if layer is not None:
        msg = "`layer=` can only be used with an AnnData input."
        raise TypeError(msg)
    return data


def _values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else np.asarray(x).ravel()


def get_counts(
    data: Data,
    layer: str | None = None,
    *,
    require_integer: bool = True,
    dtype: np.dtype | type = np.float64,
    warn_empty: bool = True,
) -> sp.csr_matrix | np.ndarray:
    """Validate and return the raw count matrix (cells x genes).

    Parameters
    ----------
    data
        AnnData (counts in ``X`` or ``layers[layer]``), a numpy array or a scipy sparse matrix.
    layer
        Layer holding the counts; ``None`` reads ``X``.
    require_integer
        Reject non-integer values (normalized or log-transformed data).
    dtype
        Floating dtype of the returned copy.
    warn_empty
        Warn about cells and genes with no counts.

    Returns
    -------
    A copy of the counts: ``scipy.sparse.csr_matrix`` for sparse input, else a C-ordered ndarray.
    The caller's data are never modified.

    Raises
    ------
    ValueError
        For empty, non-finite, negative, non-integer (when required) or all-zero input.
    """
    x = _layer_matrix(data, layer)
    if hasattr(x, "to_memory"):  # anndata backed / lazy arrays
        x = x.to_memory()
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=dtype, copy=True)
        x.sum_duplicates()
    else:
        try:
            x = np.array(x, dtype=dtype, order="C", copy=True)
        except (TypeError, ValueError) as e:
            msg = f"counts must be numeric; could not convert to numbers ({e})."
            raise ValueError(msg) from None
    where = f"layer {layer!r}" if layer is not None else "the count matrix"
    if x.ndim != 2:
        msg = f"{where} must be 2-D (cells x genes), got shape {x.shape}."
        raise ValueError(msg)
    if x.shape[0] == 0 or x.shape[1] == 0:
        msg = f"{where} is empty (shape {x.shape[0]} cells x {x.shape[1]} genes)."
        raise ValueError(msg)
    vals = _values(x)
    if not np.all(np.isfinite(vals)):
        n_bad = int(np.size(vals) - np.isfinite(vals).sum())
        msg = f"{where} contains {n_bad} NaN or infinite value(s); raw counts must be finite."
        raise ValueError(msg)
    if vals.size and vals.min() < 0:
        msg = (
            f"{where} contains negative values (min {vals.min():.3g}); raw counts are required. "
            "The data look scaled or centred: pass the raw counts (e.g. `layer='counts'`)."
        )
        raise ValueError(msg)
    if require_integer and vals.size and not np.all(vals == np.round(vals)):
        frac = float(np.mean(vals != np.round(vals)))
        msg = (
            f"{where} contains non-integer values ({frac:.0%} of non-zeros); raw counts are required. "
            "The data look normalized or log-transformed: pass the raw counts "
            "(e.g. `layer='counts'` or `adata.raw`)."
        )
        raise ValueError(msg)
    if not np.any(vals):
        msg = f"{where} is all zeros; there is nothing to impute."
        raise ValueError(msg)
    if warn_empty:
        n_cells = int((np.asarray(_row_nnz(x)) == 0).sum())
        n_genes = int((np.asarray(_col_nnz(x)) == 0).sum())
        if n_cells or n_genes:
            warnings.warn(
                f"{n_cells} cell(s) and {n_genes} gene(s) have no counts; they are set aside and "
                "returned unchanged.",
                UserWarning,
                stacklevel=2,
            )
    return x


def _row_nnz(x) -> np.ndarray:
    return np.diff(x.indptr) if sp.isspmatrix_csr(x) else (np.asarray(x) != 0).sum(1)


def _col_nnz(x) -> np.ndarray:
    if sp.issparse(x):
        return np.bincount(x.indices, minlength=x.shape[1]) if x.nnz else np.zeros(x.shape[1], int)
    return (np.asarray(x) != 0).sum(0)


def nonempty(x) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of cells (rows) and genes (columns) that have at least one count."""
    return np.asarray(_row_nnz(x)).ravel() > 0, np.asarray(_col_nnz(x)).ravel() > 0


def var_names(data: Data) -> pd.Index:
    """Gene names of ``data`` (``gene_0 …`` for bare matrices), made unique with a warning."""
    if isinstance(data, AnnData):
        names = pd.Index(data.var_names.astype(str))
    else:
        names = pd.Index([f"gene_{i}" for i in range(data.shape[1])])
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()
        warnings.warn(
            f"{len(dup)} duplicate gene name(s) (e.g. {dup[0]!r}) were made unique by appending "
            "'-1', '-2', …",
            UserWarning,
            stacklevel=2,
        )
        names = pd.Index(_make_unique(list(names)))
    return names


def _make_unique(names: list[str]) -> list[str]:
    from anndata.utils import make_index_unique

    return list(make_index_unique(pd.Index(names)))


def check_var_names(expected: pd.Index, data: Data) -> None:
    """Raise if ``data``'s genes differ from the genes a model was fitted on."""
    got = var_names(data) if isinstance(data, AnnData) else None
    if got is None:
        if data.shape[1] != len(expected):
            msg = f"data have {data.shape[1]} genes but the model was fitted on {len(expected)}."
            raise ValueError(msg)
        return
    if len(got) != len(expected) or not np.array_equal(got.values, np.asarray(expected)):
        missing = pd.Index(expected).difference(got)
        extra = got.difference(pd.Index(expected))
        msg = (
            f"genes differ from those the model was fitted on ({len(expected)} genes): "
            f"{len(missing)} missing (e.g. {list(missing[:3])}), {len(extra)} unexpected "
            f"(e.g. {list(extra[:3])}). Subset and order the data as `adata[:, model.var_names_]`."
        )
        if not len(missing) and not len(extra):
            msg = "genes are the same as the model's but in a different order; use `adata[:, model.var_names_]`."
        raise ValueError(msg)


def library_size(x) -> np.ndarray:
    """Total counts per cell (row sums) as a 1-D float array."""
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def iter_row_batches(x, batch_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, dense_block)`` over rows, densifying one batch at a time."""
    n = x.shape[0]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        block = x[start:stop]
        yield start, stop, (block.toarray() if sp.issparse(block) else np.asarray(block))


def to_dense(x) -> np.ndarray:
    """Dense ndarray view/copy of a matrix (sparse or dense)."""
    return x.toarray() if sp.issparse(x) else np.asarray(x)
