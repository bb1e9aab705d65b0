"""Named benchmark suites: the papers' whole evaluation (``papers``) and a minute-long version
on the demo data (``quick``), each a list of runs of :func:`run_benchmark` whose results are
combined into one report and one ranking.

A run pairs the datasets with the protocols that apply to them (the DEG protocol with the matched
bulk only on Soumillon, smFISH only on Grün, ...). Each run writes into its own folder under the
suite's output folder and is resumable (:func:`run_benchmark`'s ``resume``), so a suite that
takes hours can be continued after an interruption; the combined ``results.csv``, ``summary.md``
and figures are written at the top of the output folder when every run has finished, or at any
time from what the runs have recorded so far with :func:`report_suite` (CLI ``--report-only``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .._logging import get_logger, log_task
from ._benchmark import collect_results, run_benchmark, write_outputs

logger = get_logger(__name__)

#: where the real datasets live (``../shared/data`` as in the project's README), unless
#: ``data_dir=`` / ``SCREPAIR_DATA`` say otherwise
DEFAULT_DATA_DIR = "../shared/data"

_FILES = {
    "pbmc3k": "pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad",
    "baron": "baron2016_mouse_pancreas/baron2016_mouse1_822cells.h5ad",
    "soumillon": "soumillon2014_d3/soumillon2014_d3_sc_1754cells.h5ad",
    "pbmc4k": "scdcc_benchmark/pbmc4k_10x_top2000genes.h5ad",
    "kidney": "scdcc_benchmark/human_kidney_top2000genes.h5ad",
    "bladder": "scdcc_benchmark/mouse_bladder_2100cells_allgenes.h5ad",
    "worm": "scdcc_benchmark/worm_neuron_top2000genes.h5ad",
    "islam": "islam2011_mesc_mef/islam2011_92cells.h5ad",
    "grun": "grun2014_mesc/grun2014_160cells_4000genes_simmethods.h5ad",
}
_BULK = "soumillon2014_d3/soumillon2014_d3_bulk_UMI.csv.gz"
_FISH = "grun2014_mesc/grun2014_smFISH_counts_long.csv.gz"
#: a simulation with truth (DE genes, dropouts): the cnnImpute paper's Splatter setting
SPLAT = "splat_cnnimpute"

_SCREPAIR = ["cnn", "saver", "diffusion", "dae", "vae", "alra", "knn"]
_PEERS = ["raw", "gene_mean", "cqn", "magic", "scvi"]


@dataclass(frozen=True)
class SuiteRun:
    """One :func:`run_benchmark` call of a suite: datasets (names of ``_FILES``, ``SPLAT`` or
    ``"demo"``) x protocols, with per-protocol parameters (paths relative to the data folder).

    ``seeds``: the run's own seeds, used instead of the suite's unless the caller passes
    ``seeds=`` (CLI ``--seeds``); ``None``: the suite's. Runs whose protocols draw nothing at
    random (neither in the preparation nor in the scoring: ``deg``, ``smfish``) have one seed,
    so there the spread over seeds would measure only the methods' own training randomness.
    """

    name: str
    datasets: tuple[str, ...]
    protocols: tuple[str, ...]
    protocol_params: dict = field(default_factory=dict)
    seeds: tuple[int, ...] | None = None

    def seeds_for(self, suite: Suite, seeds: Sequence[int] | None = None) -> list[int]:
        """The seeds this run uses: ``seeds`` if given, else its own, else the suite's."""
        if seeds is not None:
            return [int(s) for s in seeds]
        return list(self.seeds if self.seeds is not None else suite.seeds)


@dataclass(frozen=True)
class Suite:
    runs: tuple[SuiteRun, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    method_params: dict = field(default_factory=dict)
    description: str = ""


_REAL = tuple(_FILES)
_SPARSE = ("kidney", "worm")
_LABELLED = ("pbmc3k", "baron", "soumillon", "pbmc4k", "kidney", "bladder", "worm", "islam")

SUITES: dict[str, Suite] = {
    "papers": Suite(
        description=(
            "cnnImpute's masked, clustering and DEG experiments, SAVER's downsampling and "
            "smFISH checks, Open Problems' MCV and DiffRepairer's two degrade tables, on every "
            "dataset of the data folder and the cnnImpute Splatter preset; 5 seeds where the "
            "protocol draws at random (masked, MCV, clustering's k-means, downsample, degrade), "
            "one seed for DEG and smFISH (nothing random: the seeds would only re-train the "
            "methods)"
        ),
        runs=(
            # the protocols never run on real data before come first (masked and degrade have
            # published results from other scripts), so an interrupted suite has the new ones
            SuiteRun("mcv", _REAL, ("mcv",)),
            SuiteRun("clustering", (*_LABELLED, SPLAT), ("clustering",)),
            # DEG and smFISH draw nothing at random (same input, deterministic scores): one seed
            SuiteRun("deg_bulk", ("soumillon",), ("deg",), {"deg": {"bulk_path": _BULK}},
                     seeds=(0,)),
            SuiteRun("deg_splat", (SPLAT,), ("deg",), seeds=(0,)),
            SuiteRun("smfish", ("grun",), ("smfish",), {"smfish": {"fish_path": _FISH}},
                     seeds=(0,)),
            SuiteRun("downsample", ("pbmc3k", "baron", "soumillon", "bladder"), ("downsample",)),
            SuiteRun("masked", tuple(d for d in _REAL if d not in _SPARSE), ("masked",)),
            # cnnImpute masks genes detected in >= 50% of cells; the two sparsest sets have almost
            # none (worm: 0, kidney: 11), so they mask genes detected in >= 10% of cells
            SuiteRun("masked_sparse", _SPARSE, ("masked",), {"masked": {"min_frac_cells": 0.1}}),
            SuiteRun("degrade", ("pbmc3k", "baron"), ("degrade", "degrade_reference")),
        ),
        methods=(*_SCREPAIR, *_PEERS),
        seeds=(0, 1, 2, 3, 4),
    ),
    "quick": Suite(
        description="every protocol that runs on the bundled demo data, fast methods, one seed",
        runs=(
            SuiteRun("demo", ("demo",),
                     ("masked", "mcv", "clustering", "deg", "downsample", "degrade")),
        ),
        methods=("raw", "gene_mean", "cqn", "knn", "alra"),
        seeds=(0,),
    ),
}


def _dataset(name: str, data_dir: Path):
    """The dataset ``name`` as :func:`run_benchmark` takes it: a path, or a callable making it
    (read or made only when a job needs it: a resumed run skips the finished runs' datasets)."""
    if name == "demo":
        from .. import datasets

        return datasets.demo
    if name == SPLAT:
        from .. import simulate

        return functools.partial(simulate.splat, preset="cnnimpute", rng=0)
    return data_dir / _FILES[name]


def _data_dir(data_dir) -> Path:
    return Path(data_dir or os.environ.get("SCREPAIR_DATA") or DEFAULT_DATA_DIR).expanduser()


def _suite(name: str) -> Suite:
    """The suite ``name`` of :data:`SUITES` (an unknown name refused)."""
    if name not in SUITES:
        msg = f"unknown suite {name!r}; available: {', '.join(SUITES)}."
        raise ValueError(msg)
    return SUITES[name]


def check_suite(name: str, *, data_dir=None) -> Suite:
    """The suite ``name``, after checking that every file it needs is in the data folder."""
    suite, folder = _suite(name), _data_dir(data_dir)
    need = {_FILES[d] for r in suite.runs for d in r.datasets if d in _FILES}
    need |= {v for r in suite.runs for p in r.protocol_params.values() for k, v in p.items()
             if k.endswith("_path")}
    missing = sorted(f for f in need if not (folder / f).exists())
    if missing:
        msg = (f"suite {name!r} needs {len(missing)} file(s) missing from the data folder "
               f"'{folder}' (e.g. {missing[0]}); pass data_dir= (CLI: --data-dir) or set "
               "SCREPAIR_DATA.")
        raise FileNotFoundError(msg)
    return suite


def run_suite(
    name: str,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    method_params: dict | None = None,
    plots: bool = True,
    progress: bool = True,
    resume: bool = True,
    command: str | None = None,
) -> pd.DataFrame:
    """Run the named suite (:data:`SUITES`) into ``out_dir`` and return the combined results.

    ``methods`` / ``method_params`` override the suite's; ``seeds`` overrides the suite's and
    every run's own (:attr:`SuiteRun.seeds`: the DEG and smFISH runs of ``papers`` have one
    seed). Each run writes into
    ``out_dir/<run>/`` and is resumed from its ``jobs.csv`` unless ``resume=False``; the combined
    ``results.csv``, ``summary.md`` (with the overall ranking) and plots go into ``out_dir``.
    """
    suite = check_suite(name, data_dir=data_dir)
    folder = _data_dir(data_dir)
    out = Path(out_dir)
    parts = []
    for run in suite.runs:
        data = {d: _dataset(d, folder) for d in run.datasets}
        pparams = {p: {k: (str(folder / v) if k.endswith("_path") else v) for k, v in kv.items()}
                   for p, kv in run.protocol_params.items()}
        with log_task(f"suite {name!r}: run {run.name!r}", logger):
            parts.append(run_benchmark(
                data, list(methods or suite.methods), run.protocols,
                run.seeds_for(suite, seeds), out / run.name,
                method_params={**suite.method_params, **(method_params or {})},
                protocol_params=pparams, plots=plots, progress=progress, resume=resume,
                command=command))
    results = pd.concat(parts, ignore_index=True)
    write_outputs(results, out, plots=plots, command=command)
    return results


def suite_results(name: str, out_dir: str | os.PathLike) -> pd.DataFrame:
    """What the runs of suite ``name`` have recorded so far in ``out_dir``: per run folder, the
    finished jobs of its ``jobs.csv`` and the failed / skipped jobs of its last ``results.csv``
    (:func:`~screpair.evaluate._benchmark.collect_results`), combined. Runs not started yet
    contribute nothing; a run still going contributes the jobs finished so far."""
    out = Path(out_dir)
    parts = [collect_results(out / run.name) for run in _suite(name).runs]
    parts = [p for p in parts if not p.empty]
    if not parts:
        msg = (f"no job of suite {name!r} recorded in '{out}' (looked for "
               f"<run>/jobs.csv, e.g. '{out / _suite(name).runs[0].name / 'jobs.csv'}').")
        raise FileNotFoundError(msg)
    return pd.concat(parts, ignore_index=True)


def report_suite(name: str, out_dir: str | os.PathLike, *, plots: bool = True,
                 command: str | None = None) -> pd.DataFrame:
    """Write the combined ``results.csv``, ``summary.md`` and figures of suite ``name`` into
    ``out_dir`` from what its runs have recorded so far (:func:`suite_results`), without running
    anything: the report of a suite that is still running or was interrupted. The embedding
    plots need the imputed data and are not redrawn. Returns the combined results."""
    results = suite_results(name, out_dir)
    write_outputs(results, out_dir, plots=plots, command=command)
    return results
