"""Count normalization in one place: library sizes, size factors, scaling to a target sum, log
transforms and the way back to counts, for dense and sparse (CSR) matrices alike.

The scales screpair uses:

- :data:`CP10K` (``1e4``): counts per 10,000, ``log1p(CP10k)``, the scale of the imputation
  methods (ALRA, kNN, the pair pipeline of diffusion/DAE/VAE, degradation) and of the Open
  Problems metrics;
- :data:`CPM` (``1e6``): counts per million, ``log1p(CPM)``, the scale of the masked-entry
  metrics and of the MAGIC and gene-mean peers.

Every function here works on a matrix whose counts are already validated
(:func:`screpair._utils.get_counts`); none of them checks the values or modifies its input. A
cell with no counts (library size 0) stays all zero: its scale factor is 0.

The arithmetic is fixed, so that every caller gets the same bits: a cell's factor is
``target_sum / L`` and its values are ``x * factor``; the inverse is ``v * (L / target_sum)``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: counts per 10,000 (``log1p(CP10k)``)
CP10K = 1e4
#: counts per million (``log1p(CPM)``)
CPM = 1e6


#: rows summed at a time by :func:`library_size` for sparse counts held in a narrow type
_SUM_ROWS = 16_384


def library_size(x) -> np.ndarray:
    """Total counts per cell (row sums) as a 1-D float64 array.

    Sparse counts held in a narrow type (uint16 / float32, ``read_all(compact=True)``) are
    summed as float64 by blocks of rows: a sum over the whole matrix would convert all its
    values to 64 bits at once; the sums are those of the float64 matrix, bit for bit."""
    if sp.issparse(x) and x.dtype != np.float64 and x.shape[0] > _SUM_ROWS:
        return np.concatenate([library_size(x[i:i + _SUM_ROWS].astype(np.float64))
                               for i in range(0, x.shape[0], _SUM_ROWS)])
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def size_factors(lib: np.ndarray) -> np.ndarray:
    """Size factors ``L / mean(L)`` from library sizes ``lib`` (SAVER's definition; the mean
    includes cells without counts, whose factor is 0)."""
    lib = np.asarray(lib, dtype=np.float64)
    return lib / lib.mean()


def scale_factors(lib: np.ndarray, target_sum: float | None = CP10K) -> np.ndarray:
    """Per-cell factors ``target_sum / L`` that scale each cell to ``target_sum`` counts (0 for
    ``L == 0``); ``target_sum=None`` uses the median of the positive library sizes."""
    lib = np.asarray(lib, dtype=np.float64)
    target = float(np.median(lib[lib > 0])) if target_sum is None else float(target_sum)
    with np.errstate(divide="ignore"):
        return np.where(lib > 0, target / np.where(lib > 0, lib, 1.0), 0.0)


def scale_rows(x, factors: np.ndarray):
    """``x`` with each row multiplied by ``factors`` (float64; sparse stays CSR, a copy)."""
    factors = np.asarray(factors, dtype=np.float64)
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float64, copy=True)
        x.data *= np.repeat(factors, np.diff(x.indptr))
        return x
    return np.asarray(x, dtype=np.float64) * factors[:, None]


def normalize(x, target_sum: float | None = CP10K, lib: np.ndarray | None = None):
    """Scale each cell (row) of ``x`` to ``target_sum`` total counts (``None``: the median
    library size).

    ``lib`` gives the library sizes to scale by (default: the row sums of ``x``), e.g. those of
    all genes when ``x`` holds some of them. Cells with ``L == 0`` stay zero. Float64; sparse
    input stays CSR.
    """
    lib = library_size(x) if lib is None else np.asarray(lib, dtype=np.float64)
    return scale_rows(x, scale_factors(lib, target_sum))


def _log1p(v: np.ndarray, base: float | None) -> np.ndarray:
    out = np.log1p(v)
    if base is not None:
        out /= np.log(base)  # in place: the result keeps the dtype of ``v``
    return out


def log1p(x, base: float | None = None, *, dtype: np.dtype | type = np.float64):
    """``log(1 + x)``: natural (``base=None``), or in ``base`` (2 for ``log2(x + 1)``, 10 for
    ``log10(x + 1)``), computed as ``log1p(x) / log(base)``. ``x`` is cast to ``dtype`` (float64;
    e.g. ``np.float32`` for a network's input) and the log computed in it; sparse stays CSR."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=dtype, copy=True)
        x.data = _log1p(x.data, base)
        return x
    return _log1p(np.asarray(x, dtype=dtype), base)


def log_normalize(
    x,
    target_sum: float | None = CP10K,
    lib: np.ndarray | None = None,
    base: float | None = None,
    *,
    dtype: np.dtype | type = np.float64,
):
    """``log1p(x / L * target_sum)`` per cell (:func:`normalize`, then :func:`log1p`), e.g.
    ``log1p(CP10k)`` by default, ``log1p(CPM)`` with ``target_sum=CPM``, ``log2(CPM + 1)`` with
    ``base=2``. The scaling is computed in float64, then cast to ``dtype`` (default float64), in
    which the log is taken; sparse stays CSR."""
    return log1p(normalize(x, target_sum, lib), base, dtype=dtype)


def unnormalize(x, lib: np.ndarray, target_sum: float = CP10K) -> np.ndarray:
    """Normalized values back on the count scale of library sizes ``lib``:
    ``x * (L / target_sum)`` per cell (dense)."""
    lib = np.asarray(lib, dtype=np.float64)
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return x * (lib / target_sum)[:, None]


def to_counts(log_values, lib: np.ndarray, target_sum: float = CP10K) -> np.ndarray:
    """The inverse of :func:`log_normalize` (natural log) at library sizes ``lib``:
    ``max(expm1(v), 0) * (L / target_sum)`` per cell (dense)."""
    v = log_values.toarray() if sp.issparse(log_values) else np.asarray(log_values)
    return unnormalize(np.maximum(np.expm1(v), 0.0), lib, target_sum)
