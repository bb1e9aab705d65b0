"""cnnImpute masked-value accuracy (issue 5): 4 real datasets x 5 seeds, MSE and Pearson r.

Protocol (issue 5, as the peers were measured): keep genes with non-zero counts in >= 50% of cells,
drop cells with no counts left; zero out a random 10% of the non-zero entries (numpy
``default_rng(seed)``); the method sees only that masked matrix; truth and prediction are scored as
``log1p(x / L * 1e6)`` with ``L`` the masked matrix's row sums; MSE and Pearson r over the masked
entries.

Usage::

    python benchmarks/cnn_masked.py                       # all datasets, seeds 0-4, writes the table
    python benchmarks/cnn_masked.py --datasets pbmc3k --seeds 0 --no-write
    # in parallel pieces, then one table:
    python benchmarks/cnn_masked.py --datasets pbmc3k,baron_mouse --jsonl a.jsonl --no-write &
    python benchmarks/cnn_masked.py --datasets pbmc4k_top2000,soumillon_d3 --jsonl b.jsonl --no-write
    python benchmarks/cnn_masked.py --from-jsonl a.jsonl b.jsonl

Writes ``benchmarks/cnn_masked_results.md`` (mean +- sd over seeds, with the peers' seed-0 numbers
from issue 5 and the targets).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DATASETS = {
    "pbmc3k": "pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad",
    "baron_mouse": "baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad",
    "pbmc4k_top2000": "scdcc_benchmark/pbmc4k_10x_top2000genes.h5ad",
    "soumillon_d3": "soumillon2014_d3/soumillon2014_d3_sc_1754cells.h5ad",
}
# issue 5: best peer per metric (seed 0) -> cnn must reach MSE < mse_target and r > r_target
TARGETS = {
    "pbmc3k": (0.415, 0.825),
    "baron_mouse": (0.765, 0.728),
    "pbmc4k_top2000": (0.692, 0.853),
    "soumillon_d3": (0.473, 0.776),
}
PEERS = {  # gene mean, ALRA, MAGIC, scVI (MSE / r), issue 5
    "pbmc3k": "0.415/0.798 · 1.061/0.607 · 5.389/0.759 · 0.467/0.825",
    "baron_mouse": "0.881/0.501 · 1.842/0.351 · 9.688/0.507 · 0.765/0.728",
    "pbmc4k_top2000": "0.692/0.817 · 1.295/0.669 · 10.478/0.794 · 0.903/0.853",
    "soumillon_d3": "0.473/0.738 · 1.126/0.498 · 6.728/0.624 · 0.544/0.776",
}


def masked_task(adata, seed: int):
    """The issue-5 masked protocol (:class:`screpair.evaluate.Masked`)."""
    from screpair.evaluate import Masked

    proto = Masked()
    return proto, proto.prepare(adata, rng=seed)


def run_one(name: str, seed: int, params: dict) -> dict:
    import anndata as ad

    from screpair.methods.cnn import CNNImputer

    proto, task = masked_task(ad.read_h5ad(DATA / DATASETS[name]), seed)
    masked, mask = task.adata, task.truth["mask"]
    t0 = time.perf_counter()
    train = {**params.get("train", {}), "progress": False}
    est = CNNImputer(rng=seed, **{**params, "train": train}).fit(masked)
    post = est.posterior(masked)
    secs = time.perf_counter() - t0
    res = proto.score(task, post.mean)
    mse, r = res["mse"], res["pearson"]
    flagged = np.asarray((post.dropout_prob > est.threshold)[mask.nonzero()]).mean()
    return {
        "dataset": name,
        "seed": seed,
        "mse": mse,
        "r": r,
        "seconds": secs,
        "shape": list(masked.shape),
        "masked_flagged": float(flagged),
        "epochs": int(len(est.history_)),
        "n_groups": len(est.groups_),
    }


def _sd(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else 0.0


def write_table(rows: list[dict], params: dict, path: Path) -> None:
    lines = [
        "# cnnImpute masked-value accuracy (issue 5)",
        "",
        "Produced by `python benchmarks/cnn_masked.py` (protocol in that file's docstring).",
        f"CNNImputer parameters: `{json.dumps(params)}` (all others default).",
        "Seeds: " + ", ".join(sorted({str(r["seed"]) for r in rows})) + "; mean +- sd over seeds.",
        "",
        "| dataset | cells x kept genes | cnn MSE | cnn r | target MSE < | target r > | met | "
        "masked entries flagged missing | seconds | peers (gene mean · ALRA · MAGIC · scVI, MSE/r) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in DATASETS:
        rs = [r for r in rows if r["dataset"] == name]
        if not rs:
            continue
        mse = np.array([r["mse"] for r in rs])
        cor = np.array([r["r"] for r in rs])
        tm, tr = TARGETS[name]
        met = "yes" if (mse.mean() < tm and cor.mean() > tr) else "no"
        lines.append(
            f"| {name} | {rs[0]['shape'][0]} x {rs[0]['shape'][1]} | {mse.mean():.3f} +- {_sd(mse):.3f} "
            f"| {cor.mean():.3f} +- {_sd(cor):.3f} | {tm} | {tr} | {met} "
            f"| {np.mean([r['masked_flagged'] for r in rs]):.3f} "
            f"| {np.mean([r['seconds'] for r in rs]):.0f} | {PEERS[name]} |"
        )
    lines += [
        "",
        "Notes: paper settings throughout (T = 0.5, N = 512 with at least 4 subsets, 5 inputs per",
        "target, P = 50%, Adam lr 1e-4, batch 32, <= 150 epochs, patience 5, 90/10 split), plus the",
        "output bias started at each target's mean (see `CNNImputer` Notes). The dropout model",
        "flags every masked entry as missing on all four datasets (column 'flagged'), so every",
        "masked value is a CNN prediction. Peers are issue 5's seed-0 numbers. 'seconds' is the whole",
        "pipeline per run with 1 torch thread on the shared 2-core CPU under a load average of ~11",
        "(several runs in parallel): pessimistic, not a speed measurement.",
        "",
        "Per run:",
        "",
        "```",
        *(json.dumps(r) for r in rows),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--params", default="{}",
                   help='JSON dict of CNNImputer parameters, e.g. \'{"train": {"n_epochs": 50}}\'')
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=str(Path(__file__).with_name("cnn_masked_results.md")))
    p.add_argument("--jsonl", help="append each run's row to this file as it finishes")
    p.add_argument("--from-jsonl", nargs="+", help="only write the table from these row files")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args()
    params = json.loads(args.params)
    if args.from_jsonl:
        rows = [
            json.loads(line)
            for f in args.from_jsonl
            for line in Path(f).read_text().splitlines()
            if line.strip()
        ]
        write_table(rows, params, Path(args.out))
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            row = run_one(name, seed, params)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    if args.write:
        write_table(rows, params, Path(args.out))


if __name__ == "__main__":
    main()
