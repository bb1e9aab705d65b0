"""Chunked path vs in-memory path (issue 16's parity report): ``impute_file`` against ``impute``.

For each dataset x method x setting, the same method with the same parameters and the same seed
is run twice on the same cells and genes:

- in memory: ``screpair.impute(adata, method, rng=SEED, **params)``;
- chunked: ``screpair.impute_file(in_path, out_path, method, chunk_rows=CHUNK, rng=SEED,
  **params)``, which reads the input by blocks of ``CHUNK`` rows (several blocks on every dataset)
  and, above a method's sample size, fits on the ``_fit_rows`` sample read alone from the file.

Settings: ``defaults`` (the methods' own sample sizes: every dataset here is below them, so both
paths fit on all cells) and ``sample`` (the sample size set to ``--sample`` cells, or half the
cells of a dataset with fewer: ``n_fit_cells`` for alra, knn and saver; ``n_train_cells`` for
dae, vae and diffusion; both ``n_dropout_cells`` and ``n_train_cells`` for cnn), so that the
chunked path's fit reads only the sample's rows from the file. Every output layer the in-memory
path writes is compared with the file's: max abs difference, max relative difference
(``|a - b| / max(|a|, |b|)`` over entries not both zero), Pearson r of ``log1p`` values,
bit-identical yes/no (float32 as both paths store them), and the seconds of each path.

Neural methods run at the tiny settings of ``benchmarks/check_parity.py`` (``method_params``:
2 epochs, small networks); the parity question is arithmetic, not accuracy.

The masked part (``--masked-methods``): the masked protocol of ``benchmarks/RESULTS.md``
(``screpair.evaluate.Masked`` on pbmc3k, seeds ``--masked-seeds``) scored for the in-memory fit
(``evaluate.run_method``, as RESULTS.md runs it), the chunked path at the defaults, and the
chunked path with the sample, each against RESULTS.md's mean ± sd (parsed from that file).

Data: ``--data-dir`` (default ``/work/shared/data`` or ``$SCREPAIR_DATA``): pbmc3k (2,700 cells)
and Baron 2016 mouse 1 (822 cells; the only Baron matrix in the data folder). By default each is
restricted to its ``--n-genes`` (2,000) most-detected genes (written once to a temporary
``.h5ad`` that both paths read), to keep SAVER and the neural methods cheap on a 2-core machine;
``--n-genes 0`` keeps every gene.

Usage::

    nice -n 19 python benchmarks/bench_parity_file.py                 # everything -> PARITY.md
    nice -n 19 python benchmarks/bench_parity_file.py --methods alra,knn --masked-methods none
    ... --jsonl /tmp/parity.jsonl     # rows appended as they finish; reruns skip the done ones
    ... --report-only --jsonl /tmp/parity.jsonl   # rewrite PARITY.md from the rows so far

Writes ``benchmarks/PARITY.md`` (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from check_parity import SEED, method_params  # noqa: E402  (tiny neural settings, one source)

DATASETS = {
    "pbmc3k": "pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad",
    "baron": "baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad",
}
#: the sample-size parameters of each method (all set to the small sample in ``sample``)
SAMPLE_PARAMS = {
    "alra": ("n_fit_cells",), "knn": ("n_fit_cells",), "saver": ("n_fit_cells",),
    "dae": ("n_train_cells",), "vae": ("n_train_cells",), "diffusion": ("n_train_cells",),
    "cnn": ("n_dropout_cells", "n_train_cells"),
}
#: relative difference accepted for a row that is not bit-identical (float32 rounding of
#: reordered float64 sums); anything above is flagged as a parity bug
TOL_REL = 1e-5
NEURAL = ("cnn", "dae", "vae", "diffusion")
RESULTS_SECTION = "## pbmc3k_2700cells_13714genes · masked"


# ---- data -------------------------------------------------------------------------------------
def data_dir(arg: str | None) -> Path:
    for d in (arg, os.environ.get("SCREPAIR_DATA"), "/work/shared/data", HERE.parent / "../shared/data"):
        if d and Path(d).is_dir():
            return Path(d)
    msg = "no data folder: pass --data-dir (the folder holding pbmc3k_10x/ and baron2016_*/)."
    raise SystemExit(msg)


def prepare(path: Path, n_genes: int, tmp: Path, name: str) -> Path:
    """``path`` itself (``n_genes`` 0), or a copy restricted to its ``n_genes`` most-detected
    genes (file order kept), raw counts as CSR float32 in X."""
    import anndata

    if n_genes <= 0:
        return path
    ad = anndata.read_h5ad(path)
    x = sp.csr_matrix(ad.X)
    detected = np.bincount(x.indices, minlength=x.shape[1])
    genes = np.sort(np.argsort(-detected, kind="stable")[:n_genes])
    sub = anndata.AnnData(X=sp.csr_matrix(x[:, genes], dtype=np.float32), obs=ad.obs.copy(),
                          var=ad.var.iloc[genes].copy())
    out = tmp / f"{name}_top{n_genes}.h5ad"
    sub.write_h5ad(out)
    return out


# ---- comparison -------------------------------------------------------------------------------
def _rows(m, s: int, e: int) -> np.ndarray:
    b = m[s:e]
    return np.asarray(b.toarray() if sp.issparse(b) else b, dtype=np.float32)


def compare(a, b, block: int = 500) -> dict:
    """Max abs / relative difference, Pearson r of log1p and bit-identity of two matrices (dense
    or sparse), read by blocks of rows (float32, as both paths store the layers)."""
    if a.shape != b.shape:
        return {"shape": f"{a.shape} vs {b.shape}"}
    max_abs = max_rel = 0.0
    identical = True
    n = 0
    sx = sy = sxx = syy = sxy = 0.0
    for s in range(0, a.shape[0], block):
        e = min(s + block, a.shape[0])
        x, y = _rows(a, s, e), _rows(b, s, e)
        identical &= bool(np.array_equal(x, y))
        d = np.abs(x.astype(np.float64) - y)
        big = np.maximum(np.abs(x), np.abs(y)).astype(np.float64)
        max_abs = max(max_abs, float(d.max(initial=0.0)))
        nz = big > 0
        if nz.any():
            max_rel = max(max_rel, float((d[nz] / big[nz]).max()))
        lx = np.log1p(np.clip(x, 0, None).astype(np.float64)).ravel()
        ly = np.log1p(np.clip(y, 0, None).astype(np.float64)).ravel()
        n += lx.size
        sx, sy = sx + lx.sum(), sy + ly.sum()
        sxx, syy, sxy = sxx + lx @ lx, syy + ly @ ly, sxy + lx @ ly
    cov = sxy - sx * sy / n
    var = (sxx - sx * sx / n) * (syy - sy * sy / n)
    r = float(cov / np.sqrt(var)) if var > 0 else float("nan")
    return {"max_abs": max_abs, "max_rel": max_rel, "r_log1p": r, "identical": identical}


# ---- one parity case --------------------------------------------------------------------------
def case_params(method: str, setting: str, n_obs: int, sample: int) -> tuple[dict, int | None]:
    params = method_params(method)
    if setting == "defaults":
        return params, None
    size = sample if n_obs > sample else n_obs // 2
    for name in SAMPLE_PARAMS[method]:
        params[name] = size
    return params, size


def _file_params(params: dict) -> dict:
    """The method's parameters for ``impute_file``, whose own ``progress`` (its block bar) takes
    the name of saver's: saver then shows its bar in the chunked path (same numbers)."""
    return {k: v for k, v in params.items() if k != "progress"}


def run_case(dataset: str, path: Path, method: str, setting: str, chunk: int, sample: int,
             tmp: Path) -> list[dict]:
    import anndata

    import screpair

    ad = anndata.read_h5ad(path)
    params, size = case_params(method, setting, ad.n_obs, sample)
    before = set(ad.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        screpair.impute(ad, method, rng=SEED, **params)
        sec_mem = time.perf_counter() - t0
        out = tmp / f"{dataset}_{method}_{setting}.h5ad"
        t0 = time.perf_counter()
        record = screpair.impute_file(path, out, method, chunk_rows=chunk, rng=SEED,
                                      progress=False, overwrite=True, **_file_params(params))
        sec_file = time.perf_counter() - t0
    res = anndata.read_h5ad(out)
    rows = []
    for layer in sorted(set(ad.layers) - before):
        row = {"dataset": dataset, "method": method, "setting": setting, "layer": layer,
               "sample": size, "fit_cells_read": record.get("fit_cells_read"),
               "n_obs": ad.n_obs, "n_vars": ad.n_vars, "chunk_rows": chunk,
               "sec_mem": sec_mem, "sec_file": sec_file, "commit": _commit()}
        if layer not in res.layers:
            row["missing"] = "not in the impute_file output"
        else:
            row.update(compare(ad.layers[layer], res.layers[layer]))
        rows.append(row)
    out.unlink(missing_ok=True)
    return rows


# ---- masked protocol --------------------------------------------------------------------------
def results_md_masked(path: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """``{method: {"mse": (mean, sd), "pearson": (mean, sd)}}`` of RESULTS.md's pbmc3k masked
    table (empty when the file or section is missing)."""
    if not path.exists():
        return {}
    text = path.read_text()
    if RESULTS_SECTION not in text:
        return {}
    block = text.split(RESULTS_SECTION, 1)[1].split("\n## ", 1)[0]
    out = {}
    num = r"([0-9.]+) ± ([0-9.]+)"
    for line in block.splitlines():
        m = re.match(rf"\| (\w+) \| {num} \(\d+\) \| {num} \(\d+\) \|", line)
        if m:
            out[m.group(1)] = {"mse": (float(m.group(2)), float(m.group(3))),
                               "pearson": (float(m.group(4)), float(m.group(5)))}
    return out


def masked_params(method: str) -> dict:
    """The masked part runs alra, knn, saver, dae and vae at their defaults (as RESULTS.md),
    quietly; neural methods other than dae / vae at check_parity's tiny settings."""
    if method in ("dae", "vae"):
        return {"train": {"progress": False}}
    if method == "saver":
        return {"progress": False}
    if method in NEURAL:
        return method_params(method)
    return {}


def run_masked(path: Path, method: str, seed: int, sample: int, tmp: Path) -> list[dict]:
    import anndata

    import screpair
    from screpair.evaluate import Masked, run_method

    proto = Masked()
    task = proto.prepare(anndata.read_h5ad(path), rng=seed)
    inp = tmp / f"masked_{seed}.h5ad"
    if not inp.exists():
        task.adata.write_h5ad(inp)
    rows = []
    base = masked_params(method)
    variants = [("in-memory", None), ("chunked", None), ("chunked+sample", sample)]
    for variant, size in variants:
        params = dict(base)
        if size is not None:
            for name in SAMPLE_PARAMS[method]:
                params[name] = size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            if variant == "in-memory":
                imputed, _ = run_method(method, task.adata, rng=seed, params=params,
                                        progress=False)
            else:
                out = tmp / f"masked_{method}_{seed}_{variant}.h5ad"
                screpair.impute_file(inp, out, method, chunk_rows=500, rng=seed, progress=False,
                                     overwrite=True, **_file_params(params))
                lay = anndata.read_h5ad(out).layers[method]
                imputed = np.clip(lay.toarray() if sp.issparse(lay) else np.asarray(lay), 0, None)
                out.unlink(missing_ok=True)
            sec = time.perf_counter() - t0
        score = proto.score(task, imputed)
        rows.append({"part": "masked", "method": method, "seed": seed, "variant": variant,
                     "sample": size, "n_obs": task.adata.n_obs, "n_vars": task.adata.n_vars,
                     "mse": float(score["mse"]), "pearson": float(score["pearson"]),
                     "seconds": sec, "commit": _commit()})
    return rows


# ---- report -----------------------------------------------------------------------------------
def _g(v, fmt=".3g") -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def _sd(v: np.ndarray) -> float:
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent,
                               text=True, capture_output=True, check=True).stdout.strip()
        return sha + (" (src/ has uncommitted edits by others)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def verdict(row: dict) -> str:
    if "missing" in row or "shape" in row:
        return "**BUG**: " + row.get("missing", row.get("shape", ""))
    if row["identical"]:
        return "identical"
    return f"within {TOL_REL:g}" if row["max_rel"] <= TOL_REL else "**BUG**: differs"


def report(rows: list[dict], planned: list[tuple], masked_planned: list[tuple], args) -> str:
    parity = [r for r in rows if r.get("part") != "masked"]
    masked = [r for r in rows if r.get("part") == "masked"]
    seconds = sum(r["sec_mem"] + r["sec_file"] for r in parity if r["layer"] == r["method"])
    seconds += sum(r["seconds"] for r in masked)
    lines = [
        "# Parity: chunked path (`impute_file`) vs in-memory path (`impute`)",
        "",
        "Issue 16's parity check. Each method runs with the same parameters and seed "
        f"(`rng={SEED}`) through `screpair.impute` (in memory) and `screpair.impute_file` "
        f"(chunked, `chunk_rows={args.chunk_rows}`: several blocks on each dataset); every output "
        "layer of the in-memory path is compared with the file's. `defaults`: the methods' own "
        "sample sizes, above these datasets' cell counts (both paths fit on all cells). "
        f"`sample`: the sample size set to {args.sample} cells (half the cells where a dataset has "
        "fewer), so the chunked fit reads only the `_fit_rows` sample from the file "
        "(`fit cells read`). Neural methods (cnn, dae, vae, diffusion) at the tiny settings of "
        "`benchmarks/check_parity.py` (2 epochs, small networks: arithmetic, not accuracy). "
        "Max rel: `|a - b| / max(|a|, |b|)` over entries not both zero; r: Pearson of log1p "
        "values; identical: every float32 value equal.",
        "",
        f"- Command: `{args.command}`",
        f"- Commit of this report: {_commit()}; date: {datetime.date.today().isoformat()}; "
        "rows were run at: " + ", ".join(sorted({r.get("commit", "an earlier commit (not "
                                                        "recorded)") for r in rows})) + ".",
        f"- Genes: {'all' if args.n_genes <= 0 else f'the {args.n_genes} most-detected of each dataset'}"
        "; machine: 2 cores shared with another benchmark running at normal priority (this "
        "script under `nice -n 19`), so the seconds are slow and only comparable within a row.",
        f"- Time of all the runs in the tables together (both paths): {seconds / 60:.1f} min.",
        "",
    ]
    done = {(r["dataset"], r["method"], r["setting"]) for r in parity}
    for ds in dict.fromkeys(p[0] for p in planned):
        sub = [r for r in parity if r["dataset"] == ds]
        shape = f" ({sub[0]['n_obs']} cells x {sub[0]['n_vars']} genes)" if sub else ""
        lines += [f"## {ds}{shape}", "",
                  "| method | setting | layer | fit cells read | max abs | max rel | r log1p | "
                  "identical | verdict | s in memory | s chunked |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            fit = "all" if r["fit_cells_read"] is None else str(r["fit_cells_read"])
            if "max_abs" in r:
                cells = [_g(r["max_abs"]), _g(r["max_rel"]), _g(r["r_log1p"], ".7f"),
                         "yes" if r["identical"] else "no"]
            else:
                cells = ["—"] * 4
            lines.append(f"| {r['method']} | {r['setting']} | {r['layer']} | {fit} | "
                         + " | ".join(cells) + f" | {verdict(r)} | {r['sec_mem']:.1f} | "
                         f"{r['sec_file']:.1f} |")
        for p in planned:
            if p[0] == ds and p not in done:
                lines.append(f"| {p[1]} | {p[2]} | — | — | — | — | — | — | not run | — | — |")
        lines.append("")
    lines += ["knn's sample (`n_fit_cells`) is that of its PCA axes, drawn inside the fit: knn "
              "is transductive, so both paths read every cell (`fit cells read`: all) and the "
              "sample setting exercises the PCA on a sample, not the file path's sample read.",
              ""]
    bugs = [r for r in parity if verdict(r).startswith("**BUG")]
    same = [r for r in parity if "identical" in r and r["identical"]]
    close = [r for r in parity if "identical" in r and not r["identical"]
             and not verdict(r).startswith("**BUG")]
    lines += ["## Tolerance statement", "",
              "Expected: bit-identical everywhere. At the defaults both paths fit the same "
              "estimator on the same validated counts of all cells, and the posterior of these "
              "methods depends only on a cell's own row and the fitted state "
              "(`posterior_by_rows`), so a block of rows gets the same arithmetic as the whole "
              "matrix. With a sample, `impute` draws the same `_fit_rows` sample (first from the "
              "same `rng`) and fits on the same rows, which `impute_file` reads alone from the "
              "file; the cells' totals come from a streaming pass. Both store float32. "
              f"A row that is not bit-identical is accepted up to a max relative difference of "
              f"{TOL_REL:g} (float32 rounding of float64 sums taken in another order); above "
              "that it is a parity bug.", "",
              f"- Bit-identical: {len(same)} of {len(parity)} compared layers.",
              f"- Not identical, within {TOL_REL:g}: {len(close)}"
              + "".join(f"; {r['dataset']}/{r['method']}/{r['setting']}/{r['layer']} "
                        f"(max abs {_g(r['max_abs'])}, max rel {_g(r['max_rel'])})"
                        for r in close) + ".",
              f"- Beyond the tolerance (parity bugs): {len(bugs)}"
              + "".join(f"; {r['dataset']}/{r['method']}/{r['setting']}/{r['layer']} "
                        f"(max abs {_g(r.get('max_abs'))}, max rel {_g(r.get('max_rel'))}, "
                        f"r {_g(r.get('r_log1p'), '.6f')})" for r in bugs) + ".",
              ""]
    if masked_planned:
        ref = results_md_masked(HERE / "RESULTS.md")
        lines += ["## Masked protocol (pbmc3k)", "",
                  "`screpair.evaluate.Masked` as in `benchmarks/RESULTS.md` (genes detected in >= "
                  "50% of cells, 10% of their non-zeros hidden, seed = mask seed = method seed), "
                  "all of pbmc3k's genes before the protocol's filter. `in-memory`: "
                  "`evaluate.run_method` (RESULTS.md's path); `chunked`: `impute_file` at the "
                  "defaults; `chunked+sample`: `impute_file` with the sample size set to "
                  f"{args.sample} cells (a fit on a sample, so its scores may differ from the "
                  "all-cells fit). "
                  f"{', '.join(dict.fromkeys(m for m, _ in masked_planned))} at their defaults "
                  "(this commit's; RESULTS.md was run at an earlier commit's defaults); within "
                  "1 sd: |mean - RESULTS.md mean| <= RESULTS.md sd.", "",
                  "| method | variant | seeds | mse | pearson | RESULTS.md mse | RESULTS.md "
                  "pearson | mse within 1 sd | pearson within 1 sd | s per seed |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in dict.fromkeys(m for m, _ in masked_planned):
            for variant in ("in-memory", "chunked", "chunked+sample"):
                sub = [r for r in masked if r["method"] == method and r["variant"] == variant]
                if not sub:
                    lines.append(f"| {method} | {variant} | — | not run | | | | | | |")
                    continue
                mse = np.array([r["mse"] for r in sub])
                pr = np.array([r["pearson"] for r in sub])
                cells = [f"{mse.mean():.3f} ± {_g(_sd(mse), '.3f')}",
                         f"{pr.mean():.3f} ± {_g(_sd(pr), '.3f')}"]
                rr = ref.get(method)
                if rr:
                    cells += [f"{rr['mse'][0]:.3f} ± {rr['mse'][1]:.3f}",
                              f"{rr['pearson'][0]:.3f} ± {rr['pearson'][1]:.3f}",
                              "yes" if abs(mse.mean() - rr["mse"][0]) <= rr["mse"][1] else "no",
                              "yes" if abs(pr.mean() - rr["pearson"][0]) <= rr["pearson"][1]
                              else "no"]
                else:
                    cells += ["—"] * 4
                seeds = ",".join(str(r["seed"]) for r in sub)
                lines.append(f"| {method} | {variant} | {seeds} | " + " | ".join(cells)
                             + f" | {np.mean([r['seconds'] for r in sub]):.1f} |")
        lines.append("")
    if args.skipped_masked:
        lines += [f"Not in the masked part: {args.skipped_masked}.", ""]
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------
def _load(jsonl: Path | None) -> list[dict]:
    if jsonl is None or not jsonl.exists():
        return []
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    import screpair

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="pbmc3k,baron")
    parser.add_argument("--methods", default="alra,knn,saver,dae,vae,cnn,diffusion",
                        help=f"comma-separated; screpair has {screpair.available_methods()}")
    parser.add_argument("--settings", default="defaults,sample")
    parser.add_argument("--chunk-rows", type=int, default=500)
    parser.add_argument("--sample", type=int, default=1000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--masked-methods", default="alra,knn,saver,dae,vae",
                        help="'none' to skip the masked part")
    parser.add_argument("--masked-seeds", default="0,1,2,3,4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--jsonl", type=Path, default=None,
                        help="append rows here; rows already in it are not run again")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "PARITY.md")
    args = parser.parse_args(argv)
    args.command = "nice -n 19 python benchmarks/bench_parity_file.py " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only")
    unknown = set(args.methods.split(",")) - set(SAMPLE_PARAMS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {sorted(SAMPLE_PARAMS)}")
    masked_methods = [] if args.masked_methods == "none" else args.masked_methods.split(",")
    skipped = [m for m in SAMPLE_PARAMS if m not in masked_methods]
    args.skipped_masked = (", ".join(skipped) + " (cnn about 226 s and diffusion about 59 s a "
                           "seed per fit at their defaults in RESULTS.md, three fits a seed here, "
                           "on a shared 2-core machine; their parity is in the tables above)"
                           if skipped and masked_methods else "")
    planned = [(d, m, s) for m in args.methods.split(",") for d in args.datasets.split(",")
               for s in args.settings.split(",")]  # method-major: the fast ones first
    seeds = [int(s) for s in args.masked_seeds.split(",")]
    masked_planned = [(m, s) for m in masked_methods for s in seeds]
    rows = _load(args.jsonl)
    if not args.report_only:
        ddir = data_dir(args.data_dir)
        with tempfile.TemporaryDirectory(prefix="parity_") as tmpdir:
            tmp = Path(tmpdir)
            paths = {}
            done = {(r["dataset"], r["method"], r["setting"]) for r in rows
                    if r.get("part") != "masked"}
            for ds, method, setting in planned:
                if (ds, method, setting) in done:
                    continue
                if ds not in paths:
                    paths[ds] = prepare(ddir / DATASETS[ds], args.n_genes, tmp, ds)
                print(f"[parity] {ds} {method} {setting} ...", flush=True)
                new = run_case(ds, paths[ds], method, setting, args.chunk_rows, args.sample, tmp)
                _save(args.jsonl, new, rows)
            mdone = {(r["method"], r["seed"]) for r in rows if r.get("part") == "masked"}
            for method, seed in masked_planned:
                if (method, seed) in mdone:
                    continue
                print(f"[masked] {method} seed {seed} ...", flush=True)
                new = run_masked(ddir / DATASETS["pbmc3k"], method, seed, args.sample, tmp)
                _save(args.jsonl, new, rows)
    text = report(rows, planned, masked_planned, args)
    args.out.write_text(text + "\n")
    print(text)
    return 0


def _save(jsonl: Path | None, new: list[dict], rows: list[dict]) -> None:
    rows.extend(new)
    if jsonl is not None:
        with jsonl.open("a") as fh:
            for r in new:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
