"""The chunked pipeline on a Dask LocalCluster vs the plain chunked path (issue 17).

A Splat simulation (``screpair.simulate.splat(..., out=)``, streamed to a ``.zarr`` store,
written once to ``--data-dir``) is imputed by ``screpair.impute_file`` with ``--chunk-rows``
blocks, for each method:

- ``plain``: the single-process chunked path (this process, its BLAS threads);
- ``dask-N``: ``impute_file(..., client=)`` on a ``LocalCluster(n_workers=N, processes=True,
  threads_per_worker=1)`` started beforehand (its start-up time is printed, not counted).

Both write a ``.zarr`` output. Wall time of the whole ``impute_file`` call (read, fit on this
process, posterior by blocks and write); overhead = dask-1 / plain (goal: within 1.3x);
speed-up = dask-1 / dask-2; parity: every layer of the output compared with the plain one, bit
for bit. Prints a markdown table; ``--out`` also writes it to a file.

Not a test: run it on demand (``nice python benchmarks/bench_dask.py``). On a 2-core machine
the speed-up is bounded by the cores (and by other jobs): the figures that matter there are
parity and the dask-1 overhead.
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

PARAMS = {"alra": {}, "knn": {}, "saver": {}}


def make_data(n_cells: int, n_genes: int, data_dir: Path) -> Path:
    from screpair import simulate

    path = data_dir / f"splat_{n_cells}x{n_genes}.zarr"
    if not path.exists():
        t = time.perf_counter()
        simulate.splat(n_obs=n_cells, n_vars=n_genes, rng=0, out=path)
        print(f"simulated {n_cells} x {n_genes} -> {path} ({time.perf_counter() - t:.1f} s)")
    return path


def same_layers(a: Path, b: Path) -> bool:
    """Every layer and X of two outputs equal, bit for bit."""
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = anndata.read_zarr(a), anndata.read_zarr(b)
    if sorted(x.layers) != sorted(y.layers):
        return False
    pairs = [(x.X, y.X)] + [(x.layers[k], y.layers[k]) for k in x.layers]
    for m, n in pairs:
        if sp.issparse(m) != sp.issparse(n):
            return False
        if sp.issparse(m):
            m, n = sp.csr_matrix(m), sp.csr_matrix(n)
            if not (np.array_equal(m.indptr, n.indptr) and np.array_equal(m.indices, n.indices)
                    and np.array_equal(m.data, n.data)):
                return False
        elif not np.array_equal(np.asarray(m), np.asarray(n)):
            return False
    return True


def run(src: Path, out: Path, method: str, rows: int, client=None) -> float:
    import screpair

    t = time.perf_counter()
    screpair.impute_file(src, out, method, chunk_rows=rows, progress=False, overwrite=True,
                         client=client, **PARAMS[method])
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--chunk-rows", type=int, default=10_000)
    p.add_argument("--methods", default="alra,knn,saver")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/screpair_bench_dask"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from distributed import Client, LocalCluster

    args.data_dir.mkdir(parents=True, exist_ok=True)
    src = make_data(args.cells, args.genes, args.data_dir)
    methods = args.methods.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    times: dict[tuple[str, str], float] = {}
    parity: dict[tuple[str, str], bool] = {}
    for m in methods:
        times[m, "plain"] = run(src, args.data_dir / f"{m}_plain.zarr", m, args.chunk_rows)
        print(f"{m} plain: {times[m, 'plain']:.1f} s", flush=True)
    for n in workers:
        t = time.perf_counter()
        with LocalCluster(n_workers=n, processes=True, threads_per_worker=1,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            print(f"LocalCluster with {n} worker(s) started in {time.perf_counter() - t:.1f} s",
                  flush=True)
            for m in methods:
                out = args.data_dir / f"{m}_dask{n}.zarr"
                times[m, f"dask-{n}"] = run(src, out, m, args.chunk_rows, client)
                parity[m, f"dask-{n}"] = same_layers(args.data_dir / f"{m}_plain.zarr", out)
                print(f"{m} dask-{n}: {times[m, f'dask-{n}']:.1f} s, identical: "
                      f"{parity[m, f'dask-{n}']}", flush=True)
                shutil.rmtree(out)
    cols = ["plain"] + [f"dask-{n}" for n in workers]
    head = (f"| cells x genes | method | {' | '.join(c + ' (s)' for c in cols)} | "
            "dask-1 / plain | speed-up dask-1 / dask-2 | identical to plain |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        t = [times[m, c] for c in cols]
        over = times.get((m, "dask-1"), float("nan")) / times[m, "plain"]
        speed = times.get((m, "dask-1"), float("nan")) / times.get((m, "dask-2"), float("nan"))
        same = all(parity[m, c] for c in cols[1:])
        lines.append(f"| {args.cells:,} x {args.genes:,} | {m} | "
                     + " | ".join(f"{v:.1f}" for v in t)
                     + f" | {over:.2f} | {speed:.2f} | {'yes' if same else 'NO'} |")
    table = "\n".join(lines)
    print(f"\nblocks of {args.chunk_rows} cells\n{table}")
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
