"""Estimate the papers suite's wall time from the measured per-job seconds (issue 19).

``nice -n 19 python benchmarks/estimate_papers_suite.py`` (from the repository root; reads
``../shared/data`` to get each protocol's input shape, ~40 s). Per job the method's measured
``seconds`` from ``benchmarks/results/*/results.csv`` (and the cnn / saver numbers quoted in
benchmarks/README); unmeasured (method, dataset, protocol): the same method's measured job with
the nearest input size, scaled linearly by cells x genes (genes capped at the 5,000 HVGs of
diffusion / dae / vae; cnn by cells). Writes ``/tmp/est/estimate.csv`` and prints the tables
of the README's suite section.
"""
import glob
import os
import time

import numpy as np
import pandas as pd

from screpair.evaluate import _suites
from screpair.evaluate._benchmark import _load_datasets, _make_protocols


def prepared_shapes():
    suite = _suites.SUITES["papers"]
    folder = _suites._data_dir("../shared/data")
    out, cache = [], {}
    for run in suite.runs:
        pparams = {p: {k: (str(folder / v) if k.endswith("_path") else v) for k, v in kv.items()}
                   for p, kv in run.protocol_params.items()}
        protos = _make_protocols(run.protocols, pparams)
        for d in run.datasets:
            if d not in cache:
                cache[d] = _load_datasets({d: _suites._dataset(d, folder)})[d]
            for pn, proto in protos.items():
                t = time.perf_counter()
                task = proto.prepare(cache[d], rng=0)
                out.append({"run": run.name, "dataset": d, "protocol": pn,
                            "shape": list(task.adata.shape),
                            "prep_s": round(time.perf_counter() - t, 2)})
    return pd.DataFrame(out)


os.makedirs("/tmp/est", exist_ok=True)
shapes = prepared_shapes()
shapes["cells"] = shapes["shape"].map(lambda s: s[0])
shapes["genes"] = shapes["shape"].map(lambda s: s[1])
# names used by the older result folders -> suite names
ALIAS = {"baron2016_mouse1_822cells": "baron", "pbmc3k_2700cells_13714genes": "pbmc3k",
         "soumillon2014_d3_sc_1754cells": "soumillon", "pbmc4k_10x_top2000genes": "pbmc4k",
         "human_kidney_top2000genes": "kidney", "mouse_bladder_2100cells_allgenes": "bladder",
         "worm_neuron_top2000genes": "worm"}
FULL = {"pbmc3k": (2700, 13714), "baron": (822, 14878), "pbmc4k": (4271, 2000),
        "kidney": (5685, 2000), "bladder": (2100, 20670), "worm": (4186, 2000)}
rows = []
for f in glob.glob("benchmarks/results/**/results.csv", recursive=True):
    folder = f.split("/")[2]
    if folder in ("all", "degrade_all", "papers_fast_seed0") or folder.startswith("dropout"):
        continue  # duplicates of the per-run folders / other method variants
    r = pd.read_csv(f)
    r = r[r.status == "ok"].drop_duplicates(["dataset", "protocol", "method", "seed"])
    r["dataset"] = r["dataset"].replace(ALIAS)
    rows.append(r[["dataset", "protocol", "method", "seed", "seconds", "peak_mem_mb"]])
meas = pd.concat(rows)
meas = meas.groupby(["dataset", "protocol", "method"], as_index=False)[["seconds", "peak_mem_mb"]].mean()
fast = pd.read_csv("benchmarks/results/papers_fast_seed0/results.csv")
fast = fast[fast.status == "ok"].drop_duplicates(["dataset", "protocol", "method", "seed"])
# cnn at the issue-18 defaults, masked (cnn_issue18_masked.jsonl, whole pipeline, mean over seeds)
cj = pd.read_json("benchmarks/results/cnn_issue18_masked.jsonl", lines=True)
cj["dataset"] = cj["dataset"].map({"baron_mouse": "baron", "pbmc3k": "pbmc3k", "soumillon_d3": "soumillon"})
cnn = cj.groupby("dataset", as_index=False)["seconds"].mean().assign(protocol="masked", method="cnn")
meas = pd.concat([meas[meas.method != "cnn"], cnn])
# other measured points (benchmarks/README): cnn pbmc3k all genes 51 s (bench_cnn.py, defaults),
# saver pbmc3k all genes 60.8 s (bench_saver.py): as an MCV-sized job on pbmc3k
meas = pd.concat([meas, pd.DataFrame([
    {"dataset": "pbmc3k", "protocol": "mcv", "method": "cnn", "seconds": 51.0},
    {"dataset": "pbmc3k", "protocol": "mcv", "method": "saver", "seconds": 60.8}])])

def in_shape(d, p):
    s = shapes[(shapes.dataset == d) & (shapes.protocol == p)]
    if len(s):
        return int(s.cells.iloc[0]), int(s.genes.iloc[0])
    return FULL[d] if p != "degrade_reference" else (FULL[d][0], FULL[d][1])

HVG = {"dae": 5000, "vae": 5000, "diffusion": 5000}  # models the top 5,000 HVGs (_pairs)
def size(method, cells, genes):
    if method == "cnn":
        return cells  # cost: clustering + training over few ZINB targets, ~ cells
    return cells * min(genes, HVG.get(method, genes))

meas["size"] = [size(m, *in_shape(d, p)) for d, p, m in zip(meas.dataset, meas.protocol, meas.method, strict=False)]
suite = _suites.SUITES["papers"]
METHODS = [m for m in suite.methods if m != "scvi"]  # scvi-tools not installed: skipped
est = []
for run in suite.runs:
    seeds = run.seeds_for(suite)
    for d in run.datasets:
        for p in run.protocols:
            c, g = in_shape(d, p)
            for m in METHODS:
                f = fast[(fast.dataset == d) & (fast.protocol == p) & (fast.method == m)]
                if len(f):
                    sec, basis = float(f.seconds.iloc[0]), "measured (papers_fast_seed0)"
                else:
                    mm = meas[meas.method == m]
                    exact = mm[(mm.dataset == d) & (mm.protocol == p)]
                    if len(exact):
                        sec, basis = float(exact.seconds.iloc[0]), "measured"
                    else:
                        same = mm[mm.dataset == d]
                        pool = mm  # nearest input size over all datasets
                        s = size(m, c, g)
                        k = np.argmin(np.abs(np.log(pool["size"].to_numpy() / s)))
                        ref = pool.iloc[k]
                        sec = float(ref.seconds) * s / float(ref["size"])
                        basis = f"scaled from {ref.dataset}/{ref.protocol}"
                est.append(dict(run=run.name, dataset=d, protocol=p, method=m, n_seeds=len(seeds),
                                sec=sec, total=sec * len(seeds), basis=basis))
est = pd.DataFrame(est)
est.to_csv("/tmp/est/estimate.csv", index=False)
OVER = 4.0  # s per job: preparation + scoring + writing (fast run: ~20 min wall, 463 s in methods, 190 jobs)
n_jobs = est.n_seeds.sum()
print("jobs", n_jobs, "method hours", est.total.sum() / 3600, "overhead h", n_jobs * OVER / 3600)
pd.set_option("display.width", 200)
print((est.pivot_table(index="method", columns="run", values="total", aggfunc="sum") / 60).round(1))
print((est.groupby("run").total.sum() / 60).round(1))
print((est.groupby("method").total.sum() / 60).round(1).sort_values())
print(est[est.basis.str.startswith("scaled")].groupby("method").size())
