"""The chunked pipeline on a Dask LocalCluster vs the plain chunked path (issue 17).

A Splat simulation (``screpair.simulate.splat(n, genes, out=, chunk_size=)``, streamed to a
``.zarr`` store chunk by chunk, written once to ``--data-dir``) is imputed by
``screpair.impute_file`` with ``--chunk-rows`` blocks, for each method (alra, knn, saver and
cnn: every ``posterior_by_rows`` method; cnn trains ``--cnn-epochs`` epochs, on this process in
every run):

- ``plain``: the single-process chunked path (this process, its BLAS threads);
- ``dask-N``: ``impute_file(..., client=)`` on a ``LocalCluster(n_workers=N, processes=True,
  threads_per_worker=1)`` started beforehand (its start-up time is printed, not counted).

Both write a ``.zarr`` output. Wall time of the whole ``impute_file`` call (read on this
process; the fit on this process, with its block maps on the workers under Dask: SAVER's gene
batches, the dropout model's EM blocks; with ``--hvg N`` the gene statistics pass for
``genes="hvg:N"``, by the workers under Dask; then the posterior by blocks and the write);
overhead = dask-1 / plain (goal: within 1.3x); speed-up = dask-1 / dask-2; parity: every layer
and ``X`` of the output compared with the plain one (bit for bit, and the largest absolute
difference). Prints a markdown table; ``--out`` also writes it to a file.

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

PARAMS = {"alra": {}, "knn": {}, "saver": {}, "cnn": {}}


def method_params(method: str, cnn_epochs: int) -> dict:
    if method == "cnn":  # training stays on the calling process: a few epochs keep it short
        return {"train": {"n_epochs": cnn_epochs, "progress": False, "device": "cpu"}}
    return dict(PARAMS[method])


def make_data(n_cells: int, n_genes: int, data_dir: Path, chunk_size: int) -> Path:
    from screpair import simulate

    path = data_dir / f"splat_{n_cells}x{n_genes}.zarr"
    if not path.exists():
        t = time.perf_counter()
        simulate.splat(n_cells, n_genes, rng=0, out=path, chunk_size=chunk_size)
        print(f"simulated {n_cells} x {n_genes} -> {path} ({time.perf_counter() - t:.1f} s)")
    return path


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """Whether every layer and X of two outputs are equal bit for bit (same layers, same
    sparse / dense kind and structure), and the largest absolute difference of their values
    (``inf`` when the layers or structures differ), by blocks of rows."""
    import zarr
    from anndata.io import sparse_dataset

    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    names = sorted(ra["layers"].keys())
    if names != sorted(rb["layers"].keys()):
        return False, float("inf")
    same, diff = True, 0.0
    for key in ["X"] + [f"layers/{n}" for n in names]:
        ea, eb = ra[key], rb[key]
        enc = str(ea.attrs.get("encoding-type", "array"))
        if enc != str(eb.attrs.get("encoding-type", "array")):
            return False, float("inf")
        if enc == "csr_matrix":
            ma, mb = sparse_dataset(ea), sparse_dataset(eb)
        else:
            ma, mb = ea, eb
        n = ma.shape[0]
        for s in range(0, n, 10_000):
            x, y = ma[s:s + 10_000], mb[s:s + 10_000]
            if sp.issparse(x):
                x, y = sp.csr_matrix(x), sp.csr_matrix(y)
                same &= bool(np.array_equal(x.indptr, y.indptr)
                             and np.array_equal(x.indices, y.indices)
                             and np.array_equal(x.data, y.data))
                d = abs(x.astype(np.float64) - y.astype(np.float64))
                diff = max(diff, float(d.max()) if d.nnz else 0.0)
            else:
                x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
                same &= bool(np.array_equal(x, y))
                diff = max(diff, float(np.max(np.abs(x - y))) if x.size else 0.0)
    return same, diff


def run(src: Path, out: Path, method: str, rows: int, params: dict, genes: str | None,
        client=None) -> float:
    import screpair

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. cells without counts set aside (both runs)
        screpair.impute_file(src, out, method, chunk_rows=rows, progress=False, overwrite=True,
                             genes=genes, client=client, **params)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--chunk-rows", type=int, default=10_000)
    p.add_argument("--sim-chunk", type=int, default=10_000,
                   help="cells simulated and written per chunk (simulate.splat chunk_size)")
    p.add_argument("--methods", default="alra,knn,saver,cnn")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--cnn-epochs", type=int, default=2)
    p.add_argument("--hvg", type=int, default=None,
                   help="output only the N most variable genes (genes='hvg:N'): the gene "
                        "statistics pass runs too (by the workers under Dask)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/screpair_bench_dask"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    from distributed import Client, LocalCluster

    args.data_dir.mkdir(parents=True, exist_ok=True)
    src = make_data(args.cells, args.genes, args.data_dir, args.sim_chunk)
    methods = args.methods.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    genes = None if args.hvg is None else f"hvg:{args.hvg}"
    times: dict[tuple[str, str], float] = {}
    parity: dict[tuple[str, str], tuple[bool, float]] = {}
    for m in methods:
        params = method_params(m, args.cnn_epochs)
        times[m, "plain"] = run(src, args.data_dir / f"{m}_plain.zarr", m, args.chunk_rows,
                                params, genes)
        print(f"{m} plain: {times[m, 'plain']:.1f} s", flush=True)
    for n in workers:
        t = time.perf_counter()
        with LocalCluster(n_workers=n, processes=True, threads_per_worker=1,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            print(f"LocalCluster with {n} worker(s) started in {time.perf_counter() - t:.1f} s",
                  flush=True)
            for m in methods:
                out = args.data_dir / f"{m}_dask{n}.zarr"
                times[m, f"dask-{n}"] = run(src, out, m, args.chunk_rows,
                                            method_params(m, args.cnn_epochs), genes, client)
                parity[m, f"dask-{n}"] = compare(args.data_dir / f"{m}_plain.zarr", out)
                same, diff = parity[m, f"dask-{n}"]
                print(f"{m} dask-{n}: {times[m, f'dask-{n}']:.1f} s, identical: {same}, "
                      f"max abs difference {diff:.3g}", flush=True)
                shutil.rmtree(out)
    cols = ["plain"] + [f"dask-{n}" for n in workers]
    head = (f"| cells x genes | method | {' | '.join(c + ' (s)' for c in cols)} | "
            "dask-1 / plain | speed-up dask-1 / dask-2 | identical to plain | "
            "max abs difference |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        t = [times[m, c] for c in cols]
        over = times.get((m, "dask-1"), float("nan")) / times[m, "plain"]
        speed = times.get((m, "dask-1"), float("nan")) / times.get((m, "dask-2"), float("nan"))
        same = all(parity[m, c][0] for c in cols[1:])
        diff = max((parity[m, c][1] for c in cols[1:]), default=float("nan"))
        lines.append(f"| {args.cells:,} x {args.genes:,} | {m} | "
                     + " | ".join(f"{v:.1f}" for v in t)
                     + f" | {over:.2f} | {speed:.2f} | {'yes' if same else 'NO'} | {diff:.3g} |")
    table = "\n".join(lines)
    what = f"genes hvg:{args.hvg}, " if args.hvg else ""
    print(f"\n{what}blocks of {args.chunk_rows} cells\n{table}")
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
