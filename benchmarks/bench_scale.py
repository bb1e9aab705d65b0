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

``--data splat`` uses the streamed simulator instead (issue 16's scale goals):
``screpair.simulate.splat(n, --n-genes, out=...)`` writes each size straight to an .h5ad with
bounded memory (3 groups, ``lib_loc=8``: about 2,500 counts per cell and 17% non-zero at 2,000
genes; its own time and peak RSS are a row of the table), then each method runs
``screpair impute --chunk-rows N`` on it (default mode ``chunked``). ``--json`` keeps the rows,
``--scale-md`` writes the table and a log-log plot (cells vs seconds and vs peak RSS, a PNG next
to it)::

    nice python benchmarks/bench_scale.py --data splat --cells 10000,100000 \
        --methods knn,alra,saver --modes chunked --chunk-rows 10000 --scale-md benchmarks/SCALE.md
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


#: the streamed simulation's parameters besides the size (3 groups, ~2,500 counts per cell)
SPLAT = {"lib_loc": 8.0, "group_prob": (0.2, 0.3, 0.5)}


def make_splat(n_cells: int, n_genes: int, data_dir: Path, seed: int = 0) -> tuple[Path, dict]:
    """The streamed Splat simulation of ``n_cells`` x ``n_genes`` (written once, in a subprocess
    under /usr/bin/time: its wall time and peak RSS, ``{}`` when the file already existed)."""
    path = data_dir / f"splat_{n_cells}x{n_genes}.h5ad"
    if path.exists():
        return path, {}
    code = ("import sys; from screpair import simulate; simulate.splat(int(sys.argv[1]), "
            f"int(sys.argv[2]), out=sys.argv[3], rng={seed}, **{SPLAT!r})")
    res = run([sys.executable, "-c", code, str(n_cells), str(n_genes), str(path)])
    if res["rc"]:
        msg = f"simulation failed: {res.get('error')}"
        raise RuntimeError(msg)
    return path, res


def write_scale_md(rows: list[dict], path: Path, header: str) -> None:
    """``rows`` (cells, method, mode, seconds, rss_mb, rc) as a markdown table and a log-log
    plot (``path`` with .png: cells vs wall seconds and vs peak RSS, one line per method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| cells | genes | method | wall (s) | peak RSS (MB) | output (MB) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        status = "" if r["rc"] == 0 else " (failed)"
        lines.append(f"| {r['cells']:,} | {r['genes']:,} | {r['method']}{status} | "
                     f"{r['seconds']:.1f} | {r['rss_mb']:,.0f} | {r['size_mb']:,.0f} |")
    png = path.with_suffix(".png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method in dict.fromkeys(r["method"] for r in rows):
        ok = sorted((r for r in rows if r["method"] == method and r["rc"] == 0),
                    key=lambda r: r["cells"])
        if not ok:
            continue
        cells = [r["cells"] for r in ok]
        axes[0].plot(cells, [r["seconds"] for r in ok], "o-", label=method)
        axes[1].plot(cells, [r["rss_mb"] for r in ok], "o-", label=method)
    for ax, what in zip(axes, ("wall time (s)", "peak RSS (MB)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    path.write_text(f"{header}\n\n" + "\n".join(lines) + f"\n\n![scale]({png.name})\n")


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
    p.add_argument("--data", choices=["pbmc", "splat"], default="pbmc",
                   help="pbmc3k replicated (default) or the streamed Splat simulator")
    p.add_argument("--n-genes", type=int, default=2000, help="genes of the splat data")
    p.add_argument("--json", default=None, help="append each run's result to this JSON file")
    p.add_argument("--scale-md", default=None,
                   help="write the splat rows (from --json too) as a table and a log-log PNG")
    args = p.parse_args(argv)
    if args.data == "splat":
        return _main_splat(args)
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


def _main_splat(args) -> int:
    import json

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("screpair"))
    store = Path(args.json) if args.json else None
    rows = json.loads(store.read_text()) if store is not None and store.exists() else []

    def keep(row):
        rows[:] = [r for r in rows if (r["cells"], r["genes"], r["method"]) !=
                   (row["cells"], row["genes"], row["method"])] + [row]
        if store is not None:
            store.write_text(json.dumps(rows, indent=1))
        print(f"  {row['cells']} x {row['genes']} {row['method']}: {row['seconds']:.1f} s, "
              f"{row['rss_mb']:.0f} MB, rc {row['rc']} {row.get('error', '')}", flush=True)

    g = args.n_genes
    for n in (int(v) for v in args.cells.split(",")):
        path, sim = make_splat(n, g, data_dir)
        size = path.stat().st_size / 2**20
        if sim:
            keep({"cells": n, "genes": g, "method": "simulate (splat, out=)", "size_mb": size,
                  **sim})
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                out = data_dir / f"out_splat_{n}_{method}_{mode}.h5ad"
                cmd = [exe, "impute", str(path), str(out), "--method", method, "--overwrite",
                       "-q"]
                cmd += (["--max-memory", "1T"] if mode == "memory"
                        else ["--chunk-rows", str(args.chunk_rows)])
                res = run(cmd)
                out_mb = out.stat().st_size / 2**20 if out.exists() else float("nan")
                out.unlink(missing_ok=True)
                name = method if mode == "chunked" else f"{method} ({mode})"
                keep({"cells": n, "genes": g, "method": name, "size_mb": out_mb, **res})
    if args.scale_md:
        header = (f"`{' '.join(['python benchmarks/bench_scale.py', *sys.argv[1:]])}`: "
                  f"peak RSS (`/usr/bin/time -v`) and wall time; output = the .h5ad written.")
        write_scale_md(rows, Path(args.scale_md), header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
