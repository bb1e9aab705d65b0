"""Maps over independent blocks that run on this process, or on a Dask cluster while one is in use.

The fits that :func:`screpair.impute_file` runs with ``client=`` spread their independent pieces
(SAVER's gene batches, the dropout model's cluster x gene blocks and its EM's cell blocks) over
the cluster through :func:`map_blocks`: inside ``with on_cluster(client, mapper):`` it submits
one task per block to the client's workers through ``mapper``
(:func:`screpair.methods._dask.map_on_cluster`, handed in by the caller, so this bottom-layer
module imports nothing of ``screpair.methods``); anywhere else it computes the blocks here, one
after the other. The same function computes every block either way and the results come back
in block order, for the caller to combine in that order, so a fit gives the same numbers, bit
for bit, with or without a cluster and whatever the number of workers (this holds as long as
the function reads only its arguments: no random draws, nothing from the worker). Nothing here
imports Dask.

The switch is a context variable (as joblib's ``parallel_backend`` or dask's own ``config.set``)
rather than a parameter of every estimator: estimators store only their hyper-parameters, and
where their fit runs is not one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

#: ``(client, mapper)`` set by :func:`on_cluster`; ``(None, None)``: here
_CLIENT: ContextVar[tuple[Any, Callable | None]] = ContextVar(
    "screpair_dask_client", default=(None, None))


@contextlib.contextmanager
def on_cluster(client, mapper: Callable | None = None) -> Iterator[Any]:
    """Run the :func:`map_blocks` of the code inside the block on the workers of ``client``
    (a ``dask.distributed.Client``; ``None``: here) through ``mapper(client, func, blocks,
    shared)`` (:func:`screpair.methods._dask.map_on_cluster`), which yields the blocks' results
    in block order."""
    if client is not None and mapper is None:
        msg = "on_cluster(client) needs the mapper that submits the blocks (map_on_cluster)."
        raise TypeError(msg)
    token = _CLIENT.set((client, mapper))
    try:
        yield client
    finally:
        _CLIENT.reset(token)


def current_client():
    """The client set by :func:`on_cluster`, or ``None``."""
    return _CLIENT.get()[0]


class Shared:
    """A value that the tasks of several :func:`map_blocks` calls read (e.g. a fit's data): on
    a cluster it is scattered to the workers once, at its first use, and released by
    :meth:`close` (or at the end of a ``with`` block); here it is just ``value``."""

    def __init__(self, value):
        self.value = value
        self.future = None  # set by the cluster side at the first scatter

    def close(self) -> None:
        fut, self.future = self.future, None
        if fut is not None:
            with contextlib.suppress(Exception):  # the client may be gone already
                fut.release()

    def __enter__(self) -> Shared:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_blocks(func: Callable, blocks: Iterable, *shared) -> Iterator:
    """``func(*shared, block)`` for every block, yielded in block order.

    Here (no :func:`on_cluster` client): computed lazily, one block at a time, so the caller
    holds one result at once. On a cluster: one task per block, ``shared`` scattered to every
    worker once for this call (each :class:`Shared` once for its lifetime), the results yielded
    in block order as they are ready. ``func`` must be importable by the workers (a module-level
    function) and must not modify ``shared``: on a worker the scattered values are shared by
    all its tasks.
    """
    blocks = list(blocks)
    client, mapper = _CLIENT.get()
    if client is None or not blocks:
        values = [s.value if isinstance(s, Shared) else s for s in shared]
        return (func(*values, b) for b in blocks)
    return mapper(client, func, blocks, shared)
