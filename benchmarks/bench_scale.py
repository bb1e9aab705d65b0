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
to it; in a file that has the lines ``<!-- bench_scale table -->`` and ``<!-- /bench_scale
table -->`` only what lies between them, so notes written around it stay; ``--report-only``
rewrites it from ``--json`` without running anything)::

    nice python benchmarks/bench_scale.py --data splat --cells 10000,100000 \
        --methods knn,alra,saver --modes chunked --chunk-rows 10000 --scale-md benchmarks/SCALE.md

``--peers scvi`` (splat mode) also runs scVI, the one peer that scales, on the same .h5ad file of
each size, in a subprocess under ``/usr/bin/time -v`` with ``--peer-python`` (default: this
python; it needs scvi-tools, and imports screpair from this source tree via ``PYTHONPATH``). The
job does the same work as ``screpair impute``: read the file (all of it, in memory: scVI's data
loader reads from an in-memory AnnData), train ``scvi.model.SCVI`` at scvi-tools' defaults on CPU
(``max_epochs = min(round(20000 / n_cells * 400), 400)``, the default rule of scvi-tools'
``get_max_epochs_heuristic``; ``--scvi-epochs`` overrides it for quick runs; torch's RNG seeded
inside ``fork_rng``, as the ``scvi`` peer of :mod:`screpair.evaluate` does), then
``get_normalized_expression(library_size=1) * L`` for every cell, predicted and written by blocks
of ``--chunk-rows`` cells to an .h5ad like screpair's output (``X``: the counts, CSR float32;
``layers["scvi"]``: dense float32). Besides scVI's model it holds the counts (CSR) and one block
of predictions, never a dense cells x genes copy. Its rows are named ``scVI (peer, E epochs)``;
``--scale-md`` marks them as peers and adds a table of each screpair method's time and peak RSS
over scVI's at the same size. ``--methods ''`` runs the peers alone (their rows join those already
in ``--json``)::

    nice python benchmarks/bench_scale.py --data splat --cells 100000 --methods alra,saver \
        --modes chunked --chunk-rows 10000 --peers scvi --peer-python /path/to/scvi-env/bin/python \
        --json benchmarks/scale.json --scale-md benchmarks/SCALE.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
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


def scvi_job(src: Path, dst: Path, *, max_epochs: int | None, chunk_rows: int,
             seed: int = 0) -> None:
    """scVI's side of the comparison, run in the peer's python (``--peer-job scvi``): train
    ``scvi.model.SCVI`` (defaults, CPU; ``max_epochs=None``: scvi-tools' default rule) on the
    counts of ``src``, then write ``X`` (the counts) and ``layers["scvi"] =
    get_normalized_expression(library_size=1) * L`` by blocks of ``chunk_rows`` cells to ``dst``,
    with ``uns["scvi"]["params"]`` (the epochs trained, the seed)."""
    import anndata
    import numpy as np
    import scipy.sparse as sp
    import scvi
    import torch
    from scvi.model._utils import get_max_epochs_heuristic

    from screpair._chunks import stream_store
    from screpair._norm import library_size
    from screpair._utils import as_rng, torch_seed
    from screpair.evaluate._peers import _quiet_scvi

    ad = anndata.read_h5ad(src)
    ad.X = sp.csr_matrix(ad.X, dtype=np.float32)
    lib = library_size(ad.X)
    obs, var = ad.obs.copy(), ad.var.copy()  # before setup_anndata adds its columns
    epochs = get_max_epochs_heuristic(ad.n_obs) if max_epochs is None else max_epochs
    with _quiet_scvi(), torch.random.fork_rng():
        torch.manual_seed(torch_seed(as_rng(seed)))
        scvi.model.SCVI.setup_anndata(ad)
        model = scvi.model.SCVI(ad)
        model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
        with stream_store(dst, obs=obs, var=var, chunk_rows=chunk_rows) as w:
            w.matrix("X", ad.n_vars)
            w.matrix("layers/scvi", ad.n_vars, sparse=False)
            for start in range(0, ad.n_obs, chunk_rows):
                stop = min(start + chunk_rows, ad.n_obs)
                rho = model.get_normalized_expression(ad, indices=np.arange(start, stop),
                                                      library_size=1.0, return_numpy=True)
                w.append("X", ad.X[start:stop])
                w.append("layers/scvi", np.asarray(rho) * lib[start:stop, None])
            w.uns["scvi"] = {"params": {"max_epochs": epochs, "seed": seed}}


def write_scale_md(rows: list[dict], path: Path, header: str) -> None:
    """``rows`` (cells, genes, method, seconds, rss_mb, rc; ``chunk_rows``: the cells per block;
    ``peer`` for a peer's row) as a markdown table (peers marked), a side-by-side table (each
    screpair method's wall time and peak RSS over each peer's at the same size, where both
    succeeded) and a log-log plot (``path`` with .png: cells vs wall seconds and vs peak RSS at
    the most common gene count, one line per method, peers dashed; below, when some number of
    cells was also run with other gene counts, genes vs the same at that number of cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    when = any("commit" in r for r in rows)  # rows measured at different commits say which
    lines = ["| cells | genes | method | block (cells) | wall (s) | peak RSS (MB) | output (MB) |"
             + (" commit, date |" if when else ""), "|---|---|---|---|---|---|---|"
             + ("---|" if when else "")]
    for r in rows:
        status = "" if r["rc"] == 0 else " (failed)"
        name = f"*{r['method']}*" if r.get("peer") else r["method"]
        block = r.get("chunk_rows")
        block = f"{block:,}" if isinstance(block, int) else (block or "-")
        lines.append(f"| {r['cells']:,} | {r['genes']:,} | {name}{status} | {block} | "
                     f"{r['seconds']:.1f} | {r['rss_mb']:,.0f} | {r['size_mb']:,.0f} |"
                     + (f" {r.get('commit', '')} |" if when else ""))
    side = _side_by_side(rows)
    png = path.with_suffix(".png")
    # top: cells vs time / memory at the most common gene count; bottom (when some size was
    # also run with other gene counts): genes vs time / memory at that size
    genes = [r["genes"] for r in rows]
    main_genes = max(set(genes), key=genes.count)
    wide = {r["cells"] for r in rows if r["genes"] != main_genes}
    fig, grid = plt.subplots(2 if wide else 1, 2, figsize=(9, 7.2 if wide else 3.6),
                             squeeze=False)
    axes = grid[0]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        ok = sorted((r for r in rows if r["method"] == method and r["rc"] == 0),
                    key=lambda r: (r["cells"], r["genes"]))
        style = "s--" if ok and ok[0].get("peer") else "o-"
        series = [(grid[0], "cells", [r for r in ok if r["genes"] == main_genes])]
        if wide:
            series.append((grid[1], "genes", [r for r in ok if r["cells"] in wide]))
        for row_axes, x, sel in series:
            if not sel:
                continue
            for ax, y in zip(row_axes, ("seconds", "rss_mb"), strict=True):
                ax.plot([r[x] for r in sel], [r[y] for r in sel], style, color=f"C{i % 10}",
                        label=method)
    gene_ticks = sorted({r["genes"] for r in rows if r["cells"] in wide})
    titles = [f"{main_genes:,} genes"]
    if wide:
        titles.append(f"{', '.join(f'{n:,}' for n in sorted(wide))} cells")
    for row_axes, xlabel, title in zip(grid, ("cells", "genes"), titles, strict=False):
        for ax, what in zip(row_axes, ("wall time (s)", "peak RSS (MB)"), strict=True):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(what)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if xlabel == "genes":  # the gene counts run, as plain numbers
                ax.set_xticks(gene_ticks, [f"{g:,}" for g in gene_ticks])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    text = f"{header}\n\n" + "\n".join(lines) + "\n"
    if any(r.get("peer") for r in rows):
        text += "\n*Italic*: a peer, run by this script on the same file (not screpair).\n"
    if side:
        text += ("\nSide by side (each screpair method / the peer at the same size; below 1: "
                 "screpair is faster / smaller):\n\n" + "\n".join(side) + "\n")
    text += f"\n![scale]({png.name})\n"
    old = path.read_text() if path.exists() else ""
    if TABLE_START in old and TABLE_END in old:  # keep the notes around the generated block
        head, rest = old.split(TABLE_START, 1)
        text = f"{head}{TABLE_START}\n{text}{TABLE_END}{rest.split(TABLE_END, 1)[1]}"
    path.write_text(text)


#: ``--scale-md`` rewrites only what lies between these lines when the file has them (the
#: notes written around the table stay)
TABLE_START, TABLE_END = "<!-- bench_scale table -->", "<!-- /bench_scale table -->"


def _side_by_side(rows: list[dict]) -> list[str]:
    """Markdown rows: every successful screpair method's wall time and peak RSS over every
    successful peer's at the same (cells, genes); no lines without such a pair."""
    peers = sorted((r for r in rows if r.get("peer") and r["rc"] == 0), key=lambda r: r["cells"])
    ours = [r for r in rows if not r.get("peer") and r["rc"] == 0
            and not r["method"].startswith("simulate")]
    lines = []
    for q in peers:
        for r in ours:
            if (r["cells"], r["genes"]) == (q["cells"], q["genes"]):
                lines.append(f"| {r['cells']:,} | {r['genes']:,} | {r['method']} | {q['method']} "
                             f"| {r['seconds'] / q['seconds']:.2f} | "
                             f"{r['rss_mb'] / q['rss_mb']:.2f} |")
    if not lines:
        return []
    return ["| cells | genes | method | peer | wall / peer's | peak RSS / peer's |",
            "|---|---|---|---|---|---|", *lines]


def _block_args(mode: str, chunk_rows: int) -> list[str]:
    """``screpair impute`` options of ``mode``: in memory, or blocks of ``chunk_rows`` cells (0:
    none given, so screpair picks them for the genes and its memory budget)."""
    if mode == "memory":
        return ["--max-memory", "1T"]
    return ["--chunk-rows", str(chunk_rows)] if chunk_rows else []


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v (``env``: its environment, ``None``: this one's): wall
    seconds, peak RSS (MB), exit code."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env=env)
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
    p.add_argument("--chunk-rows", type=int, default=5000,
                   help="cells per block of the chunked modes; 0: screpair's default for the "
                   "number of genes and the memory budget (the CLI without --chunk-rows)")
    p.add_argument("--data-dir", default="/tmp/screpair_scale")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--data", choices=["pbmc", "splat"], default="pbmc",
                   help="pbmc3k replicated (default) or the streamed Splat simulator")
    p.add_argument("--n-genes", type=int, default=2000, help="genes of the splat data")
    p.add_argument("--json", default=None, help="append each run's result to this JSON file")
    p.add_argument("--scale-md", default=None,
                   help="write the splat rows (from --json too) as a table and a log-log PNG")
    p.add_argument("--peers", default="", help="splat mode: peers run on the same files "
                   "(comma-separated; only 'scvi')")
    p.add_argument("--peer-python", default=sys.executable,
                   help="python with the peers' packages (scvi-tools); default: this one")
    p.add_argument("--scvi-epochs", type=int, default=None,
                   help="scVI's max_epochs (default: scvi-tools' rule for the number of cells)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write --scale-md from the rows of --json")
    p.add_argument("--peer-job", nargs=3, metavar=("PEER", "IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report_only:
        import json

        if not (args.json and args.scale_md):
            p.error("--report-only needs --json and --scale-md")
        header = (f"`python benchmarks/bench_scale.py --data splat ...` rows of `{args.json}`: "
                  "peak RSS (`/usr/bin/time -v`) and wall time; output = the .h5ad written.")
        write_scale_md(json.loads(Path(args.json).read_text()), Path(args.scale_md), header)
        return 0
    if args.peer_job:  # inside the peer's python, under /usr/bin/time (see _main_splat)
        peer, src, dst = args.peer_job
        if peer != "scvi":
            p.error(f"unknown peer {peer!r}")
        scvi_job(Path(src), Path(dst), max_epochs=args.scvi_epochs, chunk_rows=args.chunk_rows)
        return 0
    peers = [v for v in args.peers.split(",") if v]
    if any(v != "scvi" for v in peers) or (peers and args.data != "splat"):
        p.error(f"--peers takes only 'scvi', with --data splat; got {args.peers!r}")
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
                cmd += _block_args(mode, args.chunk_rows)
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

    head = subprocess.run(["git", "-C", str(SRC), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown commit"

    def keep(row):
        now = time.gmtime()
        row["commit"] = f"{head}, {now.tm_mday} {time.strftime('%B %Y', now)}"
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
        for method in (v for v in args.methods.split(",") if v):
            for mode in args.modes.split(","):
                out = data_dir / f"out_splat_{n}_{method}_{mode}.h5ad"
                cmd = [exe, "impute", str(path), str(out), "--method", method, "--overwrite",
                       "-q"]
                cmd += _block_args(mode, args.chunk_rows)
                res = run(cmd)
                out_mb = out.stat().st_size / 2**20 if out.exists() else float("nan")
                block = _blocks_used(out, method) if mode != "memory" else None
                out.unlink(missing_ok=True)
                name = method if mode == "chunked" else f"{method} ({mode})"
                keep({"cells": n, "genes": g, "method": name, "size_mb": out_mb,
                      "chunk_rows": block, **res})
        for peer in (v for v in args.peers.split(",") if v):
            keep(_run_peer(peer, path, data_dir / f"out_splat_{n}_{peer}.h5ad", args,
                           cells=n, genes=g))
    if args.scale_md:
        header = (f"`{' '.join(['python benchmarks/bench_scale.py', *sys.argv[1:]])}`: "
                  f"peak RSS (`/usr/bin/time -v`) and wall time; output = the .h5ad written.")
        write_scale_md(rows, Path(args.scale_md), header)
    return 0


def _blocks_used(out: Path, key: str) -> int | None:
    """The cells per block that ``screpair impute`` recorded in ``out`` (``uns[key]``)."""
    import h5py

    if not out.exists():
        return None
    with h5py.File(out, "r") as f:
        return int(f[f"uns/{key}/chunk_rows"][()]) if f"uns/{key}/chunk_rows" in f else None


def _run_peer(peer: str, path: Path, out: Path, args, *, cells: int, genes: int) -> dict:
    """One peer's job (``--peer-job``) on ``path`` in ``--peer-python`` under /usr/bin/time:
    its row (``peer`` set; the epochs trained read back from the output's ``uns``)."""
    import h5py

    cmd = [args.peer_python, str(Path(__file__).resolve()), "--peer-job", peer, str(path),
           str(out), "--chunk-rows", str(args.chunk_rows or 10_000)]
    if args.scvi_epochs is not None:
        cmd += ["--scvi-epochs", str(args.scvi_epochs)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(v for v in (str(SRC), env.get("PYTHONPATH")) if v)
    out.unlink(missing_ok=True)
    res = run(cmd, env=env)
    epochs = args.scvi_epochs
    if out.exists():
        with h5py.File(out, "r") as f:
            epochs = int(f["uns/scvi/params/max_epochs"][()])
    out_mb = out.stat().st_size / 2**20 if out.exists() else float("nan")
    out.unlink(missing_ok=True)
    label = "default" if epochs is None else epochs
    return {"cells": cells, "genes": genes, "method": f"scVI (peer, {label} epochs)",
            "peer": peer, "size_mb": out_mb, **res}


if __name__ == "__main__":
    sys.exit(main())
