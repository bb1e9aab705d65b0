"""Input validation and small shared helpers.

Every public entry point reads its counts through :func:`get_counts`, so the checks and their
messages live in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._norm import library_size  # noqa: F401 - defined with the other normalizers; re-exported

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


#: ``layer=`` value that reads ``adata.raw.X`` (when no layer of that name exists)
RAW_LAYER = "raw"
#: environment variable that turns off the "looks normalized" check (integers are still required)
TRUST_COUNTS_ENV = "SCREPAIR_TRUST_COUNTS"


def _layer_matrix(data: Data, layer: str | None):
    if isinstance(data, AnnData):
        if layer is None:
            if data.X is None:
                hint = _count_slots_hint(data)
                msg = f"adata.X is empty (None); pass the layer that holds the counts with `layer=`{hint}."
                raise ValueError(msg)
            return data.X
        if layer not in data.layers:
            if layer == RAW_LAYER and data.raw is not None:
                return _raw_matrix(data)
            avail = ", ".join(map(repr, data.layers.keys())) or "none"
            raw = "; 'raw' reads adata.raw.X" if data.raw is not None else ""
            msg = f"layer {layer!r} not found in adata.layers (available: {avail}{raw})."
            raise KeyError(msg)
        return data.layers[layer]
    if layer is not None:
        msg = "`layer=` can only be used with an AnnData input."
        raise TypeError(msg)
    return data


def _count_slots_hint(adata: AnnData) -> str:
    options = [repr(k) for k in adata.layers.keys()]
    if adata.raw is not None:
        options.append(f"{RAW_LAYER!r} (adata.raw.X)")
    return f" (available: {', '.join(options)})" if options else ""


def _raw_matrix(adata: AnnData):
    """``adata.raw.X`` when ``raw`` has exactly the genes of ``X`` (outputs must align with ``X``)."""
    raw = adata.raw
    if raw.n_vars != adata.n_vars or not np.array_equal(
        np.asarray(raw.var_names), np.asarray(adata.var_names)
    ):
        msg = (
            f"adata.raw holds {raw.n_vars} genes but X holds {adata.n_vars} (or in another order); "
            "output layers must align with X. Use the raw counts as the main matrix: "
            "`adata = adata.raw.to_adata()`."
        )
        raise ValueError(msg)
    return raw.X


def check_layer_name(key: str, what: str = "key_added") -> None:
    """Raise unless ``key`` can name an h5ad/zarr element (a non-empty string without ``/``)."""
    if not isinstance(key, str) or not key.strip():
        msg = f"{what} must be a non-empty string, got {key!r}."
        raise ValueError(msg)
    if "/" in key:
        msg = f"{what}={key!r} contains '/', which h5ad and zarr files do not allow in names."
        raise ValueError(msg)


def check_not_input_layer(key: str | None, layer: str | None, what: str = "key_added") -> None:
    """Raise if the output name ``key`` is the layer ``layer`` the counts are read from."""
    if layer is not None and key == layer:
        msg = (
            f"{what}={key!r} would overwrite the input counts in layers[{layer!r}]; "
            "choose another name."
        )
        raise ValueError(msg)


def check_output_keys(
    adata: AnnData,
    keys: list[str],
    *,
    layer: str | None,
    overwrite: bool,
    what: str = "key_added",
    uns: tuple[str, ...] = (),
    obs: tuple[str, ...] = (),
    obsm: tuple[str, ...] = (),
    hint: str | None = None,
) -> None:
    """Refuse output layer names that would replace the input counts or an existing entry.

    ``keys`` are the layers a function is about to write, ``uns`` / ``obs`` / ``obsm`` its
    entries there. With ``overwrite=True`` existing entries may be replaced, but never the layer
    the counts are read from. ``hint`` adds a way out to the message (e.g. reusing an entry).
    """
    for key in keys:
        check_layer_name(key, what)
        check_not_input_layer(key, layer, what)
    slots = (("layers", keys, adata.layers), ("uns", uns, adata.uns), ("obs", obs, adata.obs),
             ("obsm", obsm, adata.obsm))
    taken = [(slot, k) for slot, names, have in slots for k in names if k in have]
    if taken and not overwrite:
        slot, key = taken[0]
        extra = f", {hint}," if hint else ""
        msg = (
            f"{slot}[{key!r}] already exists and would be replaced; choose another {what}"
            f"{extra} or pass overwrite=True (CLI: --overwrite)."
        )
        raise ValueError(msg)


def _values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else np.asarray(x).ravel()


def get_counts(
    data: Data,
    layer: str | None = None,
    *,
    require_integer: bool = True,
    dtype: np.dtype | type = np.float64,
    warn_empty: bool = True,
    check_normalized: bool = True,
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
    check_normalized
        With ``require_integer``, also refuse integers that look like rounded normalized values
        (:func:`looks_normalized`); a caller that validates a matrix by blocks of rows turns it
        off per block and calls :func:`check_not_normalized` on the whole.

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
        _check_canonical(x, layer)
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
            "(e.g. `layer='counts'`, or `layer='raw'` for adata.raw.X; CLI: --layer)."
        )
        raise ValueError(msg)
    if not np.any(vals):
        msg = f"{where} is all zeros; there is nothing to impute."
        raise ValueError(msg)
    if require_integer and check_normalized:
        check_not_normalized(x, where)
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


def check_not_normalized(x, where: str = "the count matrix") -> None:
    """Refuse integer counts that look like rounded normalized values (:func:`looks_normalized`),
    unless the environment variable ``SCREPAIR_TRUST_COUNTS`` is set."""
    if os.environ.get(TRUST_COUNTS_ENV, "") not in ("", "0"):
        return
    reason = looks_normalized(x)
    if reason is not None:
        msg = (
            f"{where} holds integers but does not look like raw counts: {reason}. The data "
            "look normalized and rounded: pass the raw counts (e.g. `layer='counts'` or "
            f"`layer='raw'`). If these are raw counts, set {TRUST_COUNTS_ENV}=1 "
            "(CLI: --trust-counts) to skip this check."
        )
        raise ValueError(msg)


def _check_canonical(x: sp.csr_matrix, layer: str | None) -> None:
    """Refuse duplicate entries (damaged files); sort unsorted indices in place (a copy)."""
    if x.has_canonical_format:
        return
    summed = x.copy()
    summed.sum_duplicates()
    dup = x.nnz - summed.nnz
    if dup:
        where = f"layer {layer!r}" if layer is not None else "the count matrix"
        msg = (
            f"{where} stores {dup} entr{'y' if dup == 1 else 'ies'} twice (the same cell and gene), "
            "which a valid sparse matrix does not; the file may be damaged. If summing the "
            "duplicates is right, call `X.sum_duplicates()` first."
        )
        raise ValueError(msg)
    x.sort_indices()


#: cells needed before the "looks normalized" signatures are judged
_MIN_CELLS_SIGNATURE = 20


def looks_normalized(x) -> str | None:
    """A reason why integer data look like rounded normalized values, or ``None``.

    Signatures (judged from 20 cells on; raw counts of every dataset in ``../shared/data``, the
    demo data and Splat simulations pass with a wide margin):

    - near-constant library sizes, the mark of counts scaled to a fixed total and rounded: a
      coefficient of variation below 0.01, or below 0.05 with the median within 5% of a power of
      ten from 1,000 on (CP10k, CPM), or a variance below a quarter of the mean (raw counts vary at
      least as much as Poisson counts, whose variance equals the mean); raw data: 0.19-2.5.
      Poisson noise alone gives ``1 / sqrt(library size)``, so simulations without size factors
      can come close;
    - in at least half of the cells the smallest non-zero value is above 1 (raw data: at most
      0.5% of cells), as when a single molecule becomes 2 or more after scaling;
    - in at least 10% of the cells where it can be judged a small count is skipped although its
      neighbours are common (:func:`_skipped_count_fraction`; raw data: at most 0.6%, counts
      scaled to the median library size and rounded, as by scanpy's ``normalize_total``: 29-46%);
    - every value at most 10 although cells detect 100 genes on average, as for rounded
      log-transformed data.
    """
    n_cells = x.shape[0]
    if n_cells < _MIN_CELLS_SIGNATURE:
        return None
    lib = library_size(x)
    lib = lib[lib > 0]
    if lib.size >= _MIN_CELLS_SIGNATURE:
        cv, median = float(lib.std() / lib.mean()), float(np.median(lib))
        decade = 10 ** np.round(np.log10(median)) if median > 0 else 0.0
        at_target = decade >= 1e3 and abs(median / decade - 1) < 0.05
        sub_poisson = float(lib.var()) < 0.25 * float(lib.mean())
        if cv < 0.01 or (cv < 0.05 and at_target) or sub_poisson:
            return (
                f"library sizes are nearly constant (median {median:.0f}, coefficient of "
                f"variation {cv:.3f}; raw counts vary far more)"
            )
    x = sp.csr_matrix(x)  # a copy only for dense input, which is small
    has = np.diff(x.indptr) > 0
    data = x.data  # explicit zeros are not the smallest count (a copy only if there are any)
    if x.nnz and data.min() <= 0:
        data = np.where(data > 0, data, np.inf)
    mins = np.minimum.reduceat(data, x.indptr[:-1][has]) if has.any() else np.array([])
    nnz = x.nnz
    vmax = float(x.data.max()) if nnz else 0.0
    if mins.size >= _MIN_CELLS_SIGNATURE and nnz / n_cells >= 100:
        frac = float(np.mean(mins > 1))
        if frac >= 0.5:
            return (
                f"in {frac:.0%} of cells the smallest non-zero value is above 1 (raw counts have "
                "counts of 1 in nearly every cell)"
            )
    if vmax <= 10 and nnz / n_cells >= 100:
        return (
            f"no value exceeds {vmax:g} although cells detect {nnz / n_cells:.0f} genes on "
            "average (raw counts reach higher values; log-transformed data do not)"
        )
    skipped = _skipped_count_fraction(x)
    if skipped is not None and skipped >= 0.1:
        return (
            f"in {skipped:.0%} of cells a small count is skipped (e.g. many 1s and 3s but no 2s; "
            "raw counts skip none), as when counts are scaled to the median library size and "
            "rounded"
        )
    return None


#: cells :func:`_skipped_count_fraction` looks at (evenly spaced, so the check stays cheap)
_SKIPPED_SAMPLE = 10_000


def _skipped_count_fraction(x: sp.csr_matrix, top: int = 6, need: int = 20) -> float | None:
    """Among the cells where it can be judged, the fraction in which a count ``v`` in
    2..``top`` never occurs although ``v - 1`` and ``v + 1`` occur at least ``need`` times
    together and ``need / 4`` times each (``None`` below 20 such cells).

    A cell's counts of 1, 2, 3, ... come from many genes, so how often each value occurs
    varies smoothly with the value: with ~10 or more neighbours expected, missing a value is
    a chance of about e^-10. Counts multiplied by a factor ``s`` between 1 and 2 and rounded
    hit only ``round(k s)``: at ``s`` = 1.3 a raw 1 stays 1 and a raw 2 becomes 3, so the
    cell has no 2s. Measured on the raw data of ``../shared/data``, the demo data and Splat:
    at most 0.6% of cells (kidney); scaled to the median library size and rounded: 29-46%
    (worm neurons, too shallow to judge: 5%). Judged on at most 10,000 evenly spaced cells."""
    if x.shape[0] > _SKIPPED_SAMPLE:
        x = x[np.linspace(0, x.shape[0] - 1, _SKIPPED_SAMPLE).astype(np.int64)]
    width = top + 2  # columns: the values 0..top + 1
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    small = (x.data >= 1) & (x.data <= top + 1)
    seen = np.bincount(rows[small] * width + x.data[small].astype(np.int64),
                       minlength=x.shape[0] * width).reshape(-1, width)
    below, above = seen[:, 1:top], seen[:, 3:top + 2]  # neighbours of the values 2..top
    judged = (below + above >= need) & (np.minimum(below, above) >= need // 4)
    skipped = (judged & (seen[:, 2:top + 1] == 0)).any(axis=1)
    n_judged = int(judged.any(axis=1).sum())
    return float(skipped.sum() / n_judged) if n_judged >= _MIN_CELLS_SIGNATURE else None


def _row_nnz(x) -> np.ndarray:
    return np.diff(x.indptr) if sp.isspmatrix_csr(x) else (np.asarray(x) != 0).sum(1)


def _col_nnz(x) -> np.ndarray:
    if sp.issparse(x):  # by pieces: bincount converts the int32 indices to int64
        out = np.zeros(x.shape[1], dtype=np.int64)
        for i in range(0, x.nnz, NNZ_PIECE):
            out += np.bincount(x.indices[i:i + NNZ_PIECE], minlength=x.shape[1])
        return out
    return (np.asarray(x) != 0).sum(0)


#: stored entries handled at a time by passes over all of a matrix's entries (their 64-bit
#: temporaries bounded by the piece, not the matrix): ``_col_nnz``, ``methods._api._drop_empty``
NNZ_PIECE = 2**22


def check_sample_size(name: str, value) -> None:
    """Refuse a sample-size parameter (``n_fit_cells``, ``n_train_cells``, ``n_dropout_cells``)
    that is neither ``None`` nor an integer >= 10 (booleans refused)."""
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, (int, np.integer)) or value < 10):
        msg = f"{name} must be None or an integer >= 10, got {value!r}."
        raise ValueError(msg)


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
    compare_var_names(expected, got, data.shape[1])


def compare_var_names(expected: pd.Index, got: pd.Index | None, n_genes: int) -> None:
    """Raise if the genes ``got`` (``None`` for a bare matrix: only their number, ``n_genes``, is
    known) differ from the genes ``expected`` by a fitted model."""
    if got is None:
        if n_genes != len(expected):
            msg = f"data have {n_genes} genes but the model was fitted on {len(expected)}."
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


def to_dense(x) -> np.ndarray:
    """Dense ndarray view/copy of a matrix (sparse or dense)."""
    return x.toarray() if sp.issparse(x) else np.asarray(x)


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


_GUARDED = (signal.SIGINT, signal.SIGTERM)


def _raise_for(signum: int, frame, previous) -> None:
    """Act on ``signum`` as the handler before ours would (default: interrupt / exit)."""
    if callable(previous):
        previous(signum, frame)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def interrupt_guard() -> Iterator[list[int]]:
    """Record SIGINT / SIGTERM during a write; raise for them (as their handlers would) after it.

    An exception raised by a signal handler at an arbitrary point of a write is easily lost:
    inside a garbage-collection callback Python prints "Exception ignored" and carries on, and
    the write then finishes as if nothing happened (seen with anndata's ``write_h5ad``). So the
    first signal is only recorded and the caller discards the finished temporary file; a second
    signal raises at once. Outside the main thread signals cannot be
    handled: no guard.
    """
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous = {s: signal.getsignal(s) for s in _GUARDED}

    def handler(signum, frame):
        got.append(signum)
        if len(got) > 1:  # asked twice: stop now
            _raise_for(signum, frame, previous[signum])

    for s in _GUARDED:
        signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if got:
        _raise_for(got[0], None, previous[got[0]])
