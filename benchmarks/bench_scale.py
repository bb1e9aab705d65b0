"""Peak memory and wall time of `screpair impute` in memory vs the chunked file path (issue 16).

pbmc3k (2,700 cells x 13,714 genes) is replicated with binomial thinning (each copy keeps every
molecule with a probability drawn from 0.5-1.0 per copy, so no two copies are equal) to the
requested numbers of cells, written once to ``--data-dir`` as .h5ad. For each size and method
`screpair impute` runs in a subprocess under ``/usr/bin/time -v`` (peak RSS = "Maximum resident set
size", wall = "Elapsed"), three ways:

- ``memory``: the in-memory path (``--max-memory`` large enough);
- ``chunked``: ``--chunk-rows N`` (same output: every gene, dense layer);
- ``chunked_hvg``: ``--chunk-rows N --genes hvg:2000`` (the output file holds 2,000 genes).

Prints a markdown table with the chunked / in-memory ratios; ``--out`` also writes it to a file.
Not a test: run it on demand (``nice python benchmarks/bench_scale.py``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

PBMC = Path("/work/shared/data/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad")


def make_data(n_cells: int, data_dir: Path, seed: int = 0) -> Path:
    """pbmc3k replicated with binomial thinning to ``n_cells`` cells (written once)."""
    import anndata
    import numpy as np
    import scipy.sparse as sp

    path = data_dir / f"pbmc3k_thinned_{n_cells}.h5ad"
    if path.exists():
        return path
    src = anndata.read_h5ad(PBMC)
    x = sp.csr_matrix(src.X)
    rng = np.random.default_rng(seed)
    parts, obs_names, types = [], [], []
    done, copy = 0, 0
    while done < n_cells:
        take = min(x.shape[0], n_cells - done)
        block = x[:take].copy()
        if copy:  # the first copy is pbmc3k itself
            block.data = rng.binomial(block.data.astype(np.int64), rng.uniform(0.5, 1.0))
            block.eliminate_zeros()
        parts.append(sp.csr_matrix(block, dtype=np.float32))
        obs_names += [f"{n}-r{copy}" for n in src.obs_names[:take]]
        types += list(src.obs["cell_type"].astype(str)[:take])
        done += take
        copy += 1
    ad = anndata.AnnData(X=sp.vstack(parts, format="csr"), var=src.var.copy())
    ad.obs_names = obs_names
    ad.obs["cell_type"] = types
    tmp = path.with_suffix(".tmp.h5ad")
    ad.write_h5ad(tmp)
    tmp.rename(path)
    return path


def run(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS (MB), exit code."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out = {"seconds": wall, "rss_mb": int(rss.group(1)) / 1024 if rss else float("nan"),
           "rc": proc.returncode}
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        out["error"] = lines[-1] if lines else proc.stderr[-300:]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="10000,50000", help="comma-separated numbers of cells")
    p.add_argument("--methods", default="alra", help="comma-separated methods")
    p.add_argument("--modes", default="memory,chunked,chunked_hvg")
    p.add_argument("--chunk-rows", type=int, default=5000)
    p.add_argument("--data-dir", default="/tmp/screpair_scale")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("screpair"))
    rows = []
    for n in (int(v) for v in args.cells.split(",")):
        t0 = time.perf_counter()
        path = make_data(n, data_dir)
        print(f"data: {path} ({time.perf_counter() - t0:.0f} s to make / find)", flush=True)
        for method in args.methods.split(","):
            base = None
            for mode in args.modes.split(","):
                out = data_dir / f"out_{n}_{method}_{mode}.h5ad"
                cmd = [exe, "impute", str(path), str(out), "--method", method, "--overwrite",
                       "-q"]
                if mode == "memory":
                    cmd += ["--max-memory", "1T"]
                else:
                    cmd += ["--chunk-rows", str(args.chunk_rows)]
                if mode == "chunked_hvg":
                    cmd += ["--genes", "hvg:2000"]
                res = run(cmd)
                size = out.stat().st_size / 2**20 if out.exists() else float("nan")
                out.unlink(missing_ok=True)
                if mode == "memory":
                    base = res
                rows.append((n, method, mode, res, size, base))
                print(f"  {n} {method} {mode}: {res['seconds']:.1f} s, {res['rss_mb']:.0f} MB, "
                      f"rc {res['rc']} {res.get('error', '')}", flush=True)
    lines = ["| cells | method | path | wall (s) | peak RSS (MB) | output (MB) | time / in-memory "
             "| RSS / in-memory |", "|---|---|---|---|---|---|---|---|"]
    for n, method, mode, res, size, base in rows:
        ok = base is not None and base["rc"] == 0 and res["rc"] == 0
        rt = f"{res['seconds'] / base['seconds']:.2f}" if ok else "-"
        rm = f"{res['rss_mb'] / base['rss_mb']:.2f}" if ok else "-"
        status = "" if res["rc"] == 0 else f" (failed: {res.get('error', '')[:60]})"
        lines.append(f"| {n:,} | {method} | {mode}{status} | {res['seconds']:.1f} | "
                     f"{res['rss_mb']:,.0f} | {size:,.0f} | {rt} | {rm} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
