"""The file pipeline: impute a file by blocks of cells and stream the result to a new file.

:func:`impute_file` is :func:`screpair.impute` for data larger than memory: the same fit and the
same numbers (up to float32 rounding of the stored layers), with the input read by blocks of
rows and every output layer written block by block (:func:`screpair._chunks.stream_store`).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._chunks import (
    DEFAULT_CHUNK_ROWS,
    ROW_MULTIPLE,
    CountsFile,
    TotalsPass,
    as_float64,
    check_chunk_rows,
    copy_other_elements,
    element_keys,
    gene_stats,
    open_rows,
    progress_bar,
    read_all,
    read_stored,
    store_format,
    stream_store,
)
from .._logging import get_logger, log_task
from .._parallel import on_cluster
from .._utils import (
    RNGLike,
    check_layer_name,
    check_not_input_layer,
    check_output_keys,
    jsonable,
    var_names,
)
from ._api import _Job, _scatter, make_estimator, quiet_estimator
from ._base import BaseImputer
from ._genes import check_genes, parse_genes, select_genes

logger = get_logger(__name__)

#: default memory budget: this fraction of the machine's physical memory
DEFAULT_MEMORY_FRACTION = 0.5
#: share of the budget that one block's working arrays may take (sets the default chunk_rows)
BLOCK_SHARE = 0.1
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def total_memory() -> int:
    """Physical memory of the machine in bytes (``os.sysconf``; ``/proc/meminfo`` as a fallback)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    msg = "cannot tell the machine's memory; pass max_memory (CLI: --max-memory)."
    raise RuntimeError(msg)


def parse_bytes(value) -> int:
    """Bytes from ``8G``, ``500M``, ``1.5GB``, ``2TiB`` or a number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        text = text.removesuffix("ib").removesuffix("b") if text[-1:] == "b" else text
        unit = text[-1:] if text[-1:] in _UNITS and not text[-1:].isdigit() else ""
        try:
            n = float(text[: len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            n = float("nan")
    if not np.isfinite(n) or n <= 0:
        msg = f"max_memory must be a positive size such as '8G' or '500M', got {value!r}."
        raise ValueError(msg)
    return int(n)


def memory_budget(max_memory=None) -> int:
    """The budget in bytes: ``max_memory``, or :data:`DEFAULT_MEMORY_FRACTION` of the RAM."""
    if max_memory is None:
        return int(DEFAULT_MEMORY_FRACTION * total_memory())
    return parse_bytes(max_memory)


def in_memory_bytes(n_obs: int, n_vars: int, nnz: int, n_layers: int = 1) -> int:
    """A rough peak of :func:`screpair.impute` on these counts: the counts as read (float32 CSR),
    validated (float64 CSR) and subset (another copy), the dense float32 output layers and one
    dense float64 working matrix of the method."""
    return int(nnz * (8 + 12 + 12) + n_obs * n_vars * (4 * n_layers + 8))


def default_chunk_rows(n_vars: int, budget: int) -> int:
    """Cells per block: one block's dense float64 working arrays (about four of them, over all
    genes) take :data:`BLOCK_SHARE` of the budget; a multiple of
    :data:`~screpair._chunks.ROW_MULTIPLE` (256) from 256 to :data:`DEFAULT_CHUNK_ROWS`."""
    rows = int(BLOCK_SHARE * budget / (max(n_vars, 1) * 8 * 4)) // ROW_MULTIPLE * ROW_MULTIPLE
    return max(ROW_MULTIPLE, min(DEFAULT_CHUNK_ROWS, rows))


def _check_batch_rows(est: BaseImputer, rows: int, n_obs: int) -> None:
    """Warn when blocks of ``rows`` cells (of ``n_obs``) split the prediction batches of ``est``
    (the pair methods: ``_predict_batch`` cells), each of which is then computed whole by both
    blocks that hold part of it: up to ``(ceil(rows / batch) + 1) * batch / rows`` times the
    work."""
    batch = getattr(type(est), "_predict_batch", None)
    if batch and rows % batch and rows < n_obs:
        extra = (-(-rows // batch) + 1) * batch / rows
        logger.warning(
            "chunk_rows=%d is not a multiple of %s's prediction batch of %d cells: a batch split "
            "by two blocks is computed whole by both (up to %.2fx the prediction work); a "
            "multiple of %d avoids it", rows, est.name, batch, extra, batch)


def format_bytes(n: float) -> str:
    """``n`` bytes as "1.2 GB" or "300 MB"."""
    return f"{n / 2**30:.1f} GB" if n >= 2**28 else f"{n / 2**20:.0f} MB"


def _names(var: pd.DataFrame) -> pd.Index:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the in-memory path warns once, from get_counts' caller
        return var_names(AnnData(var=var))


def impute_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    method: str | BaseImputer = "alra",
    *,
    layer: str | None = None,
    key_added: str | None = None,
    genes: str | Sequence[str] | None = None,
    chunk_rows: int | None = None,
    max_memory: int | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    transpose: bool | None = None,
    client=None,
    rng: RNGLike = 0,
    **params,
) -> dict:
    """Impute the counts of a file by blocks of cells, streaming the result to a new file.

    The input (``.h5ad`` or ``.zarr``; other formats are read into memory first, as
    :func:`screpair.read` reads them) is read by blocks of ``chunk_rows`` cells, each validated as
    :func:`screpair.impute` validates the whole matrix.

    *The fit.* A method whose fit reads a sample of cells (``BaseImputer._fit_rows``: ``alra``
    and ``saver`` above ``n_fit_cells``; ``dae``, ``vae`` and ``diffusion`` above
    ``n_train_cells``; ``cnn`` above both ``n_dropout_cells`` and ``n_train_cells``, its own
    dropout model fitted, no ``groupby``: the union of the two samples) is fitted from those
    rows alone: one streaming pass over the blocks
    finds the cells and genes with counts and all cells' totals (library sizes, per-gene sums
    of the library-normalized counts: ``ctx.totals``), then only the sample's rows are read
    and validated (the check for rounded normalized values is judged on them), and the
    posterior pass reads and validates every block again. The fit's memory is then that of
    the sample, not of the data, and its numbers are those of :func:`screpair.impute` (which
    fits on the same rows of its matrix in memory). Otherwise (fewer cells than the sample
    size; ``knn``, which is transductive and needs every cell; a method with its own
    public fit or one reading another layer, e.g. cnn's ``dropout_layer``) the method is
    fitted on the validated counts of all cells, held in memory as one sparse CSR matrix
    (float64 values: 12 bytes per stored count; for a method with ``compact_counts``, ``knn``,
    the values in the narrowest type that holds them exactly, uint16 for counts up to 65,535:
    6 bytes; never densified by this pipeline). Its cells and genes without counts are dropped
    from that matrix in place (no copy: the counts are held once), and the output's ``X`` and
    the ``hvg:N`` statistics then read the store again. The log says which path was taken and why;
    ``uns[key]["fit_cells_read"]`` is the sample's size (``None``: all cells).

    Its posterior is then computed block by
    block for methods whose output per cell depends only on that cell's row and the fitted state
    (``posterior_by_rows``: ``alra``, ``knn``, ``saver``, ``cnn``, ``diffusion``, ``dae``,
    ``vae``; cnn, diffusion, dae and vae train on at most ``n_train_cells`` cells, cnn fits its
    dropout model on at most ``n_dropout_cells``; diffusion's repair noise is laid out by fixed
    blocks of cells, so its blocks too equal the in-memory output for any ``chunk_rows``); the
    others (a cnn model saved without its dropout model) compute it once for all cells, which is
    then written out by blocks: their memory is not bounded by ``chunk_rows`` (the log says
    so). What the method
    itself holds while fitting (e.g. a dense low-rank reconstruction) is the method's.

    The output file is written block by block, never assembled in memory, atomically (a
    temporary file or directory next to ``out_path``, renamed at the end; an error or Ctrl-C
    leaves the old file or none). It holds ``obs`` and ``var`` of the input (``var`` restricted to
    the output genes), ``X``: the input counts of those genes (CSR, float32), and
    ``layers[key_added]`` (float32: dense, chunked by rows, or CSR where the method's output is
    sparse), ``layers[f"{key}_var"]`` / ``layers["dropout_prob"]`` where the method has them, and
    ``uns[key]`` as :func:`screpair.impute` writes it, and the rest of the input as
    :func:`screpair.impute` keeps it: its other layers and ``raw`` copied block by block,
    ``obsm``, ``obsp``, ``varm``, ``varp`` and ``uns`` (:func:`screpair._chunks.copy_other_elements`;
    with ``genes``, the layers and ``varm`` / ``varp`` restricted to the output genes). An input
    that already holds an output layer or ``uns[key]`` is refused without ``overwrite``, as by
    ``impute``; ``X`` is the counts read (with ``layer=``, not the input's ``X``).

    Cells and genes without counts are set aside and returned unchanged, as by ``impute``; the
    layers equal ``impute``'s (restricted to the output genes) up to float32 rounding.

    Parameters
    ----------
    in_path
        Input ``.h5ad`` / ``.zarr`` (or any format :func:`screpair.read` takes); never modified.
    out_path
        Output ``.h5ad`` or ``.zarr``; an existing one (or the input itself) is replaced only
        with ``overwrite=True``.
    method
        A registered method name or an estimator.
    layer
        Layer holding the raw counts (``None``: ``X``; ``"raw"``: ``raw/X``), read by rows.
    key_added
        Name of the output layer; defaults to the method name.
    genes
        The genes of the output file: ``"hvg:N"`` (the ``N`` most variable genes by dispersion,
        from a streaming pass over all cells), a boolean ``var`` column, a gene name or a list of
        names (kept in the file's gene order). The method still sees every gene. ``None``: all.
    chunk_rows
        Cells per block; default from ``max_memory`` (:func:`default_chunk_rows`).
    max_memory
        Memory budget (bytes or ``"8G"``); default :data:`DEFAULT_MEMORY_FRACTION` of the RAM.
        It sets the default ``chunk_rows``; the fit's sparse counts (all cells', or the
        sample's) and what a method holds are not limited by it.
    overwrite
        Replace an existing output.
    progress
        A progress bar over the blocks (cells/s). ``False`` also turns off the method's own
        bars (SAVER's gene batches, training epochs) unless ``params`` set them, when
        ``method`` is a name (an estimator passed in keeps its settings).
    transpose
        Text input only (read into memory first): as :func:`screpair.read`.
    client
        A ``dask.distributed.Client``: the fit is driven by this process, with its
        independent blocks (SAVER's gene batches, the dropout model's EM blocks:
        :func:`screpair._parallel.map_blocks`) and the ``hvg:N`` gene statistics pass on the
        cluster's workers; the posterior by row blocks runs on the workers, each reading its
        block from ``in_path`` (an ``.h5ad`` / ``.zarr`` path the workers can read) and writing
        its output block into ``out_path``, which must be a ``.zarr`` store (see
        :mod:`screpair.methods._dask`). For ``posterior_by_rows`` methods only; the output
        equals the run without a client bit for bit. ``None``: no Dask (not imported).
    rng
        Seed or ``numpy.random.Generator`` for methods with randomness.
    **params
        Method parameters.

    Returns
    -------
    The record written to ``uns[key]`` (method, params, seconds, ``chunk_rows``, ...).
    """
    from .. import __version__
    from ..io import check_output_path, read

    start_all = time.perf_counter()
    src_path = Path(in_path).expanduser()
    if not src_path.exists():
        msg = f"no such file or directory: '{in_path}'"
        raise FileNotFoundError(msg)
    out = check_output_path(out_path, inputs=[src_path], overwrite=overwrite,
                            formats=("h5ad", "zarr"))
    if chunk_rows is not None:
        chunk_rows = check_chunk_rows(chunk_rows)
    budget = memory_budget(max_memory)
    spec = parse_genes(genes)
    est = make_estimator(method, rng=rng, **params)
    if not progress and isinstance(method, str):  # an estimator passed in keeps its settings
        quiet_estimator(est, params)
    key = key_added or est.name
    for k in (key, f"{key}_var"):
        check_layer_name(k, "key_added")
        check_not_input_layer(k, layer, "key_added")
    extra = getattr(est, "dropout_layer", None)  # a layer the method reads (cnn)
    if extra is not None:
        check_layer_name(extra, "dropout_layer")

    if client is not None:
        from ._dask import check_client, check_run

        check_client(client)
        check_run(est, src_path, out)
    if store_format(src_path) and transpose is not None:
        msg = "transpose= applies to text input only."
        raise ValueError(msg)
    # the temporary counts file of a fit that reads a sample but every cell's counts (knn)
    # is removed at the end, an error or Ctrl-C included
    with contextlib.ExitStack() as cleanup:
        data = src_path if store_format(src_path) else read(src_path, transpose=transpose)
        source = open_rows(data, layer)
        with source, contextlib.ExitStack() as stack:
            names = _names(source.var)
            var = source.var.set_axis(names)
            spec = check_genes(spec, var, names)
            _check_free(element_keys(data), est, key, layer, overwrite)  # carried-over slots
            n_obs, n_vars = source.shape
            rows = chunk_rows or default_chunk_rows(n_vars, budget)
            _check_batch_rows(est, rows, n_obs)
            logger.info(
                "chunked path: %d cells x %d genes in blocks of %d cells; budget %s "
                "(in memory would need about %s)",
                n_obs, n_vars, rows, format_bytes(budget),
                format_bytes(in_memory_bytes(n_obs, n_vars, source.nnz())))
            other = None if extra is None else open_rows(data, extra)  # exists? before the work
            if other is not None:
                stack.callback(other.close)
            if other is not None and other.shape != source.shape:
                msg = f"layer {extra!r} has shape {other.shape}, the counts {source.shape}."
                raise ValueError(msg)
            job, x = None, None
            why = _fit_path(est, n_obs, extra_layer=other is not None,
                            client=client is not None)
            if why is None:  # the fit reads a sample of rows: only those are held
                totals = None
                if client is not None:  # the streaming pass by the workers, from the store
                    def totals():
                        from ._dask import row_totals

                        return row_totals(client, src_path, layer, n_obs, n_vars, rows,
                                          progress=progress)
                job = _sample_job(est, source, rows, names, progress, totals,
                                  spill=(out.parent, cleanup))
                if job is None:
                    why = (f"{est.name!r} reads every cell: the cells with counts are not more "
                           "than its sample size")
            if job is None:
                compact = bool(est.compact_counts)
                logger.info("fit on all cells' counts, held in memory as sparse CSR (%s%s): %s",
                            format_bytes(source.nbytes_sparse(compact=compact)),
                            ", values in the narrowest exact type" if compact else "", why)
                with log_task(f"reading '{src_path.name}' by blocks of {rows} cells", logger):
                    x = read_all(source, rows, progress=progress, compact=compact)
                layers = {}
                if other is not None:  # read as stored, in memory (the method needs all of it)
                    with other:
                        layers[extra] = read_stored(other, rows)
                job = _Job.prepare(est, x, obs=source.obs, var=source.var, names=names,
                                   layers=layers, owned=True)
                if job.x is not x:  # cells or genes without counts: x is spent (held once, in
                    x = None        # the job); the output's X and the gene statistics: the store
            obs = source.obs
        if not (job.cells.all() and job.genes.all()):
            warnings.warn(
                f"{int((~job.cells).sum())} cell(s) and {int((~job.genes).sum())} gene(s) have no "
                "counts; they are set aside and returned unchanged.", UserWarning, stacklevel=2)
        if client is None and x is not None:
            def stats():
                return gene_stats(open_rows(x, validated=True), rows)
        elif client is None:  # not all counts in memory as read: the pass reads the store
            def stats():
                with open_rows(data, layer) as again:
                    return gene_stats(again, rows, progress=progress)
        else:  # the same pass by the workers, each reading its blocks from the store
            def stats():
                from ._dask import gene_stats as dask_gene_stats

                return dask_gene_stats(client, src_path, layer, n_obs, n_vars, rows,
                                       progress=progress)
        with log_task("selecting the output genes", logger):
            mask = select_genes(spec, var, names, stats)
        out_cols = np.flatnonzero(mask)

        start = time.perf_counter()
        n_sub, g_sub = job.x.shape
        mapper = None
        if client is not None:
            from ._dask import map_on_cluster as mapper
        with log_task(f"fitting {est.name!r} on {n_sub} cells x {g_sub} genes", logger), \
                on_cluster(client, mapper):  # the fit's block maps on the workers (a client given)
            job.fit()
        post_all = None
        if not job.by_rows:
            logger.warning(
                "%s: the posterior needs all cells at once (posterior_by_rows is False); it is "
                "computed in one piece and only written by blocks: memory not bounded by chunk_rows",
                est.name)
            with log_task(f"posterior of {est.name!r} for all cells", logger):
                post_all = job.posterior()

        out_var = source.var.iloc[out_cols].copy()
        out_var.index = names[out_cols]
        record = {}
        with stream_store(out, obs=obs, var=out_var, chunk_rows=rows) as w, \
                log_task(f"posterior and writing by blocks of {rows} cells -> '{out}'", logger):
            if client is None and x is not None:
                _write_blocks(w, job, _slices(x, rows), n_obs, post_all, key, out_cols, rows,
                              progress)
            elif client is None:  # each block read from the store again, validated, imputed
                with open_rows(data, layer) as again:
                    _write_blocks(w, job, again.blocks(rows), n_obs, post_all, key, out_cols, rows,
                                  progress)
            else:
                from ._dask import write_blocks

                dask_info = write_blocks(client, w, job, src_path, layer, key, out_cols, rows,
                                         progress)
            seconds = time.perf_counter() - start
            record = {
                "method": est.name,
                "params": jsonable(est.get_params(deep=False)),
                "layer": jsonable(layer),
                "version": __version__,
                "seconds": float(seconds),
                "n_cells_set_aside": int((~job.cells).sum()),
                "n_genes_set_aside": int((~job.genes).sum()),
                "chunk_rows": int(rows),
                "posterior_by_rows": bool(job.by_rows),
                "fit_cells_read": None if job.sample is None else int(job.sample.size),
                "input": str(src_path),
            }
            if client is not None:
                record["dask"] = dask_info
            if spec is not None:
                record["genes"] = spec.text
                record["n_genes_imputed"] = int(mask.sum())
            w.uns[key] = record
            copy_other_elements(data, w, cols=None if len(out_cols) == n_vars else out_cols,
                                skip_layers=w.layer_names(), skip_uns={key}, chunk_rows=rows,
                                progress=progress)
        logger.info("impute_file: %d cells x %d genes -> '%s' (%.1f s in all)", n_obs, len(out_cols),
                    out, time.perf_counter() - start_all)
        return record


def _fit_path(est: BaseImputer, n_obs: int, *, extra_layer: bool,
              client: bool = False) -> str | None:
    """``None`` when the fit of ``est`` on ``n_obs`` cells reads only a sample of them
    (:meth:`BaseImputer._fit_rows`), which :func:`impute_file` then reads alone; else why the
    fit needs all cells' counts in memory. ``client``: a Dask client runs the posterior."""
    if not est._is_template():
        return f"{est.name!r} validates and fits an AnnData itself (its own public fit)"
    if extra_layer:
        return f"{est.name!r} reads the layer {est.dropout_layer!r} of every cell"
    if client and est.reads_all_counts:
        return (f"{est.name!r} averages any cell's counts, which the Dask workers of its "
                "posterior get from memory")
    if type(est)._fit_rows is BaseImputer._fit_rows:
        return (f"{est.name!r} fits on every cell (it takes no sample of rows"
                f"{'; transductive' if est.transductive else ''})")
    if est._fit_rows(n_obs) is None:
        return f"{est.name!r} reads every cell: {est._why_every_row(n_obs)}"
    return None


def _sample_job(est: BaseImputer, source, rows: int, names: pd.Index,
                progress: bool, totals=None, spill=None) -> _Job | None:
    """The job of a fit on a sample of rows: one streaming pass over ``source`` (which cells
    and genes have counts, and the :class:`~screpair._chunks.RowTotals` of all cells), then
    the sample's rows alone read and validated (their genes with counts; checked for rounded
    normalized values as :func:`screpair.impute` checks the whole matrix). ``None`` when the
    cells with counts are too few for a sample (the fit then reads every cell). ``totals``:
    a callable returning the pass's :class:`~screpair._chunks.TotalsPass` when another takes
    it (the workers of a Dask client, :func:`screpair.methods._dask.row_totals`).

    For a method with ``reads_all_counts`` (knn) the pass also writes every block into a
    :class:`~screpair._chunks.CountsFile` in the folder ``spill[0]`` (the output's), closed
    (removed) by the ``contextlib.ExitStack`` ``spill[1]``; the fit gets it as ``ctx.counts``."""
    n_obs, n_vars = source.shape
    counts = None
    if totals is not None:  # the same pass elsewhere (a Dask cluster's workers)
        acc = totals()
    else:
        acc = TotalsPass(n_obs, n_vars)
        if est.reads_all_counts and est._fit_rows(n_obs) is not None:
            counts = CountsFile(spill[0], n_obs, n_vars)
            spill[1].callback(counts.close)
            logger.info("every cell's counts go to a temporary file, read back by rows: %s "
                        "(removed at the end)", counts.dir)
        for s, _, xb in source.blocks(rows, progress=progress, desc="counting cells and genes"):
            acc.add(s, xb)
            if counts is not None:
                counts.add(s, xb)
    cells, genes = acc.cells, acc.genes
    if not cells.any():
        where = f"layer {source.layer!r}" if source.layer is not None else "the count matrix"
        msg = f"{where} is all zeros; there is nothing to impute."
        raise ValueError(msg)
    kept = np.flatnonzero(cells)
    sample = est._fit_rows(kept.size)
    if sample is None:
        if counts is not None:
            counts.close()
        return None
    logger.info("fit on a sample of rows: %s reads %d of the %d cells with counts, read "
                "again from the store (the posterior reads every block again)", est.name,
                sample.size, kept.size)
    with log_task(f"reading the fit's {sample.size} cells", logger):
        x = read_all(source, rows, rows=kept[sample], cols=np.flatnonzero(genes),
                     progress=progress)
    return _Job.from_sample(est, x, sample, acc.result().take(cells, genes), cells=cells,
                            genes=genes, obs=source.obs, var=source.var, names=names,
                            counts=None if counts is None else counts.finish().take(cells, genes))


def _check_free(taken: dict, est: BaseImputer, key: str, layer: str | None,
                overwrite: bool) -> None:
    """Refuse, as :func:`screpair.impute` does, output layers / ``uns[key]`` that the input
    already holds (they are carried over into the output) unless ``overwrite``."""
    from types import SimpleNamespace

    outputs = [key] + ([f"{key}_var"] if est.has_var else [])
    if est.has_dropout_prob and getattr(est, "dropout_layer", None) != "dropout_prob":
        outputs.append("dropout_prob")
    have = SimpleNamespace(layers=taken["layers"], uns=taken["uns"], obs=(), obsm=())
    check_output_keys(have, outputs, layer=layer, overwrite=overwrite, uns=(key,))


def _slices(x, rows: int):
    """``(start, stop, x[start:stop])`` for consecutive blocks of ``rows`` rows of ``x``, as
    float64 (``x`` may hold its counts compactly: :func:`~screpair._chunks.read_all`)."""
    for s in range(0, x.shape[0], rows):
        e = min(s + rows, x.shape[0])
        yield s, e, as_float64(x[s:e])


def _write_blocks(w, job: _Job, blocks, n_obs: int, post_all, key: str, out_cols: np.ndarray,
                  rows: int, progress: bool) -> None:
    """Posterior (per block, or sliced from ``post_all``) and counts of each block of cells
    (``blocks``: ``(start, stop, validated counts)`` of consecutive blocks of ``rows`` cells),
    scattered back to all cells and genes, restricted to ``out_cols``, appended to ``w``. The
    posterior of a block is the job's (:meth:`_Job.posterior`) when it holds all counts, else
    computed from the block's counts (:meth:`_Job.block_posterior`)."""
    n_vars = job.genes.size
    k = len(out_cols)
    w.matrix("X", k, sparse=True)
    names = {"mean": key, "var": f"{key}_var", "dropout_prob": "dropout_prob"}
    kinds: dict[str, bool] | None = None  # layer -> sparse, once the first posterior is known
    pending = 0  # rows of leading blocks without counts, written once the kinds are known
    bar = progress_bar(n_obs, "imputing", progress and n_obs > rows)
    try:
        for s, e, xb in blocks:
            w.append("X", xb if k == n_vars else xb[:, out_cols])
            i0, i1 = (int(v) for v in np.searchsorted(job.rows, [s, e]))
            if i1 == i0:  # no cell with counts in this block
                if kinds is None:
                    pending += e - s
                else:
                    _zeros(w, kinds, e - s, k)
                bar.update(e - s)
                continue
            if post_all is not None:
                post = None
            elif job.sample is None:
                post = job.posterior(i0, i1)
            else:
                post = job.block_posterior(xb, s, e, i0, i1)
            parts = {}
            for field, name in names.items():
                m = getattr(post_all if post is None else post, field)
                if m is None:
                    continue
                if post is None:
                    m = m[i0:i1]
                full = _scatter(m, job.cells[s:e], job.genes, (e - s, n_vars))
                parts[name] = full if k == n_vars else full[:, out_cols]
            if kinds is None:
                kinds = {name: sp.issparse(m) for name, m in parts.items()}
                for name, sparse in kinds.items():
                    w.matrix(f"layers/{name}", k, sparse=sparse)
                _zeros(w, kinds, pending, k)
            for name, m in parts.items():
                w.append(f"layers/{name}", m)
            bar.update(e - s)
    finally:
        bar.close()


def _zeros(w, kinds: dict[str, bool], n: int, k: int) -> None:
    if n:
        for name, sparse in kinds.items():
            w.append(f"layers/{name}", sp.csr_matrix((n, k)) if sparse else np.zeros((n, k)))
