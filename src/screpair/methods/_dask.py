"""The chunk-wise transform of :func:`screpair.impute_file` on a Dask cluster.

:func:`screpair.impute_file` with ``client=`` (CLI: ``--scheduler``) fits on the client process
as without it, then hands the posterior by row blocks to the cluster: the fitted estimator is
scattered to every worker once (``client.scatter(..., broadcast=True)``); each task reads its own
block of cells from the input store (``.h5ad`` / ``.zarr`` path: workers must see the same file
system), computes the block's posterior and writes it straight into the ``.zarr`` output
store, so no block passes through the client.

The output store is the temporary directory of :func:`screpair._chunks.stream_store`, renamed
onto the output only when every task has finished. Dense layers are created with their final
shape and chunks aligned to the row blocks, so block writes are independent and idempotent (a
task that is run again after a lost worker writes the same values). Sparse matrices (``X``, the
input counts) cannot be filled in parallel by rows: each task saves its block's CSR arrays as
parts inside the temporary store, and a second round of tasks copies them into the final
arrays by whole zarr chunks. A failing task, an interrupt or a lost client leaves the old
output or none; a re-run starts clean (the temporary store of an earlier run is not reused).

Before the posterior, the run's other independent work goes to the workers too: the streaming
passes, each block read from the input by a worker and the float sums chained in row order
(:func:`_chained_pass`): the gene statistics of ``genes="hvg:N"`` (:func:`gene_stats`) and, for
a fit on a sample of rows, the cells and genes with counts and all cells' totals
(:func:`row_totals`; the sample's rows are then read by the client, which fits on them); and, while the fit runs inside
:func:`screpair._parallel.on_cluster`, the fit's block maps (:func:`map_on_cluster`: SAVER's
gene batches, the dropout model's EM blocks), whose results the fit combines in block order.
Every value sent to the workers is realigned there (:class:`_Aligned`).

The posteriors of the ``posterior_by_rows`` methods (alra, knn, saver, cnn, dae, vae,
diffusion) depend only on their rows and the fitted state (diffusion's repair noise is drawn
per fixed block of cells, from the fitted seed), never on the worker or the order in which
blocks finish, so any number of workers gives the single-process output bit for bit (the same
row blocks are used; no per-worker seed).

:func:`screpair.impute` (in memory) takes no client: its data already live in the calling
process, so spreading the posterior would send every block to the workers and every result
back through it; :func:`screpair.impute_file` is the distributed path.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .._chunks import _element_key, _matrix_element, check_block, open_store, progress_bar
from .._logging import get_logger
from ._api import _Job, _scatter, _subset

logger = get_logger(__name__)

#: entries per chunk of the sparse arrays (data, indices, indptr), as the single-process writer
SPARSE_CHUNK = 2**18
#: seconds to wait, after a failure, for tasks already running to stop before the temporary
#: store is removed (a running task cannot be stopped, and would write into a removed store)
DRAIN_TIMEOUT = 120.0
#: seconds :func:`connect` waits for the scheduler
CONNECT_TIMEOUT = 10.0
_PARTS = ".screpair-parts"
_ADDRESS = re.compile(r"^[\w.\-\[\]:]+:\d+$")  # host:port without a protocol


def connect(scheduler: str, *, timeout: float | None = None):
    """A ``dask.distributed.Client`` for ``scheduler``: an address (``tcp://HOST:PORT``, or
    ``HOST:PORT``) or the path of a scheduler file (``dask scheduler --scheduler-file``).
    Raises ``ValueError`` with one line when it cannot be reached within ``timeout`` seconds
    (default :data:`CONNECT_TIMEOUT`)."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        from distributed import Client
    except ImportError as e:
        msg = "--scheduler needs dask.distributed: pip install 'screpair[distributed]'."
        raise ImportError(msg) from e
    text = str(scheduler).strip()
    if "://" in text or _ADDRESS.match(text):
        kwargs = {"address": text}
        what = f"the Dask scheduler at '{text}'"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            msg = (f"--scheduler {text!r} is neither an address (tcp://HOST:PORT) nor an "
                   "existing scheduler file.")
            raise ValueError(msg)
        kwargs = {"scheduler_file": str(path)}
        what = f"the Dask scheduler of '{text}'"
    try:
        return Client(**kwargs, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - OSError, TimeoutError, ValueError (bad address)
        detail = " ".join(str(e).split()) or type(e).__name__
        msg = (f"cannot reach {what} within {timeout:g} s ({detail}); start one with "
               "`dask scheduler` or check the address.")
        raise ValueError(msg) from None


def check_client(client) -> None:
    """Raise unless ``client`` is a ``dask.distributed.Client`` (by its methods: no import)."""
    if not all(hasattr(client, a) for a in ("submit", "scatter", "run", "scheduler_info")):
        msg = f"client must be a dask.distributed.Client, got {type(client).__name__}."
        raise TypeError(msg)


def check_run(est, src_path: Path, out: Path) -> None:
    """What a distributed run needs that can be checked before the work (and before
    connecting): a ``posterior_by_rows`` method, an ``.h5ad`` / ``.zarr`` input path and a
    ``.zarr`` output."""
    from .._chunks import store_format
    from ..io import output_format

    if not (est._is_template() and est.posterior_by_rows):
        msg = (f"method {est.name!r} computes its posterior for all cells at once "
               "(posterior_by_rows is False), so it cannot be spread over a Dask cluster; run "
               "it without a client (CLI: without --scheduler).")
        raise ValueError(msg)
    if not store_format(src_path):
        msg = (f"with a Dask client the input must be an .h5ad file or a .zarr store that the "
               f"workers read, got '{src_path}'.")
        raise ValueError(msg)
    if output_format(out)[0] != "zarr":
        msg = (f"with a Dask client the output must be a .zarr store (workers write their "
               f"blocks into it in parallel; HDF5 cannot), got '{out}'.")
        raise ValueError(msg)


@dataclass
class _Fitted:
    """What every task needs, scattered once: the fitted estimator and the data's layout."""

    est: Any
    ctx: Any  # DataContext of the cells and genes with counts (rows set per block)
    cells: np.ndarray  # masks over all cells / genes
    genes: np.ndarray
    out_cols: np.ndarray | None  # output genes (None: all)
    n_vars: int
    src: str
    layer: str | None
    root: str  # the temporary output store
    names: dict[str, str]  # posterior field -> output layer
    sparse: dict[str, bool]  # output matrix ("X", "layers/<name>") -> stored as CSR


# ------------------------------------------------------------------------------ the run


def write_blocks(client, w, job: _Job, src_path: Path, layer: str | None, key: str,
                 out_cols: np.ndarray, rows: int, progress: bool) -> dict:
    """Compute the posterior of ``job`` (fitted) by blocks of ``rows`` cells on the cluster of
    ``client`` and write it, with the input counts of ``out_cols``, into the zarr store of the
    :class:`~screpair._chunks.StoreWriter` ``w``. Returns ``{"scheduler", "n_workers"}``."""
    if not job.by_rows:  # a fitted state that needs all cells at once (check_run said yes)
        msg = (f"the fitted {job.est.name!r} needs all cells at once (posterior_by_rows is "
               "False); run it without a Dask client.")
        raise ValueError(msg)
    root = Path(w.root.store.root)
    n_obs, n_vars = job.cells.size, job.genes.size
    k = len(out_cols)
    names = {"mean": key, "var": f"{key}_var", "dropout_prob": "dropout_prob"}
    probe = job.probe()  # one cell, on the client: which layers, dense or sparse
    names = {f: n for f, n in names.items() if getattr(probe, f) is not None}
    sparse = {"X": True} | {f"layers/{n}": sp.issparse(getattr(probe, f))
                            for f, n in names.items()}
    for name, is_sparse in sparse.items():
        if not is_sparse:
            _create_dense(w.root, name, n_obs, k, rows)
    (root / _PARTS).mkdir()
    fitted = _Fitted(est=job.est, ctx=job.ctx, cells=job.cells, genes=job.genes,
                     out_cols=None if k == n_vars else out_cols, n_vars=n_vars,
                     src=str(src_path.resolve()), layer=layer, root=str(root), names=names,
                     sparse=sparse)
    info = client.scheduler_info()
    n_workers = len(info.get("workers", {}))
    logger.info("Dask: %d worker(s) at %s; scattering the fitted %r", n_workers,
                info.get("address", "?"), job.est.name)
    token = f"screpair-{uuid.uuid4().hex[:8]}"
    spans = [(s, min(s + rows, n_obs)) for s in range(0, n_obs, rows)]
    blocks = {b: (b, s, e, *(int(v) for v in np.searchsorted(job.rows, [s, e])))
              for b, (s, e) in enumerate(spans)}
    futures: list = []
    try:
        nnz = _run_blocks(client, fitted, blocks, spans, token, futures,
                          progress and n_obs > rows)
        for name, is_sparse in sparse.items():
            if is_sparse:
                futures += _gather_sparse(client, w.root, name, spans, nnz[name], k, token)
        _wait(futures)
        futures.clear()
    except BaseException:
        _abort(client, futures, token)
        raise
    shutil.rmtree(root / _PARTS)
    for name, is_sparse in sparse.items():  # declared complete: the writer knows its layers
        if name != "X":
            w.declare_written(name, k, sparse=is_sparse)
    return {"scheduler": str(info.get("address", "")), "n_workers": n_workers}


#: times the fitted state is scattered again when every worker holding it was lost
MAX_SCATTERS = 3


def _run_blocks(client, fitted: _Fitted, blocks: dict, spans: list, token: str, futures: list,
                progress: bool) -> dict[str, list[int]]:
    """Run the block tasks (a bar over cells); the first failure is raised. Returns the stored
    entries of each sparse matrix per block.

    A lost worker's blocks are rerun by Dask. The scattered fitted state is data, not a task:
    when every worker that held it is lost (Dask's memory manager may keep a single copy), the
    tasks that still need it are cancelled; it is then scattered again and those blocks
    submitted again (their writes are idempotent), at most :data:`MAX_SCATTERS` times."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    nnz: dict[str, list[int]] = {}
    bar = progress_bar(spans[-1][1], "imputing (dask)", progress)
    todo = dict(blocks)
    try:
        for attempt in range(MAX_SCATTERS):
            shared = client.scatter([_Aligned(fitted)], broadcast=True, hash=False)[0]
            futures[:] = [client.submit(_run_aligned, _block_task, shared, *args, pure=False,
                                        key=f"{token}-block-{b}-{attempt}")
                          for b, args in todo.items()]
            for fut in as_completed(list(futures)):
                try:
                    b, counts = fut.result()
                except FutureCancelledError:  # its fitted state was lost with its workers
                    continue
                todo.pop(b)
                for name, n in counts.items():
                    nnz.setdefault(name, [0] * len(spans))[b] = n
                bar.update(spans[b][1] - spans[b][0])
            futures.clear()
            if not todo:
                return nnz
            logger.warning("Dask: the fitted state was lost with its workers; scattering it "
                           "again for %d block(s)", len(todo))
    finally:
        bar.close()
    msg = (f"Dask: the fitted state was lost with its workers {MAX_SCATTERS} times; "
           f"{len(todo)} block(s) not written.")
    raise RuntimeError(msg)


def _wait(futures: list) -> None:
    """Wait for ``futures``; the first failure is raised."""
    from distributed import wait

    wait(futures)
    for fut in futures:
        fut.result()


def _abort(client, futures: list, token: str) -> None:
    """Cancel the run's tasks and wait (up to :data:`DRAIN_TIMEOUT`) until those already
    running have stopped, so that none writes into the store after it is removed."""
    if futures:
        client.cancel(futures, force=True)
    end = time.monotonic() + DRAIN_TIMEOUT
    told = False
    while time.monotonic() < end:
        try:
            live = client.run(_live_tasks, token, on_error="ignore")
        except Exception:  # noqa: BLE001 - scheduler gone: nothing more to wait for
            return
        n = sum(len(v) for v in live.values() if isinstance(v, list))
        if not n:
            return
        if not told:
            logger.warning("waiting for %d running Dask task(s) to stop before removing the "
                           "temporary output", n)
            told = True
        time.sleep(0.2)
    logger.warning("Dask tasks still running after %.0f s; the temporary output is removed "
                   "anyway", DRAIN_TIMEOUT)


def _live_tasks(token: str, dask_worker=None) -> list[str]:
    """On a worker: the keys of this run's tasks it still holds (running or cancelled while
    running)."""
    return [str(ts.key) for ts in dask_worker.state.tasks.values()
            if str(ts.key).startswith(token) and ts.state in ("executing", "cancelled",
                                                              "long-running", "resumed")]


# ------------------------------------------------------------------------------ tasks


def _block_task(f: _Fitted, b: int, s: int, e: int, i0: int, i1: int) -> tuple[int, dict]:
    """Rows ``s:e`` (kept cells ``i0:i1`` of the fit): read, posterior, write. Returns the
    stored entries of each sparse matrix of the block."""
    _test_fault(b)
    x = _read_block(f.src, f.layer, s, e)
    cols = f.out_cols
    parts = {"X": x if cols is None else x[:, cols]}
    k = f.n_vars if cols is None else len(cols)
    if i1 > i0:
        cells = f.cells[s:e]
        full = cells.all() and f.genes.all()
        sub = x if full else _subset(x, np.flatnonzero(cells), np.flatnonzero(f.genes))
        post = f.est._posterior_validated(sub, replace(f.ctx, rows=slice(i0, i1)))
        for field, name in f.names.items():
            m = _scatter(getattr(post, field), cells, f.genes, (e - s, f.n_vars))
            parts[f"layers/{name}"] = m if cols is None else m[:, cols]
    else:  # no cell with counts in this block: zeros, as the single-process path writes
        for name in f.names.values():
            sparse = f.sparse[f"layers/{name}"]
            parts[f"layers/{name}"] = sp.csr_matrix((e - s, k)) if sparse else np.zeros((e - s, k))
    import zarr

    root = zarr.open_group(f.root, mode="r+")  # r+: never recreates a removed store
    nnz = {}
    for name, m in parts.items():
        if f.sparse[name]:
            csr = sp.csr_matrix(m, dtype=np.float32)
            nnz[name] = int(csr.nnz)
            _save_part(f.root, name, b, csr)
        else:
            dense = m.toarray() if sp.issparse(m) else np.asarray(m)
            root[name][s:e] = dense.astype(np.float32, copy=False)
    return b, nnz


def _read_block(src: str, layer: str | None, s: int, e: int) -> sp.csr_matrix:
    """Rows ``s:e`` of the counts in the store ``src``, validated as the single-process path
    validates them (:func:`screpair._chunks.check_block`)."""
    path = Path(src)
    root = open_store(path)
    try:
        key = _element_key(root, layer, path)
        block = _matrix_element(root[key], key, path)[s:e]
        block = sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
    finally:
        if hasattr(root, "close"):
            root.close()
    return check_block(block, layer)


def _part_dir(root: str, name: str) -> Path:
    return Path(root) / _PARTS / name.replace("/", "__")


def _save_part(root: str, name: str, b: int, csr: sp.csr_matrix) -> None:
    """Save block ``b`` of the sparse matrix ``name``: its values, column indices and row
    pointers without the leading 0 (each file written whole, then renamed into place)."""
    d = _part_dir(root, name)
    if not d.parent.is_dir():  # the run was abandoned and its store removed
        msg = f"the temporary output '{root}' is gone"
        raise FileNotFoundError(msg)
    d.mkdir(exist_ok=True)
    arrays = {"data": csr.data.astype(np.float32, copy=False), "indices": csr.indices,
              "indptr": csr.indptr[1:].astype(np.int64)}
    for field, a in arrays.items():
        tmp = d / f".{field}.{b}.{os.getpid()}.npy"
        np.save(tmp, a)
        os.replace(tmp, d / f"{field}.{b}.npy")


def _create_dense(root, name: str, n_obs: int, k: int, rows: int) -> None:
    """A float32 array ``name`` of its final shape, chunked by rows so that every block of
    ``rows`` rows covers whole chunks (its blocks can be written independently)."""
    most = max(1, 2**20 // max(k, 1))  # about 4 MB chunks, as the single-process writer
    if n_obs <= rows:  # one block: any chunks
        c = min(n_obs, most)
    else:  # a divisor of rows near `most`; one chunk per block when rows has none
        c = next((rows // p for p in range(-(-rows // most), rows + 1) if rows % p == 0), rows)
        c = rows if c < most // 4 else c
    ds = root.create_array(name, shape=(n_obs, k), dtype=np.float32,
                           chunks=(max(c, 1), max(k, 1)))
    ds.attrs["encoding-type"], ds.attrs["encoding-version"] = "array", "0.2.0"


def _gather_sparse(client, root, name: str, spans: list, nnz: list[int], k: int,
                   token: str) -> list:
    """Create the CSR element ``name`` (anndata's encoding) with its final sizes and submit the
    tasks that copy the blocks' parts into it, each task a range of whole zarr chunks."""
    n_obs = spans[-1][1] if spans else 0
    counts = np.asarray(nnz, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    idx = np.int32 if max(total, k) < 2**31 else np.int64
    g = root.create_group(name)
    g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                    "shape": [int(n_obs), int(k)]})
    g.create_array("data", shape=(total,), dtype=np.float32, chunks=(SPARSE_CHUNK,))
    g.create_array("indices", shape=(total,), dtype=idx, chunks=(SPARSE_CHUNK,))
    g.create_array("indptr", shape=(n_obs + 1,), dtype=np.int64, chunks=(SPARSE_CHUNK,))
    row_starts = np.asarray([1 + s for s, _ in spans], dtype=np.int64)
    row_lengths = np.asarray([e - s for s, e in spans], dtype=np.int64)
    plans = [("data", total, offsets[:-1], counts, None),
             ("indices", total, offsets[:-1], counts, None),
             ("indptr", n_obs + 1, row_starts, row_lengths, offsets[:-1])]
    futures = []
    n_tasks = max(1, len(spans))
    for field, length, starts, lengths, adds in plans:
        span = SPARSE_CHUNK * max(1, round(length / (SPARSE_CHUNK * n_tasks)))
        for a in range(0, length, span):
            futures.append(client.submit(
                _gather_task, str(Path(root.store.root)), name, field, a, min(a + span, length), starts, lengths,
                adds, pure=False, key=f"{token}-gather-{name}-{field}-{a}"))
    return futures


def _gather_task(root: str, name: str, field: str, a: int, b: int, starts: np.ndarray,
                 lengths: np.ndarray, adds: np.ndarray | None) -> None:
    """Fill entries ``a:b`` (whole zarr chunks) of the array ``field`` of the CSR ``name`` from
    the parts of the blocks that overlap them (``adds``: the row pointers' offsets)."""
    import zarr

    arr = zarr.open_group(root, mode="r+")[name][field]
    out = np.zeros(b - a, dtype=arr.dtype)  # indptr[0] = 0
    d = _part_dir(root, name)
    first = max(0, int(np.searchsorted(starts, a, side="right")) - 1)
    for j in range(first, len(starts)):
        lo, hi = max(a, int(starts[j])), min(b, int(starts[j] + lengths[j]))
        if int(starts[j]) >= b:
            break
        if hi <= lo:
            continue
        part = np.load(d / f"{field}.{j}.npy", mmap_mode="r")
        piece = part[lo - int(starts[j]):hi - int(starts[j])]
        out[lo - a:hi - a] = piece + adds[j] if adds is not None else piece
    arr[a:b] = out


# ------------------------------------------------------------------------------ alignment


class _Aligned:
    """A value to scatter whose arrays are realigned when a worker unpickles it.

    Dask hands the numpy buffers of an unpickled object out as views of the received frames,
    at any byte offset: the arrays are not aligned to their item size (measured: offsets of
    62, 31, 33 bytes mod 64). With such arrays, SAVER's maximum correlations computed on a
    worker differed from the same batches computed here in the last bit (1 to 6 of 99 genes,
    varying from run to run); with the arrays copied to aligned memory they are identical
    (tests/test_dask.py). Which operation rounds differently on unaligned data was not pinned
    down (matmul, mean and std of unaligned copies gave the same bits in isolation), so
    every scattered value is realigned. Unpickled, this wrapper gives its value back with
    every array copied to aligned memory (:func:`_realign`), once per worker."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return _realign, (self.value,)


#: packages whose objects' attributes :func:`_realign` visits (estimators, dataclasses, sparse
#: matrices, splines, neighbour indexes; not pandas' or torch's internals)
_REALIGNED = ("screpair", "scipy", "sklearn")


def _realign(obj, _seen=None, _depth=0):
    """``obj`` with its numpy arrays aligned: unaligned arrays are copied; containers (tuple,
    list, dict) are rebuilt, the attributes of other objects (an estimator, a sparse matrix, a
    spline; objects of :data:`_REALIGNED` packages) replaced in place. Applied to values just
    unpickled on a worker (not yet shared)."""
    if isinstance(obj, _Aligned):
        return obj.value  # not serialized (an in-process cluster): nothing was unaligned
    if isinstance(obj, np.ndarray):
        return obj if obj.flags.aligned or obj.dtype.hasobject else obj.copy(order="K")
    if _depth > 6 or obj is None or isinstance(obj, (str, bytes, int, float, bool, type)):
        return obj
    _seen = set() if _seen is None else _seen
    if id(obj) in _seen:
        return obj
    _seen.add(id(obj))
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_realign(v, _seen, _depth + 1) for v in obj)
    if isinstance(obj, list):
        return [_realign(v, _seen, _depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {k: _realign(v, _seen, _depth + 1) for k, v in obj.items()}
    attrs = getattr(obj, "__dict__", None)
    owner = type(obj).__module__.split(".")[0]
    if isinstance(attrs, dict) and not callable(obj) and owner in _REALIGNED:
        for k, v in list(attrs.items()):
            new = _realign(v, _seen, _depth + 1)
            if new is not v:
                attrs[k] = new
    return obj


def _run_aligned(func, *args):
    """A task: ``func(*args)`` with its arguments' arrays aligned (see :class:`_Aligned`)."""
    return func(*(_realign(a) for a in args))


# ------------------------------------------------------------------------------ fits and passes


def map_on_cluster(client, func, blocks: list, shared: tuple):
    """The cluster side of :func:`screpair._parallel.map_blocks`: ``func(*shared, block)`` as
    one task per block on the workers of ``client``, the results yielded in block order.

    ``shared`` is scattered to every worker once (:class:`~screpair._parallel.Shared` values
    once for their lifetime). When every worker holding a scattered value is lost, the tasks
    that need it are cancelled: the values are scattered again and the blocks not yet
    returned submitted again (a block's result depends only on its arguments), at most
    :data:`MAX_SCATTERS` times. Tasks left when the caller stops early or a task fails are
    cancelled."""
    from distributed.client import FutureCancelledError

    token = f"screpair-{func.__name__}-{uuid.uuid4().hex[:8]}"

    def scatter(value):
        return client.scatter([_Aligned(value)], broadcast=True, hash=False)[0]

    own: list = [None] * len(shared)  # futures of the plain values, scattered for this call
    futures: dict[int, Any] = {}
    try:
        args = _scattered_args(shared, own, scatter)
        futures = {b: client.submit(_run_aligned, func, *args, blk, pure=False,
                                    key=f"{token}-{b}-0")
                   for b, blk in enumerate(blocks)}
        attempt = 0
        for b in range(len(blocks)):
            while True:
                try:
                    result = futures[b].result()
                    break
                except FutureCancelledError:  # a scattered value was lost with its workers
                    attempt += 1
                    if attempt >= MAX_SCATTERS:
                        msg = (f"Dask: the data of {func.__name__} was lost with its workers "
                               f"{MAX_SCATTERS} times.")
                        raise RuntimeError(msg) from None
                    logger.warning("Dask: %s's data lost with its workers; scattering it again",
                                   func.__name__)
                    args = _scattered_args(shared, own, scatter, again=True)
                    for j in range(b, len(blocks)):
                        futures[j] = client.submit(_run_aligned, func, *args, blocks[j],
                                                   pure=False, key=f"{token}-{j}-{attempt}")
            del futures[b]
            yield result
    finally:
        if futures:
            client.cancel(list(futures.values()), force=True)
        for f in own:
            if f is not None:
                f.release()


def _scattered_args(shared: tuple, own: list, scatter, again: bool = False) -> list:
    """The arguments standing for ``shared`` on the workers: each value scattered once (again
    after a loss: ``again``); the futures of plain values kept in ``own`` (released by the
    caller), those of :class:`~screpair._parallel.Shared` values on them."""
    from .._parallel import Shared

    args = []
    for i, v in enumerate(shared):
        if isinstance(v, Shared):
            if v.future is None or again:
                v.future = scatter(v.value)
            args.append(v.future)
        else:
            if own[i] is None or again:
                own[i] = scatter(v)
            args.append(own[i])
    return args


def _chained_pass(client, token: str, n_obs: int, spans: list, block_task, block_args: list,
                  zeros: tuple, add, *, desc: str, progress: bool):
    """A streaming pass on the workers whose float sums must equal the single-process pass bit
    for bit: ``block_task(*block_args[b])`` computes block ``b``'s terms (reading the block from
    the store), all blocks in parallel; a chain of small tasks ``add(prev, terms)`` adds block
    ``b``'s terms after block ``b - 1``'s, in row order (a sum of per-block partial sums would
    round differently), each on the worker that holds the block's terms, so only the running
    sums move between workers. Yields ``(s, e, add's result)`` for each span in row order (the
    futures are cancelled if the caller stops early or fails)."""
    terms = [client.submit(block_task, *args, pure=False, key=f"{token}-block-{b}")
             for b, args in enumerate(block_args)]
    sums = client.submit(*zeros, pure=False, key=f"{token}-zeros")
    chain = []
    for b, t in enumerate(terms):
        sums = client.submit(add, sums, t, pure=False, key=f"{token}-add-{b}")
        chain.append(sums)
    del terms, sums  # the chain holds them: each block's terms are released once added
    bar = progress_bar(n_obs, desc, progress and len(spans) > 1)
    try:
        for b, (s, e) in enumerate(spans):
            res = chain[b].result()
            chain[b] = None
            yield s, e, res
            bar.update(e - s)
    except BaseException:
        client.cancel([f for f in chain if f is not None], force=True)
        raise
    finally:
        bar.close()


def gene_stats(client, src: Path, layer: str | None, n_obs: int, n_vars: int, rows: int, *,
               progress: bool = False):
    """:func:`screpair._chunks.gene_stats` of the counts in the store ``src`` (``layer``) by
    blocks of ``rows`` cells on the workers of ``client``: the same
    :class:`~screpair._chunks.GeneStats`, bit for bit.

    Each block's task reads and validates its rows and computes its terms
    (:func:`~screpair._chunks.block_stats`: library sizes, detection counts, the normalized
    entries), in parallel; the per-gene float sums are chained in row order
    (:func:`_chained_pass`), so the client receives only them, the library sizes and the
    detection counts."""
    from .._chunks import finish_gene_stats

    token = f"screpair-stats-{uuid.uuid4().hex[:8]}"
    spans = [(s, min(s + rows, n_obs)) for s in range(0, n_obs, rows)]
    src = str(Path(src).resolve())
    lib = np.zeros(n_obs)
    n_cells = np.zeros(n_vars, dtype=np.int64)
    sums = None
    for s, e, (running, lib_b, n_cells_b) in _chained_pass(
            client, token, n_obs, spans, _stats_block,
            [(src, layer, s, e, n_obs) for s, e in spans], (_stats_zeros, n_vars), _stats_add,
            desc="gene statistics (dask)", progress=progress):
        lib[s:e] = lib_b
        n_cells += n_cells_b
        sums = running  # after the last block: the sums over all cells
    return finish_gene_stats(n_obs, lib, n_cells, sums, layer)


def _stats_block(src: str, layer: str | None, s: int, e: int, n_obs: int):
    """Rows ``s:e`` of the store: read, validated, their :class:`~screpair._chunks.BlockStats`."""
    from .._chunks import block_stats

    return block_stats(_read_block(src, layer, s, e), n_obs)


def _stats_zeros(n_vars: int) -> tuple:
    return (np.zeros(n_vars), np.zeros(n_vars), np.zeros(n_vars)), None, None


def _stats_add(prev: tuple, terms) -> tuple:
    """The per-gene sums after one more block (a copy: ``prev`` may be read again when a task
    is rerun), with the block's library sizes and detection counts."""
    from .._chunks import add_block_stats

    sums = tuple(np.array(a, copy=True) for a in prev[0])  # aligned copies
    add_block_stats(sums, terms)
    return sums, terms.library_size, terms.n_cells


def row_totals(client, src: Path, layer: str | None, n_obs: int, n_vars: int, rows: int, *,
               progress: bool = False):
    """The :class:`~screpair._chunks.TotalsPass` of the counts in the store ``src``
    (``layer``) by blocks of ``rows`` cells on the workers of ``client`` (which cells and
    genes have counts, all cells' library sizes and per-gene ``norm_sum``): the same numbers,
    bit for bit, as the single-process pass of :func:`screpair.impute_file`'s fit on a sample
    of rows. Each block's :class:`~screpair._chunks.TotalsTerms` are computed where it is
    read; ``norm_sum`` is chained in row order (:func:`_chained_pass`)."""
    from .._chunks import TotalsPass

    token = f"screpair-totals-{uuid.uuid4().hex[:8]}"
    spans = [(s, min(s + rows, n_obs)) for s in range(0, n_obs, rows)]
    src = str(Path(src).resolve())
    acc = TotalsPass(n_obs, n_vars)
    for s, _, (norm_sum, terms) in _chained_pass(
            client, token, n_obs, spans, _totals_block, [(src, layer, s, e) for s, e in spans],
            (np.zeros, n_vars), _totals_add, desc="counting cells and genes (dask)",
            progress=progress):
        acc.add_rows(s, terms)
        acc.norm_sum = norm_sum
    return acc


def _totals_block(src: str, layer: str | None, s: int, e: int):
    """Rows ``s:e`` of the store: read, validated, their :class:`~screpair._chunks.TotalsTerms`."""
    from .._chunks import totals_terms

    x = _read_block(src, layer, s, e)
    return totals_terms(sp.csr_matrix(x))


def _totals_add(prev, terms) -> tuple:
    """``norm_sum`` after one more block (a copy: ``prev`` may be read again when a task is
    rerun; the first is the zeros vector, later ones a tuple), and the block's terms without
    their entries (only the per-row and per-gene counts go to the client)."""
    norm_sum = np.array(prev if isinstance(prev, np.ndarray) else prev[0], copy=True)
    np.add.at(norm_sum, *terms.entries)
    return norm_sum, replace(terms, entries=(np.empty(0, np.int32), np.empty(0)))


# ------------------------------------------------------------------------------ test hook

#: test hook, set on the workers with ``client.run(_set_test_fault, ...)``: ``(kind, block,
#: marker)``; ``"fail"`` raises in that block's task, ``"kill"`` ends the worker process there
#: once (the first task to create ``marker``)
_TEST_FAULT: tuple[str, int, str] | None = None


def _set_test_fault(fault: tuple[str, int, str] | None) -> None:
    global _TEST_FAULT
    _TEST_FAULT = fault


def _test_fault(b: int) -> None:
    if _TEST_FAULT is None or _TEST_FAULT[1] != b:
        return
    kind, _, marker = _TEST_FAULT
    if kind == "fail":
        msg = f"test fault in block {b}"
        raise RuntimeError(msg)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # killed once already: the rerun goes through
    os.close(fd)
    os._exit(1)
