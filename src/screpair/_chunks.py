"""Row blocks of a count matrix that may stay on disk, and streaming passes over them.

:func:`open_rows` wraps an in-memory matrix, an AnnData's ``X`` or layer (in memory or backed),
an ``.h5ad`` file or a ``.zarr`` AnnData store in a :class:`RowSource`, whose
:meth:`RowSource.blocks` yields validated CSR blocks of consecutive cells (each checked by
:func:`screpair._utils.get_counts`: finite, non-negative integers, no duplicate entries). Files
are opened read-only and only the rows of the block being read are in memory: sparse rows come
from :func:`anndata.io.sparse_dataset` row slices, dense rows from the dataset itself.

:func:`gene_stats` is the streaming pass over all cells: library sizes, per-gene count sums,
detection counts and the moments of the library-normalized (CP10k) values that
:func:`screpair.pp.hvg_dispersion` uses, accumulated in the row order of the whole matrix, so the
result is the same, bit for bit, as the in-memory computation on CSR counts.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._logging import get_logger
from ._norm import CP10K, library_size, normalize
from ._utils import RAW_LAYER, _layer_matrix, check_not_normalized, get_counts

logger = get_logger(__name__)

#: cells per block when nothing else is said (about 0.5 GB of float64 CSR at 5% density and
#: 20,000 genes; dense float32 output blocks of 20,000 genes: 0.8 GB); a multiple of
#: :data:`ROW_MULTIPLE`
DEFAULT_CHUNK_ROWS = 10_240
#: default block sizes are multiples of this many cells: the prediction batch of the neural
#: pair methods (dae, vae, diffusion), which compute a batch that a block splits whole
ROW_MULTIPLE = 256


def store_format(path: str | os.PathLike[str]) -> str | None:
    """``"h5ad"`` or ``"zarr"`` for an AnnData store path (by its name), else ``None``."""
    name = Path(path).name.lower().rstrip("/")
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".zarr"):
        return "zarr"
    return None


@dataclass
class RowSource:
    """The count matrix of a data set, read by blocks of rows (cells).

    Attributes
    ----------
    matrix
        The stored matrix: CSR / ndarray in memory, an anndata sparse dataset or an h5py / zarr
        dense array on disk.
    obs, var
        Cell and gene annotations (in memory).
    layer
        The layer the counts come from (``None``: ``X``).
    path
        The file, for a source opened from a path.
    validated
        ``matrix`` holds counts already validated by :func:`get_counts` (blocks are sliced, not
        checked again).
    """

    matrix: Any
    obs: pd.DataFrame
    var: pd.DataFrame
    layer: str | None = None
    path: Path | None = None
    validated: bool = False
    _handle: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.matrix.shape[0]), int(self.matrix.shape[1])

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.var.index.astype(str))

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.matrix) or hasattr(self.matrix, "format")

    def nbytes_sparse(self, *, compact: bool = False) -> int:
        """Bytes of the whole matrix as validated float64 CSR (values, int32/64 indices;
        ``compact``: uint16 values, see :func:`read_all`)."""
        nnz = self.nnz()
        return int(nnz * ((2 if compact else 8) + 4) + 8 * (self.n_obs + 1))

    def nnz(self) -> int:
        """Stored entries (every entry of a dense matrix)."""
        m = self.matrix
        if sp.issparse(m):
            return int(m.nnz)
        group = getattr(m, "group", None)
        if group is not None:  # anndata sparse dataset
            return int(group["data"].shape[0])
        return int(self.n_obs * self.n_vars)  # dense: every entry

    def read(self, start: int, stop: int):
        """Rows ``start:stop`` as stored (CSR or ndarray), not validated."""
        block = self.matrix[start:stop]
        if sp.issparse(block):
            return sp.csr_matrix(block)
        return np.asarray(block)

    def blocks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, *, progress: bool = False,
               desc: str = "reading") -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """``(start, stop, counts)`` for consecutive blocks of ``chunk_rows`` cells: validated
        float64 CSR with sorted indices (see :func:`check_block`)."""
        check_chunk_rows(chunk_rows)
        starts = range(0, self.n_obs, chunk_rows)
        bar = progress_bar(self.n_obs, desc, progress and len(starts) > 1)
        try:
            for start in starts:
                stop = min(start + chunk_rows, self.n_obs)
                block = self.read(start, stop)
                yield start, stop, (sp.csr_matrix(block, dtype=np.float64) if self.validated
                                    else check_block(block, self.layer))
                bar.update(stop - start)
        finally:
            bar.close()

    def close(self) -> None:
        """Close the file of a source opened from a path (nothing for other sources)."""
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = None

    def __enter__(self) -> RowSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_chunk_rows(chunk_rows) -> int:
    """Raise unless ``chunk_rows`` is a positive integer."""
    integer = isinstance(chunk_rows, (int, np.integer)) and not isinstance(chunk_rows, bool)
    if not integer or chunk_rows < 1:
        msg = f"chunk_rows must be a positive integer, got {chunk_rows!r}."
        raise ValueError(msg)
    return int(chunk_rows)


def check_block(block, layer: str | None = None) -> sp.csr_matrix:
    """A block of rows validated as :func:`get_counts` validates a whole matrix (finite,
    non-negative integers, no duplicate entries), as float64 CSR with sorted indices. A block
    without any count (e.g. a run of empty cells) is valid: only the whole matrix must hold
    counts. Whether integers look like rounded normalized values is judged on the whole matrix
    (:func:`read_all`), not per block."""
    if sp.issparse(block):
        empty = block.nnz == 0 or not np.any(block.data)
    else:
        block = np.asarray(block)
        empty = block.size > 0 and np.isfinite(block).all() and not np.any(block)
    if empty and block.ndim == 2:
        return sp.csr_matrix(block.shape, dtype=np.float64)
    try:
        x = get_counts(block, warn_empty=False, check_normalized=False)
    except ValueError as e:
        if layer is not None:  # get_counts saw a bare block: name the layer
            msg = str(e).replace("the count matrix", f"layer {layer!r}", 1)
            raise ValueError(msg) from None
        raise
    if not sp.issparse(x):
        x = sp.csr_matrix(x)
    x.sort_indices()
    return x


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` cells (cells/s in the bar)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cells", unit_scale=True, disable=not enabled,
                leave=False)


# ------------------------------------------------------------------------------- opening


def open_rows(data, layer: str | None = None, *, validated: bool = False) -> RowSource:
    """A :class:`RowSource` over the counts of ``data``.

    Parameters
    ----------
    data
        A path to an ``.h5ad`` file or a ``.zarr`` AnnData store (opened read-only; close the
        source, or use it as a context manager), an AnnData (in memory or backed: ``X`` stays on
        disk) or a matrix.
    layer
        The layer holding the counts (``None``: ``X``; ``"raw"``: ``raw/X`` when no layer has that
        name). For a file, the layer is read by rows from disk, unlike anndata's backed mode,
        which reads every layer into memory.
    validated
        A matrix already validated by :func:`get_counts` (its blocks are not checked again).
    """
    if isinstance(data, (str, os.PathLike)):
        return _open_path(Path(data).expanduser(), layer)
    if isinstance(data, AnnData):
        m = _layer_matrix(data, layer)
        return RowSource(matrix=m, obs=data.obs, var=data.var, layer=layer)
    if layer is not None:
        msg = "`layer=` can only be used with an AnnData input or a file."
        raise TypeError(msg)
    m = data if sp.issparse(data) else np.asarray(data)
    if m.ndim != 2:
        msg = f"the count matrix must be 2-D (cells x genes), got shape {m.shape}."
        raise ValueError(msg)
    n, g = m.shape
    return RowSource(matrix=m, obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)),
                     var=pd.DataFrame(index=pd.Index([f"gene_{i}" for i in range(g)])),
                     validated=validated)


def open_store(path: Path, mode: str = "r"):
    """The root group of an ``.h5ad`` file (h5py) or a ``.zarr`` store (zarr), read-only."""
    fmt = store_format(path)
    if not path.exists():
        msg = f"no such file or directory: '{path}'"
        raise FileNotFoundError(msg)
    try:
        if fmt == "h5ad":
            import h5py

            return h5py.File(path, mode)
        if fmt == "zarr":
            import zarr

            return zarr.open_group(str(path), mode=mode)
    except (OSError, ValueError, KeyError) as e:
        msg = f"could not open '{path}' as {fmt} ({' '.join(str(e).split())})."
        raise ValueError(msg) from None
    msg = f"'{path}' is not an .h5ad file or a .zarr store; read it with screpair.read first."
    raise ValueError(msg)


def _open_path(path: Path, layer: str | None) -> RowSource:
    from anndata.io import read_elem

    root = open_store(path)
    try:
        key = _element_key(root, layer, path)
        obs = read_elem(root["obs"]) if "obs" in root else None
        var = read_elem(root["var"]) if "var" in root else None
        if key == "raw/X" and "raw/var" in root:
            raw_var = read_elem(root["raw/var"])
            if var is not None and not raw_var.index.equals(var.index):
                msg = (f"'{path}': raw holds {len(raw_var)} genes but X holds {len(var)} (or in "
                       "another order); output layers must align with X.")
                raise ValueError(msg)
        matrix = _matrix_element(root[key], key, path)
        n, g = matrix.shape
        obs = obs if obs is not None else pd.DataFrame(index=pd.RangeIndex(n).astype(str))
        var = var if var is not None else pd.DataFrame(index=[f"gene_{i}" for i in range(g)])
        if (len(obs), len(var)) != (n, g):
            msg = f"'{path}': {key} is {n} x {g} but obs/var describe {len(obs)} x {len(var)}."
            raise ValueError(msg)
    except BaseException:
        with contextlib.suppress(Exception):
            root.close()
        raise
    return RowSource(matrix=matrix, obs=obs, var=var, layer=layer, path=path, _handle=root)


def _element_key(root, layer: str | None, path: Path) -> str:
    if layer is None:
        if "X" not in root:
            layers = list(root["layers"].keys()) if "layers" in root else []
            hint = f" (available layers: {', '.join(map(repr, layers))})" if layers else ""
            msg = f"'{path}' has no X; pass the layer that holds the counts with `layer=`{hint}."
            raise ValueError(msg)
        return "X"
    if "layers" in root and layer in root["layers"]:
        return f"layers/{layer}"
    if layer == RAW_LAYER and "raw" in root and "X" in root["raw"]:
        return "raw/X"
    avail = ", ".join(map(repr, root["layers"].keys())) if "layers" in root else ""
    msg = f"layer {layer!r} not found in '{path}' (available: {avail or 'none'})."
    raise KeyError(msg)


def _matrix_element(elem, key: str, path: Path):
    from anndata.io import sparse_dataset

    enc = str(elem.attrs.get("encoding-type", ""))
    if enc == "csr_matrix":
        return sparse_dataset(elem)
    if enc == "csc_matrix":
        msg = (f"'{path}': {key} is stored by columns (CSC); reading blocks of cells needs rows "
               "(CSR): convert it once in memory, e.g. `adata.X = adata.X.tocsr()`, and write "
               "it again.")
        raise ValueError(msg)
    if enc in ("array", "") and hasattr(elem, "shape") and len(elem.shape) == 2:
        return elem
    msg = f"'{path}': {key} is not a cells x genes matrix (encoding {enc or 'unknown'!r})."
    raise ValueError(msg)


# ------------------------------------------------------------------------------- passes


@dataclass
class GeneStats:
    """What one streaming pass over all cells gives.

    Attributes
    ----------
    n_obs
        Cells.
    library_size
        Total counts per cell.
    counts
        Total counts per gene.
    n_cells
        Cells in which each gene is detected (count > 0).
    mean, mean_sq
        Per-gene mean and mean square of the library-normalized values (``target_sum`` counts per
        cell, CP10k by default), the moments of :func:`screpair.pp.hvg_dispersion`.
    """

    n_obs: int
    library_size: np.ndarray
    counts: np.ndarray
    n_cells: np.ndarray
    mean: np.ndarray
    mean_sq: np.ndarray


def gene_stats(source: RowSource, chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
               target_sum: float = CP10K, progress: bool = False) -> GeneStats:
    """One pass over the rows of ``source`` (blocks of ``chunk_rows`` cells): library sizes and
    per-gene sums, detection counts and normalized moments (:class:`GeneStats`).

    The sums are accumulated entry by entry in row order (``np.add.at``), as scipy's column mean
    of a CSR matrix is, so the moments equal those of the whole matrix in memory bit for bit,
    whatever the block size.
    """
    n, g = source.shape
    lib = np.zeros(n)
    n_cells = np.zeros(g, dtype=np.int64)
    sums = (np.zeros(g), np.zeros(g), np.zeros(g))  # counts, mean, mean_sq
    for start, stop, x in source.blocks(chunk_rows, progress=progress, desc="gene statistics"):
        terms = block_stats(x, n, target_sum)
        lib[start:stop] = terms.library_size
        n_cells += terms.n_cells
        add_block_stats(sums, terms)
    return finish_gene_stats(n, lib, n_cells, sums, source.layer)


@dataclass
class BlockStats:
    """The terms one block of rows adds to :func:`gene_stats` (:func:`block_stats`): its
    library sizes and detection counts, and the (gene, value) entries added, in row order, to
    the per-gene sums of counts, of the normalized values over ``n_obs`` and of their squares
    over ``n_obs``."""

    library_size: np.ndarray
    n_cells: np.ndarray
    entries: tuple[tuple[np.ndarray, np.ndarray], ...]  # counts, mean, mean_sq


def block_stats(x: sp.csr_matrix, n_obs: int, target_sum: float = CP10K) -> BlockStats:
    """The :class:`BlockStats` of a validated CSR block ``x`` of a matrix of ``n_obs`` rows."""
    inv = 1.0 / n_obs
    lib = library_size(x)
    n_cells = np.bincount(x.indices[x.data > 0], minlength=x.shape[1])
    xn = normalize(x, target_sum, lib)
    sq = xn.multiply(xn).tocsr()
    return BlockStats(library_size=lib, n_cells=n_cells,
                      entries=((x.indices, x.data), (xn.indices, (xn * inv).data),
                               (sq.indices, (sq * inv).data)))


def add_block_stats(sums: tuple[np.ndarray, ...], terms: BlockStats) -> None:
    """Add a block's entries to the per-gene ``sums`` (counts, mean, mean_sq) in place, entry
    by entry in row order (``np.add.at``): blocks added in row order give the sums of the whole
    matrix bit for bit."""
    for acc, (idx, vals) in zip(sums, terms.entries, strict=True):
        np.add.at(acc, idx, vals)


def finish_gene_stats(n_obs: int, lib: np.ndarray, n_cells: np.ndarray,
                      sums: tuple[np.ndarray, ...], layer: str | None) -> GeneStats:
    """The :class:`GeneStats` of the accumulated pass (all-zero counts refused)."""
    if not lib.any():
        what = f"layer {layer!r}" if layer is not None else "the count matrix"
        msg = f"{what} is all zeros; there is nothing to impute."
        raise ValueError(msg)
    counts, mean, mean_sq = sums
    return GeneStats(n_obs=n_obs, library_size=lib, counts=counts, n_cells=n_cells, mean=mean,
                     mean_sq=mean_sq)


@dataclass
class RowTotals:
    """Per-cell and per-gene totals over all cells that a fit on a sample of rows may need
    (:func:`row_totals`; :class:`TotalsPass` accumulates them block by block).

    Attributes
    ----------
    library_size
        Total counts per cell (every cell of the data set).
    norm_sum
        Per gene, the sum over cells of ``count / library size`` (the library-normalized
        values over the target sum), accumulated entry by entry in row order.
    """

    library_size: np.ndarray
    norm_sum: np.ndarray

    def take(self, cells: np.ndarray, genes: np.ndarray) -> RowTotals:
        """The totals of the cells and genes of these masks (cells and genes without counts
        add nothing to the sums, so they are the totals of the subset)."""
        return RowTotals(library_size=self.library_size[cells], norm_sum=self.norm_sum[genes])


@dataclass
class TotalsTerms:
    """What one validated CSR block adds to a :class:`TotalsPass` (:func:`totals_terms`):
    its library sizes, stored entries per row and per gene, and its ``norm_sum`` entries
    ``(gene indices, count / library size)`` in storage order."""

    library_size: np.ndarray
    row_nnz: np.ndarray
    col_nnz: np.ndarray
    entries: tuple[np.ndarray, np.ndarray]


def totals_terms(x: sp.csr_matrix) -> TotalsTerms:
    """The :class:`TotalsTerms` of the validated CSR block ``x``."""
    per_row = np.diff(x.indptr)
    lib = library_size(x)
    return TotalsTerms(library_size=lib, row_nnz=per_row,
                       col_nnz=np.bincount(x.indices, minlength=x.shape[1]),
                       entries=(x.indices, x.data / np.repeat(lib, per_row)))


class TotalsPass:
    """:class:`RowTotals` of a matrix of ``n_obs`` x ``n_vars`` seen in consecutive row
    blocks (in row order), with each row's and gene's stored-entry count (:func:`nonempty`'s
    masks): the sums are added entry by entry in row order (``np.add.at``), so they are the
    same, bit for bit, whatever the block size."""

    def __init__(self, n_obs: int, n_vars: int):
        self.lib = np.zeros(n_obs)
        self.row_nnz = np.zeros(n_obs, dtype=np.int64)
        self.col_nnz = np.zeros(n_vars, dtype=np.int64)
        self.norm_sum = np.zeros(n_vars)

    def add(self, start: int, x: sp.csr_matrix) -> None:
        """Add the validated CSR block ``x`` of rows ``start:start + x.shape[0]``."""
        terms = totals_terms(x)
        self.add_rows(start, terms)
        np.add.at(self.norm_sum, *terms.entries)

    def add_rows(self, start: int, terms: TotalsTerms) -> None:
        """Add a block's per-row and per-gene counts (not its ``norm_sum`` entries: a Dask
        run adds those on its workers, in row order, :func:`screpair.methods._dask.row_totals`)."""
        stop = start + terms.library_size.size
        self.lib[start:stop] = terms.library_size
        self.row_nnz[start:stop] = terms.row_nnz
        self.col_nnz += terms.col_nnz

    @property
    def cells(self) -> np.ndarray:
        return self.row_nnz > 0

    @property
    def genes(self) -> np.ndarray:
        return self.col_nnz > 0

    def result(self) -> RowTotals:
        return RowTotals(library_size=self.lib, norm_sum=self.norm_sum)


#: stored values per block of :func:`row_totals` (its temporaries: 16 bytes per value)
_TOTALS_NNZ = 2**17


def row_totals(x) -> RowTotals:
    """The :class:`RowTotals` of validated counts ``x`` (CSR or ndarray) held in memory, taken
    by blocks of rows (CSR: views of about :data:`_TOTALS_NNZ` stored values; the same sums
    as in one block, bit for bit), so the pass holds no copy of ``x``."""
    acc = TotalsPass(*x.shape)
    n = x.shape[0]
    if not sp.issparse(x):
        for start in range(0, n, DEFAULT_CHUNK_ROWS):
            acc.add(start, sp.csr_matrix(x[start:start + DEFAULT_CHUNK_ROWS]))
        return acc.result()
    x = sp.csr_matrix(x)
    cuts = np.searchsorted(x.indptr, np.arange(0, x.nnz, _TOTALS_NNZ), side="right") - 1
    bounds = np.unique(np.concatenate([cuts, [n]]))
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        a, b = x.indptr[s], x.indptr[e]
        acc.add(int(s), sp.csr_matrix((x.data[a:b], x.indices[a:b], x.indptr[s:e + 1] - a),
                                      shape=(int(e - s), x.shape[1]), copy=False))
    return acc.result()


#: the value types :func:`read_all` holds counts in with ``compact=True``, each with the largest
#: count it holds exactly (every integer up to it), narrowest first
COMPACT_DTYPES = ((np.dtype(np.uint16), 2**16 - 1), (np.dtype(np.float32), 2**24),
                  (np.dtype(np.float64), np.inf))


def as_float64(m):
    """Counts as float64, for computing with rows of counts held compactly (no copy when they
    are float64 already)."""
    return m.astype(np.float64, copy=False)


def compact_dtype(x: sp.csr_matrix, dtype: np.dtype | None = None) -> np.dtype:
    """The narrowest of :data:`COMPACT_DTYPES` (no narrower than ``dtype``) that holds every
    value of the validated counts ``x`` exactly."""
    top = float(x.data.max()) if x.nnz else 0.0
    kinds = [d for d, _ in COMPACT_DTYPES]
    start = 0 if dtype is None else kinds.index(np.dtype(dtype))
    return next(d for d, most in COMPACT_DTYPES[start:] if top <= most)


def read_all(source: RowSource, chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
             rows: np.ndarray | None = None, cols: np.ndarray | None = None,
             progress: bool = False, compact: bool = False) -> sp.csr_matrix:
    """The validated counts of the cells ``rows`` and genes ``cols`` (default: all) as one
    float64 CSR with sorted indices, read block by block (never densified). The whole matrix is
    then checked as :func:`get_counts` checks it: not all zeros, and not rounded normalized
    values.

    ``compact=True``: the values are held in the narrowest type that holds every count exactly
    (:func:`compact_dtype`: uint16 up to 65,535, else float32 up to 2^24, else float64), so
    6 bytes per stored count instead of 12 with the int32 indices; the values are the same
    integers. Its users convert the rows they compute with to float64 (:func:`as_float64`);
    sums over uint16 are exact (numpy and scipy sum them in 64-bit integers)."""
    if rows is None and cols is None and source.is_sparse:
        out = _read_all_into(source, chunk_rows, progress, compact)
    else:
        out = _read_all_stacked(source, chunk_rows, rows, cols, progress, compact)
    where = f"layer {source.layer!r}" if source.layer is not None else "the count matrix"
    if not out.nnz or not np.any(out.data):
        msg = f"{where} is all zeros; there is nothing to impute."
        raise ValueError(msg)
    if not source.validated:
        check_not_normalized(out, where)
    return out


def read_stored(source: RowSource, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """The whole matrix as stored (CSR or ndarray, not validated: e.g. a layer of
    probabilities), read by blocks of rows."""
    parts = [source.read(s, min(s + chunk_rows, source.n_obs))
             for s in range(0, source.n_obs, check_chunk_rows(chunk_rows))]
    if all(sp.issparse(p) for p in parts):
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    return np.concatenate([p.toarray() if sp.issparse(p) else p for p in parts])


def _read_all_into(source: RowSource, chunk_rows: int, progress: bool,
                   compact: bool = False) -> sp.csr_matrix:
    """All rows of a sparse source copied block by block into arrays allocated once (the
    stored entries bound the validated ones), so the whole matrix is never held twice
    (``compact``: the values widened, once, when a block needs a wider type)."""
    n, g = source.shape
    cap = source.nnz()
    idx = np.int32 if max(cap, g) < 2**31 else np.int64
    dtype = COMPACT_DTYPES[0][0] if compact else np.dtype(np.float64)
    data, indices = np.empty(cap, dtype=dtype), np.empty(cap, dtype=idx)
    indptr = np.zeros(n + 1, dtype=idx)
    pos = 0
    for start, stop, x in source.blocks(chunk_rows, progress=progress, desc="reading counts"):
        k = x.nnz
        if compact and (wider := compact_dtype(x, data.dtype)) != data.dtype:
            data = data.astype(wider)
        data[pos:pos + k], indices[pos:pos + k] = x.data, x.indices
        indptr[start + 1:stop + 1] = pos + x.indptr[1:]
        pos += k
    out = sp.csr_matrix((data[:pos], indices[:pos], indptr), shape=(n, g), copy=False)
    out.has_sorted_indices = True  # every block is
    return out


def _read_all_stacked(source: RowSource, chunk_rows: int, rows, cols, progress: bool,
                      compact: bool = False) -> sp.csr_matrix:
    keep_rows = None
    dtype = COMPACT_DTYPES[0][0] if compact else np.dtype(np.float64)
    if rows is not None:
        keep_rows = np.zeros(source.n_obs, dtype=bool)
        keep_rows[rows] = True
    parts = []
    for start, stop, x in source.blocks(chunk_rows, progress=progress, desc="reading counts"):
        if keep_rows is not None:
            x = x[np.flatnonzero(keep_rows[start:stop])]
        if cols is not None:
            x = x[:, cols]
        x = sp.csr_matrix(x)
        if compact:  # each part in the narrowest type all parts so far need
            dtype = compact_dtype(x, dtype)
            x = x.astype(dtype)
        parts.append(x)
    out = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr", dtype=dtype)
    out = sp.csr_matrix(out, dtype=dtype)
    out.sort_indices()
    return out


class CountsFile:
    """Validated counts of ``n_obs`` x ``n_vars`` cells held in a temporary file on disk, read
    back by rows: the all-cells counts of a fit that reads a sample but averages any cell's
    counts later (``BaseImputer.reads_all_counts``: knn), which :func:`screpair.impute_file`
    writes during its streaming pass instead of holding them in memory.

    The file holds the CSR values and column indices of the consecutive blocks :meth:`add`
    gets (values in the narrowest exact type, :func:`compact_dtype`, widened once in place when
    a block needs it; indices uint16 up to 65,536 genes, else int32), uncompressed; the row
    pointers (8 bytes per cell) stay in memory. :meth:`take` restricts it to the cells and
    genes with counts (no copy); rows come back as float64 CSR with sorted indices, the
    validated form: :meth:`rows` (consecutive rows, ``x[a:b]``, one read) and
    :meth:`take_rows` (any sorted rows, gathered from a read-only memory map made for that
    call and dropped after it, so the pages read do not stay in the process's memory). Memory:
    the row pointers and the rows asked for; the file (``6``-``8`` bytes per stored count)
    lives in ``directory`` until :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike[str], n_obs: int, n_vars: int):
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix=".screpair-counts-", dir=directory))
        self.n_obs, self.n_vars = int(n_obs), int(n_vars)
        self.index_dtype = np.dtype(np.uint16 if n_vars <= 2**16 else np.int32)
        self.dtype = COMPACT_DTYPES[0][0]
        self.indptr = np.zeros(self.n_obs + 1, dtype=np.int64)
        self._files = {"data": open(self.dir / "data.bin", "wb"),  # noqa: SIM115 (closed
                       "indices": open(self.dir / "indices.bin", "wb")}  # by finish / close)
        self._next = 0
        self._cells: np.ndarray | None = None  # file rows of the kept cells (None: all)
        self._cols: np.ndarray | None = None  # file column -> kept column, -1 (None: all)
        self.shape = (self.n_obs, self.n_vars)

    def add(self, start: int, x: sp.csr_matrix) -> None:
        """Append the validated CSR block ``x`` of rows ``start:start + x.shape[0]`` (blocks
        in row order)."""
        if start != self._next or x.shape[1] != self.n_vars:
            msg = f"block of shape {x.shape} at row {start}: expected row {self._next}."
            raise ValueError(msg)
        wider = compact_dtype(x, self.dtype)
        if wider != self.dtype:
            self._widen(wider)
        stop = start + x.shape[0]
        self.indptr[start + 1:stop + 1] = self.indptr[start] + x.indptr[1:]
        self._files["data"].write(x.data.astype(self.dtype).tobytes())
        self._files["indices"].write(x.indices.astype(self.index_dtype).tobytes())
        self._next = stop

    def _widen(self, dtype: np.dtype) -> None:
        """Rewrite the values written so far as ``dtype``, by pieces."""
        old = self._files["data"]
        old.close()
        src, dst = self.dir / "data.bin", self.dir / "data.wide"
        with open(src, "rb") as f, open(dst, "wb") as g:
            while piece := f.read(self.dtype.itemsize * 2**22):
                g.write(np.frombuffer(piece, dtype=self.dtype).astype(dtype).tobytes())
        os.replace(dst, src)
        self._files["data"] = open(src, "ab")  # noqa: SIM115 (closed by finish / close)
        self.dtype = np.dtype(dtype)

    def finish(self) -> CountsFile:
        """Close the file for writing once every row was added; the counts are then read."""
        if self._next != self.n_obs:
            msg = f"{self._next} of {self.n_obs} rows were added."
            raise ValueError(msg)
        for f in self._files.values():
            f.close()
        self._files = {}
        return self

    def take(self, cells: np.ndarray, genes: np.ndarray) -> CountsFile:
        """The same file seen as the cells and genes of these masks only (the file's row and
        column numbers mapped to the kept ones; no copy)."""
        view = copy.copy(self)
        if not cells.all():
            view._cells = np.flatnonzero(cells)
        if not genes.all():
            view._cols = np.full(self.n_vars, -1, dtype=np.int64)
            view._cols[genes] = np.arange(int(genes.sum()))
        view.shape = (int(cells.sum()), int(genes.sum()))
        return view

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def _check_open(self) -> None:
        if self._files or not (self.dir / "data.bin").exists():
            msg = ("these counts are not readable: their temporary file is still being "
                   "written, or was removed when the run that wrote it ended; fit again.")
            raise RuntimeError(msg)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` (kept rows) as float64 CSR with sorted indices."""
        if self._cells is not None:
            return self.take_rows(np.arange(start, stop))
        self._check_open()
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        data = np.fromfile(self.dir / "data.bin", dtype=self.dtype, count=b - a,
                           offset=a * self.dtype.itemsize)
        indices = np.fromfile(self.dir / "indices.bin", dtype=self.index_dtype, count=b - a,
                              offset=a * self.index_dtype.itemsize)
        return self._csr(data, indices, self.indptr[start:stop + 1] - a)

    def take_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The kept rows ``rows`` (sorted) as float64 CSR with sorted indices."""
        self._check_open()
        file_rows = np.asarray(rows, dtype=np.int64)
        if self._cells is not None:
            file_rows = self._cells[file_rows]
        starts, lens = self.indptr[file_rows], np.diff(self.indptr)[file_rows]
        indptr = np.zeros(file_rows.size + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        pos = np.repeat(starts - indptr[:-1], lens) + np.arange(indptr[-1])
        out = []
        for name, dtype in (("data", self.dtype), ("indices", self.index_dtype)):
            if self.nnz == 0:
                out.append(np.zeros(0, dtype=dtype))
                continue
            mm = np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r", shape=(self.nnz,))
            out.append(np.array(mm[pos]))
            del mm  # unmapped: the pages read leave this process's resident memory
        return self._csr(out[0], out[1], indptr)

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            msg = "a CountsFile is read by slices of consecutive rows or by take_rows."
            raise TypeError(msg)
        start, stop, _ = key.indices(self.shape[0])
        return self.rows(start, max(start, stop))

    def _csr(self, data, indices, indptr) -> sp.csr_matrix:
        indices = indices.astype(np.int32 if self.n_vars < 2**31 else np.int64)
        if self._cols is not None:  # the kept genes only, renumbered (sorted order kept)
            cols = self._cols[indices]
            keep = cols >= 0
            n_rows = indptr.size - 1
            per_row = np.bincount(np.repeat(np.arange(n_rows), np.diff(indptr))[keep],
                                  minlength=n_rows)
            indptr = np.zeros_like(indptr)
            np.cumsum(per_row, out=indptr[1:])
            data, indices = data[keep], cols[keep].astype(indices.dtype)
        out = sp.csr_matrix((data.astype(np.float64), indices, indptr),
                            shape=(indptr.size - 1, self.shape[1]))
        out.has_sorted_indices = True  # every block added was
        return out

    def close(self) -> None:
        """Remove the file (the counts are not readable afterwards)."""
        import shutil

        for f in self._files.values():
            f.close()
        self._files = {}
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------- writing


class StoreWriter:
    """An AnnData store (``.h5ad`` via h5py, ``.zarr`` via zarr) whose matrices are written by
    blocks of consecutive rows, with anndata's element writers and encodings, so that plain
    :func:`anndata.read_h5ad` / :func:`anndata.read_zarr` read it.

    Made by :func:`stream_store`. :meth:`matrix` declares a matrix (``"X"`` or
    ``"layers/<name>"``, float32 unless another ``dtype`` is declared, e.g. ``bool``);
    :meth:`append` adds its next rows: a dense block goes into an array created with its final
    shape and chunked by rows, a sparse one is appended to a CSR element (64-bit ``indptr``),
    collected first up to :attr:`buffer_nnz` stored values per matrix (:meth:`flush` writes the
    collected rows earlier, to hold fewer). Every declared matrix must have received all
    ``n_obs`` rows when the store is closed.
    """

    #: stored values of sparse blocks collected before one append to the store (each append
    #: resizes the on-disk arrays, about 45 ms on zarr): 32 MB of float32 values + int32
    #: indices, plus the block that crosses it and one copy while it is written.
    #: ``benchmarks/bench_writer_buffer.py``, 10^5 x 2,000 float32 CSR at 17 % (34 M values),
    #: medians of 3 on the loaded 2-core machine, 2^24 / 2^22 / 2^20 / 2^18: zarr in blocks of
    #: 10,000 rows 1.84 / 1.57 / 1.89 / 2.11 s, of 1,000 rows 2.31 / 1.61 / 2.61 / 6.08 s
    #: (h5ad: 11.8-14.4 s for all, gzip dominates); the writer's traced peak 154 / 53-73 / 17-24
    #: / 15 MB (zarr), 137 / 36-55 / 1-12 / 1 MB (h5ad). 2^22: as fast as 2^24, a third of it
    buffer_nnz: int = 2**22

    def __init__(self, root, n_obs: int, fmt: str, chunk_rows: int):
        self.root, self.n_obs, self.fmt, self.chunk_rows = root, n_obs, fmt, chunk_rows
        self._buffer: dict[str, list[sp.csr_matrix]] = {}
        self._rows: dict[str, int] = {}
        self._sparse: dict[str, bool | None] = {}
        self._n_vars: dict[str, int] = {}
        self._dtype: dict[str, np.dtype] = {}

    def _kwargs(self, sparse: bool = False) -> dict:
        if self.fmt == "h5ad":
            return {"compression": "gzip"}
        # zarr sizes chunks from the first write: fix them, or appends make one file per value
        return {"chunks": (2**18,)} if sparse else {}

    def matrix(self, key: str, n_vars: int, *, sparse: bool | None = None,
               dtype=np.float32) -> None:
        """Declare the matrix ``key`` (cells x ``n_vars``, stored as ``dtype``); ``sparse=None``:
        stored as the first block comes (CSR for a sparse block, a dense array otherwise)."""
        self._rows[key], self._sparse[key], self._n_vars[key] = 0, sparse, n_vars
        self._dtype[key] = np.dtype(dtype)

    def declare_written(self, key: str, n_vars: int, *, sparse: bool | None = None) -> None:
        """Declare the matrix ``key`` whose ``n_obs`` rows were written into the store by other
        code (e.g. Dask workers), so that :meth:`check_complete` and :meth:`layer_names` count
        it."""
        self.matrix(key, n_vars, sparse=sparse)
        self._rows[key] = self.n_obs

    def append(self, key: str, block) -> None:
        """Write the next rows of ``key`` (as its declared dtype)."""
        start, n_vars = self._rows[key], self._n_vars[key]
        if block.shape[1] != n_vars or start + block.shape[0] > self.n_obs:
            msg = f"block of shape {block.shape} does not fit {key} at row {start}."
            raise ValueError(msg)
        if self._sparse[key] is None:
            self._sparse[key] = sp.issparse(block)
        if start == 0:
            self._create(key, n_vars)
        dtype = self._dtype[key]
        if self._sparse[key]:
            buf = self._buffer.setdefault(key, [])
            buf.append(sp.csr_matrix(block, dtype=dtype))
            if sum(b.nnz for b in buf) >= self.buffer_nnz or start + block.shape[0] == self.n_obs:
                self._flush(key)
        else:
            dense = block.toarray() if sp.issparse(block) else np.asarray(block)
            self.root[key][start:start + block.shape[0]] = dense.astype(dtype, copy=False)
        self._rows[key] = start + block.shape[0]

    def layer_names(self) -> set[str]:
        """The names of the ``layers/<name>`` matrices declared so far."""
        return {k.split("/", 1)[1] for k in self._rows if k.startswith("layers/")}

    def flush(self, key: str | None = None) -> None:
        """Write the collected sparse rows of ``key`` (``None``: of every matrix) to the store."""
        for k in [key] if key is not None else list(self._buffer):
            self._flush(k)

    def _flush(self, key: str) -> None:
        from anndata.io import sparse_dataset

        buf = self._buffer.pop(key, [])
        if not buf:
            return
        csr = buf[0] if len(buf) == 1 else sp.vstack(buf, format="csr")
        csr = sp.csr_matrix(csr, dtype=self._dtype[key])
        if key not in self.root:  # the first rows create the element (64-bit row pointers)
            from anndata.io import write_elem

            csr.indptr = csr.indptr.astype(np.int64)
            write_elem(self.root, key, csr, dataset_kwargs=self._kwargs(sparse=True))
        elif csr.nnz:
            sparse_dataset(self.root[key]).append(csr)
        else:  # nothing stored: only the row pointers grow
            _grow_indptr(self.root[key], csr.shape[0])

    def _create(self, key: str, n_vars: int) -> None:
        if self._sparse[key]:
            return  # written by the first _flush
        rows = max(1, min(self.n_obs, self.chunk_rows, 2**20 // max(n_vars, 1)))
        shape, chunks = (self.n_obs, n_vars), (rows, max(n_vars, 1))
        dtype = self._dtype[key]
        if self.fmt == "h5ad":
            ds = self.root.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks,
                                          **self._kwargs())
        else:
            ds = self.root.create_array(key, shape=shape, dtype=dtype, chunks=chunks)
        ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"

    def check_complete(self) -> None:
        for key in list(self._buffer):
            self._flush(key)
        for key, rows in self._rows.items():
            if rows != self.n_obs:
                msg = f"{key} got {rows} of {self.n_obs} rows; the output is incomplete."
                raise RuntimeError(msg)


def _grow_indptr(group, n_rows: int) -> None:
    """Add ``n_rows`` empty rows to a CSR element (its last row pointer repeated)."""
    indptr = group["indptr"]
    last = int(indptr[-1])
    n = indptr.shape[0]
    indptr.resize((n + n_rows,))
    indptr[n:] = last
    shape = tuple(group.attrs["shape"])
    group.attrs["shape"] = (shape[0] + n_rows, shape[1])


@contextlib.contextmanager
def stream_store(path: Path, *, obs: pd.DataFrame, var: pd.DataFrame,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[StoreWriter]:
    """Write a new ``.h5ad`` / ``.zarr`` AnnData store at ``path`` atomically: a temporary file
    (or directory) next to it, renamed onto ``path`` only when the block finishes and every
    declared matrix is complete; an error or an interrupt (SIGINT / SIGTERM) leaves the old
    ``path`` or none (:func:`screpair.io.atomic_output`). Yields the :class:`StoreWriter`;
    ``obs`` and ``var`` are written first, ``uns`` from ``writer.uns`` at the end. The caller
    checks whether ``path`` may be replaced (:func:`screpair.io.check_output_path`)."""
    import warnings

    from anndata.io import write_elem

    from .io import atomic_output, output_format

    fmt = output_format(path)[0]
    if fmt not in ("h5ad", "zarr"):
        msg = f"cannot stream to '{path}': use an .h5ad or .zarr output."
        raise ValueError(msg)
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Writing zarr v2", category=UserWarning)
        if fmt == "h5ad":
            import h5py

            root = h5py.File(tmp, "w")
        else:
            import zarr

            root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        try:
            root.attrs["encoding-type"], root.attrs["encoding-version"] = "anndata", "0.1.0"
            write_elem(root, "obs", obs)
            write_elem(root, "var", var)
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(root, key, {})
            writer = StoreWriter(root, len(obs), fmt, chunk_rows)
            writer.uns = {}
            yield writer
            writer.check_complete()
            write_elem(root, "uns", writer.uns)
        finally:
            if fmt == "h5ad":
                root.close()


# ------------------------------------------------------------------------------- the rest

#: the AnnData slots besides obs, var and X that a chunked output carries over from its input
OTHER_SLOTS = ("layers", "obsm", "obsp", "varm", "varp", "uns")


def element_keys(data) -> dict[str, list[str]]:
    """The keys of ``layers``, ``obsm``, ``obsp``, ``varm``, ``varp`` and ``uns`` of an
    AnnData or an ``.h5ad`` / ``.zarr`` store (read from the store's groups: nothing is
    loaded), and ``"raw"``: ``["X"]`` when it has ``raw``."""
    if isinstance(data, AnnData):
        keys = {slot: list(getattr(data, slot).keys()) for slot in OTHER_SLOTS}
        keys["raw"] = ["X"] if data.raw is not None else []
        return keys
    root = open_store(Path(data))
    try:
        keys = {slot: list(root[slot].keys()) if slot in root else [] for slot in OTHER_SLOTS}
        keys["raw"] = ["X"] if "raw" in root and "X" in root["raw"] else []
        return keys
    finally:
        if hasattr(root, "close"):
            root.close()


def copy_other_elements(data, w: StoreWriter, *, cols: np.ndarray | None = None,
                        skip_layers=(), skip_uns=(), chunk_rows: int = DEFAULT_CHUNK_ROWS,
                        progress: bool = False) -> None:
    """Copy what an AnnData (or an ``.h5ad`` / ``.zarr`` store) holds besides ``obs``, ``var``
    and ``X`` into the store being written by ``w``, as the in-memory AnnData keeps it:
    ``layers`` (except ``skip_layers``) and ``raw`` (its ``X`` by blocks of ``chunk_rows``
    rows, ``var`` and ``varm``) streamed block by block, as stored (CSR or dense, same dtype);
    ``obsm``, ``obsp``, ``varm``, ``varp`` whole (their size is cells or genes times a few
    columns, or a cells x cells graph, never cells x genes); ``uns`` (except ``skip_uns``) into
    ``w.uns``. With ``cols`` (the output genes), the layers keep those columns, ``varm`` those
    rows and ``varp`` those rows and columns; ``raw`` keeps all its genes. A layer stored by
    columns (CSC) cannot be read by rows: it is read whole (logged)."""
    from anndata.io import read_elem

    own = isinstance(data, AnnData)
    root = None if own else open_store(Path(data))
    try:
        def elem(slot, name):
            return getattr(data, slot)[name] if own else root[slot][name]

        def value(slot, name):
            return getattr(data, slot)[name] if own else read_elem(root[slot][name])

        keys = element_keys(data)
        for name in keys["layers"]:
            if name not in skip_layers:
                _copy_rows(elem("layers", name), w, f"layers/{name}", cols, chunk_rows,
                           progress, data)
        for slot in ("obsm", "obsp", "varm", "varp"):
            for name in keys[slot]:
                v = value(slot, name)
                if cols is not None and slot in ("varm", "varp"):
                    v = v.iloc[cols] if isinstance(v, pd.DataFrame) else v[cols]
                    if slot == "varp":
                        v = v[:, cols]
                _write_whole(w, f"{slot}/{name}", v)
        uns = dict(data.uns) if own else (read_elem(root["uns"]) if "uns" in root else {})
        for name, v in uns.items():
            if name not in skip_uns:
                w.uns[name] = v
        if keys["raw"]:
            _copy_raw(data if own else root, w, chunk_rows, progress, data)
    finally:
        if root is not None and hasattr(root, "close"):
            root.close()


def _copy_rows(element, w: StoreWriter, key: str, cols, chunk_rows: int, progress: bool,
               data) -> None:
    """A cells x genes matrix (in memory, or a store element) copied by blocks of rows."""
    if isinstance(element, (np.ndarray,)) or sp.issparse(element):
        m = element
    else:
        enc = str(element.attrs.get("encoding-type", ""))
        if enc == "csc_matrix":
            from anndata.io import read_elem

            logger.warning("%s of '%s' is stored by columns (CSC): read whole to be copied",
                           key, data)
            m = read_elem(element).tocsr()
        else:
            m = _matrix_element(element, key, Path(str(data)))
    n, g = int(m.shape[0]), int(m.shape[1])
    sparse = sp.issparse(m) or hasattr(m, "format")
    k = g if cols is None else len(cols)
    w.matrix(key, k, sparse=sparse, dtype=m.dtype)
    bar = progress_bar(n, f"copying {key}", progress and n > chunk_rows)
    try:
        for s in range(0, n, chunk_rows):
            block = m[s:min(s + chunk_rows, n)]
            block = sp.csr_matrix(block) if sparse else np.asarray(block)
            w.append(key, block if cols is None else block[:, cols])
            bar.update(block.shape[0])
    finally:
        bar.close()


def _write_whole(w: StoreWriter, key: str, value) -> None:
    from anndata.io import write_elem

    write_elem(w.root, key, value, dataset_kwargs=w._kwargs())


def _copy_raw(src, w: StoreWriter, chunk_rows: int, progress: bool, data) -> None:
    """``raw`` (``X`` by rows, ``var``, ``varm``) as anndata lays it out."""
    from anndata.io import read_elem

    if isinstance(src, AnnData):
        x, var, varm = src.raw.X, src.raw.var, dict(src.raw.varm)
    else:
        g = src["raw"]
        x = g["X"]
        var = read_elem(g["var"]) if "var" in g else None
        varm = {k: read_elem(g["varm"][k]) for k in g["varm"]} if "varm" in g else {}
    raw = w.root.create_group("raw")
    raw.attrs["encoding-type"], raw.attrs["encoding-version"] = "raw", "0.1.0"
    if var is None:
        var = pd.DataFrame(index=pd.RangeIndex(x.shape[1]).astype(str))
    _write_whole(w, "raw/var", var)
    _write_whole(w, "raw/varm", varm)
    _copy_rows(x, w, "raw/X", None, chunk_rows, progress, data)
