"""Masked-value protocol (issue 5) on the four issue-5 datasets, side by side with issue 5's table.

Runs :func:`screpair.evaluate.run_benchmark` with the ``masked`` protocol and prints, per dataset
and method, MSE and Pearson r (mean ± sd over seeds), the seconds and peak memory per run, and
the numbers issue 5 reported for the peers (seed 0, measured by the issue author on a 2-core CPU).

    python benchmarks/masked_issue5.py --methods gene_mean,knn,alra,magic,scvi --seeds 0,1,2,3,4 \
        --out /tmp/masked_issue5

Timings on a shared CPU are pessimistic.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DATASETS = {
    "pbmc3k_10x": "pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad",
    "baron2016_mouse_pancreas": "baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad",
    "pbmc4k_10x_top2000genes": "scdcc_benchmark/pbmc4k_10x_top2000genes.h5ad",
    "soumillon2014_d3": "soumillon2014_d3/soumillon2014_d3_sc_1754cells.h5ad",
}
# issue 5's table (seed 0): dataset -> method -> (MSE, r)
ISSUE5 = {
    "pbmc3k_10x": {"gene_mean": (0.415, 0.798), "alra": (1.061, 0.607), "magic": (5.389, 0.759),
                   "scvi": (0.467, 0.825)},
    "baron2016_mouse_pancreas": {"gene_mean": (0.881, 0.501), "alra": (1.842, 0.351),
                                 "magic": (9.688, 0.507), "scvi": (0.765, 0.728)},
    "pbmc4k_10x_top2000genes": {"gene_mean": (0.692, 0.817), "alra": (1.295, 0.669),
                                "magic": (10.478, 0.794), "scvi": (0.903, 0.853)},
    "soumillon2014_d3": {"gene_mean": (0.473, 0.738), "alra": (1.126, 0.498),
                         "magic": (6.728, 0.624), "scvi": (0.544, 0.776)},
}


def main() -> None:
    import anndata

    from screpair.evaluate import run_benchmark, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="gene_mean,knn,alra,magic,scvi")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--out", default=None, help="folder for results.csv/summary.md/PNGs")
    args = ap.parse_args()
    names = [d for d in args.datasets.split(",") if d]
    data = {d: anndata.read_h5ad(Path(args.data_dir) / DATASETS[d]) for d in names}
    start = time.perf_counter()
    res = run_benchmark(data, args.methods.split(","), ["masked"],
                        [int(s) for s in args.seeds.split(",")], args.out)
    total = time.perf_counter() - start
    summ = summarize(res)
    print(f"\nmasked protocol, seeds {args.seeds}; total {total:.0f} s")
    print(f"{'dataset':26s} {'method':10s} {'MSE':>15s} {'r':>15s} {'issue5 MSE/r':>14s} "
          f"{'s/run':>7s} {'peak MB':>8s}")
    for d in names:
        for m in args.methods.split(","):
            rows = summ[(summ.dataset == d) & (summ.method == m)].set_index("metric")
            if rows.empty:
                err = res[(res.dataset == d) & (res.method == m)]["error"].iloc[0]
                print(f"{d:26s} {m:10s} {'failed: ' + str(err)[:60]}")
                continue
            ref = ISSUE5.get(d, {}).get(m)
            ref_s = f"{ref[0]:.3f}/{ref[1]:.3f}" if ref else "-"
            mse, r = rows.loc["mse"], rows.loc["pearson"]
            print(f"{d:26s} {m:10s} {mse['mean']:7.3f} ± {mse['sd']:5.3f} "
                  f"{r['mean']:7.3f} ± {r['sd']:5.3f} {ref_s:>14s} {mse['seconds']:7.1f} "
                  f"{mse['peak_mem_mb']:8.0f}")


if __name__ == "__main__":
    main()
