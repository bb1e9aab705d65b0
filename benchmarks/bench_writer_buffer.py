"""Write speed and traced memory of the sparse output writer by ``StoreWriter.buffer_nnz``.

A sparse output of ``--cells`` x ``--genes`` (float32 CSR, ``--density`` non-zero) streamed by
blocks of ``--chunk-rows`` cells (what :func:`screpair.impute_file` writes for ``X`` and a
sparse layer) into ``.zarr`` and ``.h5ad`` stores, once per buffer size and format, the sizes
interleaved and repeated (``--repeats``) so that a loaded machine's drift falls on all of
them. Prints one line per run (seconds, the writer's traced peak) and the median per buffer.

    python benchmarks/bench_writer_buffer.py --cells 100000 --genes 2000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from screpair._chunks import StoreWriter, stream_store


def _blocks(n_cells: int, n_genes: int, density: float, rows: int, rng):
    """Two distinct random CSR blocks of ``rows`` cells, handed out in turn."""
    made = [sp.random(rows, n_genes, density=density, format="csr", dtype=np.float32,
                      random_state=rng, data_rvs=lambda k: rng.integers(1, 50, k))
            for _ in range(2)]
    for i, s in enumerate(range(0, n_cells, rows)):
        yield made[i % 2][: min(rows, n_cells - s)]


def write(path: Path, n_cells: int, n_genes: int, density: float, rows: int,
          buffer_nnz: int, trace: bool) -> tuple[float, int]:
    StoreWriter.buffer_nnz = buffer_nnz
    obs = pd.DataFrame(index=pd.RangeIndex(n_cells).astype(str))
    var = pd.DataFrame(index=pd.RangeIndex(n_genes).astype(str))
    blocks = list(_blocks(n_cells, n_genes, density, rows, np.random.default_rng(0)))
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    with stream_store(path, obs=obs, var=var, chunk_rows=rows) as w:
        w.matrix("X", n_genes, sparse=True)
        for b in blocks:
            w.append("X", b)
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    if trace:
        tracemalloc.stop()
    return dt, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--density", type=float, default=0.17)
    p.add_argument("--chunk-rows", type=int, default=10_000)
    p.add_argument("--buffers", default="24,22,20,18", help="log2 of buffer_nnz values")
    p.add_argument("--formats", default="zarr,h5ad")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    sizes = [2 ** int(v) for v in args.buffers.split(",")]
    tmp = Path(tempfile.mkdtemp())
    times: dict = {}
    try:
        for rep in range(args.repeats):
            order = sizes if rep % 2 == 0 else sizes[::-1]
            for fmt in args.formats.split(","):
                for size in order:
                    out = tmp / f"o.{fmt}"
                    dt, _ = write(out, args.cells, args.genes, args.density,
                                  args.chunk_rows, size, trace=False)
                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
                    peak = 0
                    if rep == 0:
                        _, peak = write(out, args.cells, args.genes, args.density,
                                        args.chunk_rows, size, trace=True)
                        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
                    times.setdefault((fmt, size), []).append(dt)
                    print(f"{fmt} buffer 2^{int(np.log2(size))}: {dt:.2f} s"
                          + (f", traced peak {peak / 1e6:.0f} MB" if peak else ""), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for (fmt, size), v in sorted(times.items()):
        print(f"median {fmt} 2^{int(np.log2(size))}: {np.median(v):.2f} s ({len(v)} runs)")


if __name__ == "__main__":
    main()
