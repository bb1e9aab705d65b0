"""Read and write count matrices: ``.h5ad``, 10x Genomics (matrix directory, ``.h5``) and text.

:func:`read` always returns raw counts as **cells x genes** in a CSR ``X``, whatever the layout on
disk; :func:`write` writes ``.h5ad`` or a genes x cells text table that :func:`read` takes back,
atomically (a temporary file in the target directory, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ._logging import get_logger
from ._utils import interrupt_guard

__all__ = ["check_output_path", "read", "write"]

logger = get_logger(__name__)

PathLike = str | os.PathLike[str]

_SUPPORTED = (
    ".h5ad, 10x .h5, a 10x directory (matrix.mtx[.gz] + features.tsv[.gz] or genes.tsv + "
    "barcodes.tsv[.gz]), or .csv/.tsv/.txt (optionally .gz)"
)
_TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": None}
_WRITE_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
#: values per chunk when parsing or writing text (bounds the dense working memory)
_CHUNK_VALUES = 10_000_000
#: float32 holds every integer up to 2**24 exactly
_FLOAT32_EXACT = 2**24


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def read(path: PathLike, *, transpose: bool | None = None, backed: bool = False) -> AnnData:
    """Read a count matrix as an AnnData of raw counts (cells x genes, CSR ``X``).

    The format is taken from the path:

    - ``.h5ad``: read with :func:`anndata.read_h5ad`; ``X`` is converted to CSR if needed and every
      other slot is kept. A file without ``X`` is accepted when it has layers or ``raw`` (choose
      the counts with ``layer=``, ``layer="raw"`` for ``raw.X``).
    - a 10x directory (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or ``genes.tsv[.gz]``,
      ``barcodes.tsv[.gz]``; GEO-style prefixed names such as ``GSM1_matrix.mtx.gz`` too), or the
      path of its ``matrix.mtx[.gz]``.
    - a 10x Cell Ranger ``.h5`` (v2: one group per genome; v3: a ``matrix`` group).
    - ``.csv``, ``.tsv``, ``.txt`` (optionally ``.gz``): a labelled table with names in the first
      column and in the header, genes x cells (the cnnImpute/SAVER/scImpute layout) or cells x genes.
    - a ``.zarr`` AnnData store (:func:`anndata.read_zarr`).

    With ``backed=True`` (``.h5ad`` and ``.zarr`` only) ``X`` stays on disk: an ``.h5ad`` is opened
    with ``anndata.read_h5ad(path, backed="r")`` (anndata reads its layers into memory), a
    ``.zarr`` store as an AnnData whose ``X`` is an :func:`anndata.io.sparse_dataset` (or the dense
    zarr array) and whose other slots are ``obs`` and ``var`` only. Nothing is converted: ``X``
    keeps its stored format. For files larger than memory, :func:`screpair.impute_file` reads
    blocks of cells from the file itself (any layer, by rows).

    For 10x input, ``var_names`` are the gene symbols, ``var['gene_ids']`` the feature IDs and
    ``var['feature_types']`` the feature type where the file has one; when a v3 file holds
    several feature types (e.g. antibody capture), only ``Gene Expression`` features are kept.
    10x and text counts are returned as float32 (exact for counts below 2**24); text holding
    non-integer values is kept as float64.

    Parameters
    ----------
    path
        File or 10x directory.
    backed
        Keep ``X`` on disk (``.h5ad`` and ``.zarr``; read-only).
    transpose
        Text input only. ``False``: rows are genes and columns are cells; ``True``: rows are cells
        and columns are genes; ``None`` (default): decide from the labels (a first-column header
        such as ``gene`` or ``cell``, then which axis holds gene-like names such as symbols, Ensembl
        IDs or ``gene_12``, and which holds cell-like names such as ``AAACATACAACCAC-1`` or
        ``cell_12``); when the labels do not tell, genes are assumed to be in rows. The decision and
        its reason are logged at INFO level.

    Returns
    -------
    AnnData with raw counts in ``X`` (``scipy.sparse.csr_matrix``), cells in ``obs_names`` and
    genes in ``var_names``.

    Raises
    ------
    FileNotFoundError
        The path, or a file a 10x directory needs, does not exist.
    ValueError
        Unknown format, unreadable or inconsistent file, or a non-numeric value in a text table
        (the message names its row and column).

    Warns
    -----
    UserWarning
        When duplicate gene or cell names were made unique by appending ``-1``, ``-2``, …, and
        when the orientation of a text table had to be assumed.

    Examples
    --------
    >>> import screpair
    >>> adata = screpair.read("filtered_feature_bc_matrix/")  # doctest: +SKIP
    >>> adata = screpair.read("counts.csv.gz", transpose=False)  # doctest: +SKIP
    """
    path = Path(path).expanduser()
    if not path.exists():
        msg = f"no such file or directory: '{path}'"
        raise FileNotFoundError(msg)
    fmt, mtx_prefix = _detect_format(path)
    if transpose is not None and fmt != "text":
        msg = (
            f"transpose= applies to text tables only; '{path.name}' is {_FORMAT_NAMES[fmt]}, whose "
            "orientation is fixed. Leave transpose=None."
        )
        raise ValueError(msg)

    if backed:
        return _read_backed(path, fmt)
    notes: list[str] = []
    table = None
    if fmt == "zarr":
        return _read_zarr(path)
    if fmt == "10x_mtx":
        table = _read_10x_mtx(path if path.is_dir() else path.parent, mtx_prefix)
    elif fmt in ("10x_h5", "h5ad"):
        table = _read_10x_h5(path)  # None: an AnnData file (whatever its extension)
    elif fmt == "text":
        table = _read_text(path, transpose, notes)
    if table is None:
        adata, desc = _read_h5ad(path, notes), "h5ad"
    else:
        adata, desc = _table_to_anndata(table, notes), table.description
    for note in notes:
        warnings.warn(f"'{path.name}': {note}", UserWarning, stacklevel=2)
    logger.info("read '%s' (%s): %d cells x %d genes", path, desc, adata.n_obs, adata.n_vars)
    return adata


def write(adata: AnnData, path: PathLike, *, layer: str | None = None) -> None:
    """Write ``adata`` to ``.h5ad`` or to a genes x cells text table, atomically.

    The file is first written to a temporary file ``.NAME.*.tmp`` in the same directory and then
    renamed onto ``path`` (:func:`os.replace`), so ``path`` is either left as it was or holds the
    complete new file. The temporary file is removed on error, on Ctrl-C (SIGINT) and on SIGTERM:
    a signal during the write is recorded, the temporary file is finished and then discarded (a
    second signal stops at once), and the signal is re-raised once the temporary file is gone.
    Only SIGKILL or a power cut can leave the temporary file behind, never a partial ``path``.
    A symbolic link is written through: its target is replaced and the link kept.
    ``adata`` is not modified.

    - ``.h5ad``: every slot, gzip-compressed (:meth:`anndata.AnnData.write_h5ad`; string columns
      are written as they are, not converted to categoricals in ``adata``).
    - ``.csv``, ``.tsv``, ``.txt`` (optionally ``.gz``): one matrix, genes x cells, with
      ``gene`` and the cell names in the header and gene names in the first column, the layout
      :func:`read` (and SAVER/scImpute/cnnImpute) take. Integer-valued matrices are written as
      integers, others with the shortest representation that reads back exactly.

    Parameters
    ----------
    adata
        The AnnData to write (cells x genes).
    path
        Target file; its directory must exist. An existing file is replaced.
    layer
        Text output only: write ``adata.layers[layer]`` instead of ``X``.

    Raises
    ------
    IsADirectoryError
        ``path`` is a directory.
    FileNotFoundError
        The directory of ``path`` does not exist.
    ValueError
        Unknown extension, missing ``X``, or ``layer`` given for ``.h5ad``.

    Examples
    --------
    >>> screpair.write(adata, "repaired.h5ad")  # doctest: +SKIP
    >>> screpair.write(adata, "saver.csv.gz", layer="saver")  # doctest: +SKIP
    """
    if not isinstance(adata, AnnData):
        msg = f"write() needs an AnnData, got {type(adata).__name__}."
        raise TypeError(msg)
    path = Path(os.path.realpath(Path(path).expanduser()))  # through a link: replace its target
    if path.is_dir() and not path.name.lower().endswith(".zarr"):
        msg = f"'{path}' is a directory; give a file name such as '{path / 'out.h5ad'}'."
        raise IsADirectoryError(msg)
    fmt, suffix = output_format(path)
    name = path.name.lower()
    if not path.parent.is_dir():
        msg = f"cannot write '{path}': directory '{path.parent}' does not exist."
        raise FileNotFoundError(msg)
    if fmt in ("h5ad", "zarr") and layer is not None:
        msg = f"layer= applies to text output only; .{fmt} files keep X and every layer."
        raise ValueError(msg)
    if fmt == "text":
        matrix = _matrix_for_text(adata, layer)

    if fmt == "zarr":
        with _atomic_dir(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Writing zarr v2", category=UserWarning)
            src = adata.to_memory() if adata.isbacked else adata
            src.write_zarr(tmp, convert_strings_to_categoricals=False)
        logger.info("wrote '%s' (zarr): %d cells x %d genes", path, adata.n_obs, adata.n_vars)
        return
    with _atomic_target(path) as tmp:
        if fmt == "h5ad":
            src = adata.to_memory() if adata.isbacked else adata
            src.write_h5ad(tmp, compression="gzip", convert_strings_to_categoricals=False)
        else:
            _write_text(
                tmp,
                matrix,
                obs_names=adata.obs_names,
                var_names=adata.var_names,
                sep=_WRITE_SEPARATORS[suffix],
                gz=name.endswith(".gz"),
            )
    what = (
        "h5ad"
        if fmt == "h5ad"
        else f"genes x cells {suffix[1:]}" + (f", layer {layer!r}" if layer else "")
    )
    logger.info("wrote '%s' (%s): %d cells x %d genes", path, what, adata.n_obs, adata.n_vars)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(path: PathLike, *, inputs: Sequence[PathLike] = (), overwrite: bool = False,
                      formats: Sequence[str] | None = None,
                      overwrite_hint: str = "overwrite=True") -> Path:
    """Check an output path before any work: a known extension (one of ``formats`` if given),
    an existing writable directory, not a directory itself (a ``.zarr`` store may be), and
    neither the input nor an existing file unless ``overwrite``. Returns the path.

    Raises ``ValueError`` (extension, directory, the input), ``FileNotFoundError`` (no such
    directory), ``PermissionError`` (not writable) or ``FileExistsError``."""
    out = Path(path).expanduser()
    if out.is_dir() and not out.name.lower().endswith(".zarr"):
        msg = f"output '{path}' is a directory; give a file name such as '{out / 'out.h5ad'}'."
        raise ValueError(msg)
    fmt = output_format(out)[0]
    if formats is not None and fmt not in formats:
        kinds = " or ".join(f".{f}" if f != "text" else ".csv/.tsv/.txt" for f in formats)
        msg = f"output '{path}' must be an {kinds} file." if len(formats) == 1 else (
            f"output '{path}' must be {kinds}.")
        raise ValueError(msg)
    parent = Path(os.path.realpath(out)).parent
    if not parent.is_dir():
        msg = f"cannot write '{path}': directory '{parent}' does not exist."
        raise FileNotFoundError(msg)
    if not os.access(parent, os.W_OK | os.X_OK):
        msg = f"cannot write '{path}': directory '{parent}' is not writable."
        raise PermissionError(msg)
    for inp in inputs:
        if out.exists() and _same_file(Path(inp).expanduser(), out):
            if not overwrite:
                msg = (
                    f"output '{path}' is the input file; it would be replaced. Write to another "
                    f"file, or pass {overwrite_hint} (written to a temporary file, then renamed)."
                )
                raise ValueError(msg)
            return out
    if out.exists() and not overwrite:
        msg = f"output '{path}' already exists; pass {overwrite_hint} to replace it."
        raise FileExistsError(msg)
    return out


def output_format(path: PathLike) -> tuple[str, str]:
    """``("h5ad" | "zarr" | "text", suffix)`` for an output path, from its name (``.gz`` allowed for text);
    ``ValueError`` for any other extension."""
    name = Path(path).name.lower()
    suffix = Path(name[:-3] if name.endswith(".gz") else name).suffix
    if name.endswith(".h5ad"):
        return "h5ad", ".h5ad"
    if name.rstrip("/").endswith(".zarr"):
        return "zarr", ".zarr"
    if suffix in _WRITE_SEPARATORS:
        return "text", suffix
    msg = (
        f"cannot write '{Path(path).name}': unknown extension; use .h5ad, .zarr, or .csv/.tsv/.txt "
        "(optionally .gz) for a genes x cells table."
    )
    raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# format detection and the common table -> AnnData step
# --------------------------------------------------------------------------------------------

_FORMAT_NAMES = {
    "h5ad": "an .h5ad file",
    "zarr": "a .zarr store",
    "10x_mtx": "a 10x matrix directory",
    "10x_h5": "a 10x .h5 file",
    "text": "a text table",
}
_MTX_NAME = re.compile(r"^(?P<prefix>.*?)matrix\.mtx(\.gz)?$", re.IGNORECASE)


def _detect_format(path: Path) -> tuple[str, str | None]:
    """Return the format name and, for a 10x matrix file path, its file-name prefix."""
    if path.name.lower().endswith(".zarr"):
        return "zarr", None
    if path.is_dir():
        return "10x_mtx", None
    name = path.name.lower()
    if name.endswith(".h5ad"):
        return "h5ad", None
    if name.endswith((".h5", ".hdf5")):
        return "10x_h5", None
    match = _MTX_NAME.match(path.name)
    if match:
        return "10x_mtx", match.group("prefix")
    base = name[:-3] if name.endswith(".gz") else name
    if Path(base).suffix in _TEXT_SEPARATORS:
        return "text", None
    msg = f"cannot tell the format of '{path}' from its name; supported: {_SUPPORTED}."
    raise ValueError(msg)


@dataclass
class _Table:
    """A parsed matrix before it becomes an AnnData (names may still hold duplicates)."""

    x: sp.csr_matrix  # cells x genes
    obs_names: np.ndarray
    var_names: np.ndarray
    description: str
    var: dict[str, np.ndarray] = field(default_factory=dict)


def _unique(names: Sequence[str], what: str, notes: list[str]) -> pd.Index:
    index = pd.Index(np.asarray(names, dtype=str).astype(object))
    if index.has_duplicates:
        dup = index[index.duplicated()].unique()
        notes.append(
            f"{len(dup)} duplicate {what} name(s) (e.g. {dup[0]!r}) were made unique by appending "
            "'-1', '-2', …"
        )
        from anndata.utils import make_index_unique

        with warnings.catch_warnings():  # we warn once ourselves, from read()
            warnings.simplefilter("ignore")
            index = make_index_unique(index)
    return pd.Index(index, dtype=object)


def _table_to_anndata(table: _Table, notes: list[str]) -> AnnData:
    obs = pd.DataFrame(index=_unique(table.obs_names, "cell", notes))
    var = pd.DataFrame(
        {k: np.asarray(v, dtype=str).astype(object) for k, v in table.var.items()},
        index=_unique(table.var_names, "gene", notes),
    )
    return AnnData(X=table.x, obs=obs, var=var)


# --------------------------------------------------------------------------------------------
# h5ad
# --------------------------------------------------------------------------------------------

_NOT_UNIQUE = re.compile(r"(Variable|Observation) names are not unique")


def _read_h5ad(path: Path, notes: list[str]) -> AnnData:
    import anndata

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_UNIQUE.pattern, category=UserWarning)
            adata = anndata.read_h5ad(path)
    except (OSError, KeyError, TypeError, ValueError) as e:  # truncated or malformed file
        msg = f"could not read '{path}' as .h5ad ({_one_line(e)})."
        raise ValueError(msg) from None
    if adata.X is None:
        if not len(adata.layers) and adata.raw is None:
            msg = f"'{path}' has no count matrix (no X, layers or raw); store the raw counts in X."
            raise ValueError(msg)
    elif not isinstance(adata.X, sp.csr_matrix):
        adata.X = sp.csr_matrix(adata.X)
    if adata.var_names.has_duplicates:
        adata.var_names = _unique(adata.var_names, "gene", notes)
    if adata.obs_names.has_duplicates:
        adata.obs_names = _unique(adata.obs_names, "cell", notes)
    return adata


def _read_zarr(path: Path) -> AnnData:
    import anndata

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_UNIQUE.pattern, category=UserWarning)
            adata = anndata.read_zarr(path)
    except (OSError, KeyError, TypeError, ValueError) as e:
        msg = f"could not read '{path}' as a .zarr AnnData store ({_one_line(e)})."
        raise ValueError(msg) from None
    if adata.X is not None and sp.issparse(adata.X) and not isinstance(adata.X, sp.csr_matrix):
        adata.X = sp.csr_matrix(adata.X)
    logger.info("read '%s' (zarr): %d cells x %d genes", path, adata.n_obs, adata.n_vars)
    return adata


def _read_backed(path: Path, fmt: str) -> AnnData:
    """``path`` with ``X`` left on disk (read-only)."""
    import anndata

    try:
        if fmt == "h5ad":
            adata = anndata.read_h5ad(path, backed="r")
        elif fmt == "zarr":
            import zarr
            from anndata.io import read_elem, sparse_dataset

            root = zarr.open_group(str(path), mode="r")
            x = root["X"] if "X" in root else None
            if x is not None and str(x.attrs.get("encoding-type", "")).endswith("_matrix"):
                x = sparse_dataset(x)
            adata = AnnData(X=x, obs=read_elem(root["obs"]), var=read_elem(root["var"]),
                            uns=read_elem(root["uns"]) if "uns" in root else None)
        else:
            msg = (f"backed=True needs an .h5ad file or a .zarr store; '{path.name}' is "
                   f"{_FORMAT_NAMES.get(fmt, fmt)}. Read it into memory (backed=False).")
            raise TypeError(msg)
    except TypeError as e:
        raise ValueError(str(e)) from None
    except (OSError, KeyError, ValueError) as e:
        msg = f"could not read '{path}' as {_FORMAT_NAMES[fmt]} ({_one_line(e)})."
        raise ValueError(msg) from None
    logger.info("opened '%s' backed (%s): %d cells x %d genes", path, fmt, adata.n_obs,
                adata.n_vars)
    return adata


# --------------------------------------------------------------------------------------------
# 10x matrix directory
# --------------------------------------------------------------------------------------------


def _find_file(folder: Path, prefix: str, names: Sequence[str]) -> Path | None:
    for name in names:
        candidate = folder / f"{prefix}{name}"
        if candidate.is_file():
            return candidate
    return None


def _read_10x_mtx(folder: Path, prefix: str | None) -> _Table:
    if prefix is None:
        candidates = sorted(
            p for p in folder.iterdir() if p.is_file() and _MTX_NAME.match(p.name) is not None
        )
        if not candidates:
            msg = (
                f"directory '{folder}' is not a 10x matrix directory: it has no matrix.mtx[.gz] "
                "(expected matrix.mtx[.gz], features.tsv[.gz] or genes.tsv, barcodes.tsv[.gz])."
            )
            raise ValueError(msg)
        prefixes = sorted({_MTX_NAME.match(p.name).group("prefix") for p in candidates})
        if len(prefixes) > 1:
            names = ", ".join(p.name for p in candidates)
            msg = f"directory '{folder}' holds several matrices ({names}); pass the one to read."
            raise ValueError(msg)
        prefix = prefixes[0]
    mtx = _find_file(folder, prefix, ["matrix.mtx.gz", "matrix.mtx"])
    features = _find_file(
        folder, prefix, ["features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"]
    )
    barcodes = _find_file(folder, prefix, ["barcodes.tsv.gz", "barcodes.tsv"])
    for found, want in (
        (features, "features.tsv[.gz] or genes.tsv"),
        (barcodes, "barcodes.tsv[.gz]"),
    ):
        if found is None:
            msg = f"10x directory '{folder}' has {mtx.name} but no {prefix}{want}."
            raise FileNotFoundError(msg)

    from scipy.io import mmread

    try:
        raw = mmread(str(mtx))
    except (OSError, ValueError, EOFError) as e:
        msg = f"could not read '{mtx}' as a Matrix Market file ({_one_line(e)})."
        raise ValueError(msg) from None
    if not sp.issparse(raw):
        raw = sp.coo_matrix(raw)
    feat = _read_tsv_columns(features)
    bcs = _read_tsv_columns(barcodes)
    n_genes, n_cells = raw.shape
    if len(feat) != n_genes or len(bcs) != n_cells:
        msg = (
            f"10x directory '{folder}' is inconsistent: {mtx.name} is {n_genes} genes x {n_cells} "
            f"cells but {features.name} lists {len(feat)} features and {barcodes.name} "
            f"{len(bcs)} barcodes."
        )
        raise ValueError(msg)
    x = sp.csr_matrix(raw.T, dtype=np.float32)
    ids = feat.iloc[:, 0].to_numpy()
    symbols = feat.iloc[:, 1].to_numpy() if feat.shape[1] > 1 else ids
    var = {"gene_ids": ids}
    if feat.shape[1] > 2:
        var["feature_types"] = feat.iloc[:, 2].to_numpy()
    version = "v3" if features.name.startswith(f"{prefix}features") else "v2"
    table = _Table(x, bcs.iloc[:, 0].to_numpy(), symbols, f"10x mtx {version}", var)
    return _gex_only(table)


def _read_tsv_columns(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(
            path,
            sep="\t",
            header=None,
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_NONE,
            compression="infer",
        )
    except pd.errors.EmptyDataError:
        return pd.DataFrame(np.empty((0, 1), dtype=object))
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        msg = f"could not read '{path}' ({_one_line(e)})."
        raise ValueError(msg) from None
    return df


def _gex_only(table: _Table) -> _Table:
    """Keep only Gene Expression features when a file also holds other feature types."""
    types = table.var.get("feature_types")
    if types is None:
        return table
    keep = np.asarray(types) == "Gene Expression"
    if keep.all() or not keep.any():
        return table
    dropped = sorted(set(np.asarray(types)[~keep]))
    logger.info(
        "kept %d 'Gene Expression' features, dropped %d others (%s)",
        int(keep.sum()),
        int((~keep).sum()),
        ", ".join(dropped),
    )
    return _Table(
        table.x[:, np.flatnonzero(keep)].tocsr(),
        table.obs_names,
        np.asarray(table.var_names)[keep],
        table.description,
        {k: np.asarray(v)[keep] for k, v in table.var.items()},
    )


# --------------------------------------------------------------------------------------------
# 10x .h5 (Cell Ranger v2 and v3)
# --------------------------------------------------------------------------------------------

_CSC_KEYS = {"data", "indices", "indptr", "shape"}


def _strings(ds) -> np.ndarray:
    arr = np.asarray(ds[()])
    if arr.dtype.kind == "S" or (
        arr.dtype.kind == "O" and arr.size and isinstance(arr.flat[0], bytes)
    ):
        return np.array([v.decode("utf-8") for v in arr.ravel()], dtype=object)
    return arr.astype(str).astype(object)


def _h5_matrix(group, where: str) -> sp.csr_matrix:
    """A 10x CSC genes x cells group as a CSR cells x genes matrix (same buffers, no transpose)."""
    n_genes, n_cells = (int(v) for v in group["shape"][()])
    indptr = group["indptr"][()]
    indices = group["indices"][()]
    data = group["data"][()]
    if len(indptr) != n_cells + 1 or len(indices) != len(data) or indptr[-1] != len(data):
        msg = f"{where}: data/indices/indptr do not match its shape ({n_genes} x {n_cells})."
        raise ValueError(msg)
    return sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_cells, n_genes))


def _read_10x_h5(path: Path) -> _Table | None:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        msg = f"could not open '{path}' as HDF5 ({_one_line(e)})."
        raise ValueError(msg) from None
    with f:
        encoding = f.attrs.get("encoding-type", b"")
        if encoding in ("anndata", b"anndata") or {"obs", "var"} <= set(f.keys()):
            return None
        try:
            if "matrix" in f:
                return _read_10x_h5_v3(f["matrix"], path)
            return _read_10x_h5_v2(f, path)
        except KeyError as e:
            msg = f"'{path}' looks like a 10x .h5 file but lacks {_one_line(e)}."
            raise ValueError(msg) from None


def _read_10x_h5_v3(group, path: Path) -> _Table:
    x = _h5_matrix(group, f"'{path}' matrix")
    feats = group["features"]
    var = {"gene_ids": _strings(feats["id"])}
    if "feature_type" in feats:
        var["feature_types"] = _strings(feats["feature_type"])
    if "genome" in feats:
        var["genome"] = _strings(feats["genome"])
    table = _Table(x, _strings(group["barcodes"]), _strings(feats["name"]), "10x h5 v3", var)
    if not (len(table.obs_names) == x.shape[0] and len(table.var_names) == x.shape[1]):
        msg = f"'{path}': barcodes/features do not match the matrix shape {x.shape[::-1]}."
        raise ValueError(msg)
    return _gex_only(table)


def _read_10x_h5_v2(f, path: Path) -> _Table:
    import h5py

    genomes = [k for k in f if isinstance(f[k], h5py.Group) and _CSC_KEYS <= set(f[k].keys())]
    if not genomes:
        found = ", ".join(repr(k) for k in list(f.keys())[:5]) or "nothing"
        msg = (
            f"'{path}' is neither an AnnData file nor a 10x Cell Ranger .h5 file (top level holds "
            f"{found}; expected obs/var/X, a 'matrix' group (10x v3) or one group per genome "
            "(10x v2))."
        )
        raise ValueError(msg)
    parts, barcodes, names, ids, genome_col = [], None, [], [], []
    for genome in genomes:
        g = f[genome]
        x = _h5_matrix(g, f"'{path}' genome {genome!r}")
        bcs = _strings(g["barcodes"])
        if barcodes is not None and not np.array_equal(bcs, barcodes):
            msg = f"'{path}': genomes {genomes} have different barcodes; cannot combine them."
            raise ValueError(msg)
        barcodes = bcs
        gene_ids = _strings(g["genes"])
        gene_names = _strings(g["gene_names"]) if "gene_names" in g else gene_ids
        if not (len(bcs) == x.shape[0] and len(gene_ids) == len(gene_names) == x.shape[1]):
            msg = f"'{path}' genome {genome!r}: barcodes/genes do not match the matrix shape."
            raise ValueError(msg)
        parts.append(x)
        names.append(gene_names)
        ids.append(gene_ids)
        genome_col.append(np.full(x.shape[1], genome, dtype=object))
    var = {"gene_ids": np.concatenate(ids)}
    if len(genomes) > 1:
        var["genome"] = np.concatenate(genome_col)
    x = parts[0] if len(parts) == 1 else sp.hstack(parts, format="csr")
    return _Table(x, barcodes, np.concatenate(names), "10x h5 v2", var)


# --------------------------------------------------------------------------------------------
# text tables
# --------------------------------------------------------------------------------------------


def _open_text(path: Path) -> IO[str]:
    """Open a (possibly gzipped) text file; ``utf-8-sig`` drops an Excel byte-order mark."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _split(line: str, sep: str | None) -> list[str]:
    """All fields of one line (quotes removed)."""
    line = line.rstrip("\r\n")
    if sep is None:
        return [tok.strip('"') for tok in line.split()]
    return next(csv.reader([line], delimiter=sep))


def _split_name(line: str, sep: str | None) -> tuple[str, str]:
    """Split one data line into its (unquoted) first field and the rest of the line."""
    line = line.rstrip("\r\n")
    if sep is None:
        parts = line.split(None, 1)
        return parts[0].strip('"'), (parts[1] if len(parts) > 1 else "")
    if line.startswith('"'):  # quoted name, possibly holding the separator or "" escapes
        end = 1
        while True:
            end = line.find('"', end)
            if end < 0 or line[end + 1 : end + 2] != '"':
                break
            end += 2
        if end > 0 and line[end + 1 : end + 2] in (sep, "\n", "\r", ""):
            return line[1:end].replace('""', '"'), line[end + 2 :]
    name, _, rest = line.partition(sep)
    return name, rest


def _read_text(path: Path, transpose: bool | None, notes: list[str]) -> _Table:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    try:
        with _open_text(path) as fh:
            header = fh.readline()
            if not header.strip():
                msg = f"'{path}' is empty (or its first line is blank); expected a header of names."
                raise ValueError(msg)
            sep = _TEXT_SEPARATORS[Path(base).suffix]
            if sep is None or sep not in header:
                sep = next((c for c in ("\t", ",", ";") if c in header), None)  # None: whitespace
            head = _split(header, sep)
            if all(_is_number(h) for h in head):
                msg = (
                    f"'{path}' has no header: its first line is all numbers. The table needs cell "
                    "or gene names in the first line and in the first column."
                )
                raise ValueError(msg)
            parsed = _parse_rows(fh, sep, head, path)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        msg = f"could not read '{path}' as text ({_one_line(e)})."
        raise ValueError(msg) from None
    m, rows, corner, columns, all_int = parsed

    genes_in_rows, reason = _orientation(rows, columns, corner, transpose)
    if reason.startswith(_UNDECIDED):
        notes.append(
            "the row and column names do not tell which axis holds the genes; assumed genes in "
            "rows. Pass transpose=False (genes in rows) or transpose=True (cells in rows); CLI: "
            "--no-transpose / --transpose"
        )
    exact32 = all_int and (m.nnz == 0 or np.abs(m.data).max() < _FLOAT32_EXACT)
    dtype = np.float32 if exact32 else np.float64
    if genes_in_rows:
        x, cells, genes = sp.csr_matrix(m.T, dtype=dtype), columns, rows
    else:
        x, cells, genes = sp.csr_matrix(m, dtype=dtype), rows, columns
    kind = Path(base).suffix[1:] + (".gz" if name.endswith(".gz") else "")
    orient = "genes in rows" if genes_in_rows else "cells in rows"
    return _Table(
        x,
        np.asarray(cells, dtype=object),
        np.asarray(genes, dtype=object),
        f"{kind}, {orient}: {reason}",
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_rows(fh: IO[str], sep: str | None, head: list[str], path: Path):
    """Parse the data lines in chunks: (CSR rows x columns, row names, corner, columns, all_int)."""
    corner = columns = None
    blocks, rows, all_int = [], [], True
    line_no = 1  # the header
    while True:
        names, rests, lines = [], [], []
        n_chunk = 1 if columns is None else max(1, _CHUNK_VALUES // max(1, len(columns)))
        for raw in fh:
            line_no += 1
            if not raw.strip():
                continue  # blank lines carry no data
            row_name, rest = _split_name(raw, sep)
            if not rest.strip():
                msg = (
                    f"'{path.name}' line {line_no} (row {row_name!r}) has a name but no values; "
                    "expected a name followed by the counts."
                )
                raise ValueError(msg)
            names.append(row_name)
            rests.append(rest)
            lines.append(line_no)
            if len(names) >= n_chunk:
                break
        if not names:
            break
        if columns is None:  # first data line: does the header have a label above the names?
            n_values = len(_split(rests[0], sep))
            if len(head) == n_values + 1:
                corner, columns = head[0], head[1:]
            elif len(head) == n_values:  # R write.table: no label above the row names
                corner, columns = "", head
            else:
                msg = (
                    f"'{path.name}': the header has {len(head)} fields but the first data row has "
                    f"{n_values + 1}; expected the same number (or one fewer when the header has no "
                    "label above the names)."
                )
                raise ValueError(msg)
        values = _values_block(rests, names, lines, sep, columns, path)
        if all_int:
            all_int = bool(np.all(values == np.round(values)))
        blocks.append(sp.csr_matrix(values))
        rows.extend(names)
    if not blocks:
        msg = f"'{path}' has a header but no data rows."
        raise ValueError(msg)
    m = blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
    return m, rows, corner, columns, all_int


def _values_block(rests, names, lines, sep, columns, path: Path) -> np.ndarray:
    """The values of a chunk of lines as float64, or a ValueError naming the first bad value."""
    try:
        values = np.loadtxt(
            rests, delimiter=sep, dtype=np.float64, ndmin=2, comments=None, quotechar='"'
        )
    except ValueError:
        values = None
    if values is None or values.shape != (len(rests), len(columns)):
        _raise_bad_value(rests, names, lines, sep, columns, path)
    finite = np.isfinite(values)
    if not finite.all():
        i, j = (int(v[0]) for v in np.nonzero(~finite))
        what = "NaN" if np.isnan(values[i, j]) else str(float(values[i, j]))
        msg = (
            f"'{path.name}' has a non-finite value {what} at line {lines[i]} (row {names[i]!r}, "
            f"column {columns[j]!r}); counts must be finite numbers."
        )
        raise ValueError(msg)
    return values


def _raise_bad_value(rests, names, lines, sep, columns, path: Path) -> None:
    """Find the first malformed row or value of a chunk (slow path) and raise a ValueError."""
    where = f"'{path.name}' has"
    for i, rest in enumerate(rests):
        tokens = _split(rest, sep)
        if len(tokens) != len(columns):
            msg = (
                f"{where} {len(tokens)} values at line {lines[i]} (row {names[i]!r}) but the header "
                f"names {len(columns)} columns."
            )
            raise ValueError(msg)
        for j, tok in enumerate(tokens):
            try:
                float(tok)
            except ValueError:
                what = (
                    "an empty or missing value"
                    if not tok.strip()
                    else f"a non-numeric value {tok!r}"
                )
                msg = (
                    f"{where} {what} at line {lines[i]} (row {names[i]!r}, column "
                    f"{columns[j]!r}); the table must hold counts only, names in the first column "
                    "and header."
                )
                raise ValueError(msg) from None
    msg = f"could not parse the values of '{path.name}' near line {lines[0]}."
    raise ValueError(msg)


# --- orientation heuristics ---------------------------------------------------------------

_GENE_STRONG = re.compile(
    r"^ENS[A-Z]*[GT]\d{6,}(\.\d+)?$"  # Ensembl gene / transcript IDs (any species)
    r"|^genes?[_\-.]?\d+$"  # gene_12, gene12
    r"|^ERCC-\d+$"  # spike-ins
    r"|Rik\d*$",  # RIKEN clones (0610007P14Rik)
    re.IGNORECASE,
)
_CELL = re.compile(
    r"cell|barcode|sample"  # cell_12, Cell12, barcode_3, mouse1_lib1.final_cell_0001
    r"|_.*\d$"  # underscore-joined names ending in a number: ES_1, SC_2i_12, D3T0_A.P2_A2
    r"|^(SRR|ERR|DRR|GSM|SRX|SAMN)\d+$"  # run / sample accessions
    r"|^[XV]\d+$"  # R's default column names (X1, V1)
    r"|^[A-P]\d{1,2}$",  # plate wells (A1 … P24)
    re.IGNORECASE,
)
_BARCODE = re.compile(r"[ACGT]{8,}")  # 10x / Drop-seq barcodes (upper case), any prefix/suffix
_SYMBOL = re.compile(r"^[A-Za-z0-9]+(?:[-.][A-Za-z0-9]+){0,3}$")  # CD3E, RP11-206L10.2, mt-Co1
_GENE_CORNER = re.compile(
    r"^(genes?|gene[ _.]?(ids?|names?|symbols?)|symbols?|ensembl([ _.]?ids?)?|geneid|genename"
    r"|features?|feature[ _.]?(ids?|names?))$",
    re.IGNORECASE,
)
_CELL_CORNER = re.compile(
    r"^(cells?|cell[ _.]?(ids?|names?|barcodes?)|barcodes?|samples?|sample[ _.]?(ids?|names?)"
    r"|obs_names)$",
    re.IGNORECASE,
)
_MAX_LABELS = 2000  # labels looked at per axis
_UNDECIDED = "names do not tell"
_DECISIVE = 0.25  # minimum score difference to trust the labels


def _label_kind(label: str) -> str | None:
    """``'gene'``, ``'cell'`` or ``None`` (cannot tell) for one row or column name."""
    label = label.strip()
    if _GENE_STRONG.search(label):
        return "gene"
    if _BARCODE.search(label) or _CELL.search(label):
        return "cell"
    if len(label) <= 24 and _SYMBOL.match(label) and re.search("[A-Za-z]", label):
        return "gene"
    return None


def _axis_score(labels: Sequence[str]) -> tuple[float, float, str | None, str | None]:
    """Fractions of gene-like and cell-like labels, and an example of each."""
    n = len(labels)
    if n == 0:
        return 0.0, 0.0, None, None
    idx = np.unique(np.linspace(0, n - 1, min(n, _MAX_LABELS)).astype(int))
    kinds = [(labels[i], _label_kind(str(labels[i]))) for i in idx]
    genes = [lab for lab, k in kinds if k == "gene"]
    cells = [lab for lab, k in kinds if k == "cell"]
    return (
        len(genes) / len(kinds),
        len(cells) / len(kinds),
        genes[0] if genes else None,
        cells[0] if cells else None,
    )


def _describe(g: float, c: float, eg: str | None, ec: str | None) -> str:
    if g >= c and eg is not None:
        return f"{g:.0%} gene-like, e.g. {eg!r}"
    if ec is not None:
        return f"{c:.0%} cell-like, e.g. {ec!r}"
    return "neither gene- nor cell-like"


def _orientation(
    rows: Sequence[str], columns: Sequence[str], corner: str, transpose: bool | None
) -> tuple[bool, str]:
    """Decide whether genes are in rows; return the decision and a one-phrase reason."""
    if transpose is not None:
        return (not transpose), f"transpose={transpose}"
    corner = corner.strip()
    if _GENE_CORNER.match(corner):
        return True, f"the first column is headed {corner!r}"
    if _CELL_CORNER.match(corner):
        return False, f"the first column is headed {corner!r}"
    gr, cr, egr, ecr = _axis_score(rows)
    gc, cc, egc, ecc = _axis_score(columns)
    score = (gr - cr) - (gc - cc)
    why = f"row names {_describe(gr, cr, egr, ecr)}; column names {_describe(gc, cc, egc, ecc)}"
    if score >= _DECISIVE:
        return True, why
    if score <= -_DECISIVE:
        return False, why
    return True, f"{_UNDECIDED} ({why}); assuming genes in rows, pass transpose= to override"


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


#: test hook: seconds to pause inside the write, with the temporary file in place
_PAUSE_ENV = "SCREPAIR_TEST_WRITE_PAUSE"


def _check_not_interrupted(got: list[int]) -> None:
    """Before a finished temporary output is moved into place: wait out the test pause
    (``SCREPAIR_TEST_WRITE_PAUSE``), then abandon the write if a signal came meanwhile."""
    end = time.monotonic() + float(os.environ.get(_PAUSE_ENV, "0") or 0)
    while not got and time.monotonic() < end:
        time.sleep(0.05)
    if got:
        msg = "interrupted during the write"
        raise InterruptedError(msg)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    An exception or a SIGINT / SIGTERM at any point removes the temporary file and leaves
    ``path`` as it was.
    """
    with interrupt_guard() as got:
        tmp = None
        try:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
            yield tmp
            _check_not_interrupted(got)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, _target_mode(path))
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if got:
                return  # the guard raises for the signal
            raise


def _is_zarr_store(path: Path) -> bool:
    return any((path / name).exists() for name in (".zgroup", "zarr.json"))


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """:func:`_atomic_target` for a directory store (``.zarr``): a temporary directory next to
    ``path``, moved onto it only if the block succeeds (an existing store is first moved aside,
    then removed). An existing directory that is not a zarr store is never replaced."""
    import shutil

    if path.exists() and not (path.is_dir() and _is_zarr_store(path)):
        msg = f"'{path}' exists and is not a zarr store; not replacing it."
        raise ValueError(msg)
    with interrupt_guard() as got:
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            yield tmp
            _check_not_interrupted(got)
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old / "store")
            os.replace(tmp, path)
            tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if got:
                return
            raise


def atomic_output(path: Path):
    """The atomic-write context for ``path``: a temporary file (``.h5ad``, text) or directory
    (``.zarr``) next to it, renamed onto it at the end (see :func:`write`)."""
    return _atomic_dir(path) if output_format(path)[0] == "zarr" else _atomic_target(path)


def _matrix_for_text(adata: AnnData, layer: str | None):
    if layer is None:
        m = adata.X
        if m is None:
            msg = "adata.X is empty (None); pass layer= to choose the matrix to write."
            raise ValueError(msg)
    else:
        if layer not in adata.layers:
            avail = ", ".join(map(repr, adata.layers.keys())) or "none"
            msg = f"layer {layer!r} not found in adata.layers (available: {avail})."
            raise KeyError(msg)
        m = adata.layers[layer]
    if hasattr(m, "to_memory"):  # backed / lazy arrays
        m = m.to_memory()
    return m


def _write_text(tmp: Path, matrix, *, obs_names, var_names, sep: str, gz: bool) -> None:
    """Write ``matrix`` (cells x genes) to ``tmp`` as a genes x cells table."""
    if sp.issparse(matrix):
        m = sp.csr_matrix(sp.csr_matrix(matrix).T)  # genes x cells: gene rows slice cheaply
        values = m.data
    else:
        m = np.asarray(matrix).T
        values = m
    as_int = m.dtype.kind in "iub" or (
        m.dtype.kind == "f"
        and bool(np.all(np.isfinite(values)))
        and bool(np.all(values == np.round(values)))
    )
    lookup = None  # str(i) for small non-negative integers: 3x faster than pandas' formatter
    if as_int and (values.size == 0 or (values.min() >= 0 and values.max() < 2**16)):
        lookup = [str(i) for i in range(int(values.max()) + 1 if values.size else 1)]
    n_genes = m.shape[0]
    step = max(1, _CHUNK_VALUES // max(1, m.shape[1]))
    genes = [_quote(str(g), sep) for g in var_names]
    raw = gzip.open(tmp, "wb", compresslevel=6) if gz else open(tmp, "wb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        fh.write(sep.join(_quote(str(c), sep) for c in ["gene", *obs_names]) + "\n")
        for start in range(0, n_genes, step):
            stop = min(start + step, n_genes)
            block = m[start:stop]
            block = block.toarray() if sp.issparse(block) else np.ascontiguousarray(block)
            if as_int and block.dtype.kind not in "iu":
                block = block.astype(np.int64)
            _write_rows(fh, genes[start:stop], block, sep, lookup)


def _write_rows(
    fh: IO[str], names: list[str], block: np.ndarray, sep: str, lookup: list[str] | None
) -> None:
    """Write one chunk of genes: ``names[i]`` then the values of ``block[i]`` (cells)."""
    if lookup is not None:
        fmt = lookup.__getitem__
        fh.write(
            "".join(
                f"{n}{sep}{sep.join(map(fmt, row))}\n"
                for n, row in zip(names, block.tolist(), strict=True)
            )
        )
    elif block.dtype.kind in "iu":
        fh.write(
            "".join(
                f"{n}{sep}{sep.join(map(str, row))}\n"
                for n, row in zip(names, block.tolist(), strict=True)
            )
        )
    else:  # floats: pandas writes the shortest text that reads back exactly
        text = pd.DataFrame(block).to_csv(
            sep=sep, header=False, index=False, lineterminator="\n", na_rep="nan"
        )
        fh.write(
            "".join(f"{n}{sep}{line}\n" for n, line in zip(names, text.splitlines(), strict=True))
        )


def _quote(name: str, sep: str) -> str:
    """CSV-quote a name when it holds the separator, a quote or a line break."""
    if sep in name or any(c in name for c in '"\r\n') or name != name.strip():
        return '"' + name.replace('"', '""') + '"'
    return name


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())
