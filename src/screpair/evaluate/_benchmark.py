"""The benchmark runner: datasets x protocols x methods x seeds -> tidy CSV, markdown, plots.

Everything runs in this process. Each job (dataset, protocol, method, seed) is timed and its peak
memory sampled; a failing method is recorded as ``failed`` with its error and the run goes on, a
peer whose package is missing as ``skipped``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._logging import get_logger, log_task
from .._utils import to_dense
from ._metrics import GREATER_IS_BETTER, UNRANKED
from ._peers import PEERS
from ._protocols import Protocol, Task, get_protocol

logger = get_logger(__name__)

COLUMNS = ["dataset", "protocol", "method", "seed", "metric", "value", "seconds", "peak_mem_mb",
           "status", "error"]
#: Columns of ``calibration.csv``: one row per (dataset, protocol, method, seed, probability bin).
CALIBRATION_COLUMNS = ["dataset", "protocol", "method", "seed", "bin_lo", "bin_hi", "mean_prob",
                       "frac_dropout", "n"]


# --------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc, else psutil, else NaN)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except ImportError:
            return float("nan")


class PeakMemory:
    """Context manager measuring a job's peak extra memory in MiB.

    ``peak_mb`` is the larger of (a) the peak of Python/numpy allocations made inside the block
    (:mod:`tracemalloc`, which numpy reports to) and (b) the highest resident set size sampled every
    ``interval`` s minus the RSS on entry (catches torch/BLAS buffers that tracemalloc does not
    see, but not memory the process had already reserved before).
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        import tracemalloc

        self._own_trace = not tracemalloc.is_tracing()
        if self._own_trace:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._traced0 = tracemalloc.get_traced_memory()[0]
        self._start = _rss_mb()
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._max = max(self._max, _rss_mb())

    def __exit__(self, *exc) -> None:
        import tracemalloc

        self._stop.set()
        self._thread.join()
        self._max = max(self._max, _rss_mb())
        traced = (tracemalloc.get_traced_memory()[1] - self._traced0) / 2**20
        if self._own_trace:
            tracemalloc.stop()
        rss = self._max - self._start if np.isfinite(self._max - self._start) else 0.0
        self.peak_mb = float(max(rss, traced, 0.0))


# --------------------------------------------------------------------------- methods
def make_method(name: str, *, rng: int = 0, params: Mapping | None = None,
                progress: bool = True):
    """Estimator for a benchmark method: a peer/baseline (``raw``, ``gene_mean``, ``cqn``,
    ``magic``, ``scvi``) or any name in the screpair method registry. ``progress=False`` turns off the
    method's own progress bars (``progress`` parameter or ``train`` settings) unless ``params``
    sets them."""
    from ..methods._api import make_estimator, quiet_estimator

    params = dict(params or {})
    if name in PEERS:
        params.setdefault("rng", rng)
        return PEERS[name](**params)
    est = make_estimator(name, rng=rng, **params)
    if not progress:
        quiet_estimator(est, params)
    return est


def run_method(name: str, adata: AnnData, *, rng: int = 0, params: Mapping | None = None,
               reference: AnnData | None = None, progress: bool = True):
    """Fit ``name`` on ``adata`` (counts in X) and return ``(imputed ndarray, Posterior)``.

    With a clean ``reference`` (same genes), methods that train on clean profiles
    (``uses_reference``) are fitted on it instead and then repair ``adata``. ``progress``: see
    :func:`make_method`.
    """
    est = make_method(name, rng=rng, params=params, progress=progress)
    use_ref = reference is not None and getattr(est, "uses_reference", False)
    post = est.fit(reference if use_ref else adata).posterior(adata)
    mean = np.asarray(to_dense(post.mean), dtype=np.float64)
    if mean.shape != adata.shape:
        msg = f"method {name!r} returned shape {mean.shape}, expected {adata.shape}."
        raise ValueError(msg)
    if not np.all(np.isfinite(mean)):
        msg = f"method {name!r} returned non-finite values."
        raise ValueError(msg)
    return np.clip(mean, 0.0, None), post


# --------------------------------------------------------------------------- datasets
class _Datasets(Mapping):
    """The benchmark's datasets by name, each read (a path) or made (a callable: a simulation)
    when a job first needs it, so a resumed run whose jobs on a dataset all finished never reads
    it. One read dataset is held at a time (jobs come ordered by dataset); AnnData given in
    memory are held as given. Missing files are refused when it is built, before any work."""

    def __init__(self, sources: dict):
        for v in sources.values():
            if isinstance(v, (str, os.PathLike)) and not Path(v).exists():
                msg = f"dataset not found: {v}"
                raise FileNotFoundError(msg)
        self._sources, self._held = sources, (None, None)

    def __getitem__(self, name: str) -> AnnData:
        src = self._sources[name]
        if isinstance(src, AnnData):
            return src
        if self._held[0] != name:
            self._held = (None, None)  # the previous one released before the next is read
            self._held = (name, src() if callable(src) else _read(src))
        return self._held[1]

    def __iter__(self):
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _load_datasets(datasets) -> _Datasets:
    """``datasets`` (an AnnData, a path, a list of paths, or a mapping of names to AnnData,
    paths or callables returning an AnnData) as a :class:`_Datasets` by name."""
    if isinstance(datasets, AnnData):
        return _Datasets({"data": datasets})
    if isinstance(datasets, Mapping):
        return _Datasets({str(k): v for k, v in datasets.items()})
    if isinstance(datasets, (str, os.PathLike)):
        datasets = [datasets]
    out = {}
    for p in datasets:
        name = Path(p).name
        for suffix in (".h5ad", ".gz"):
            name = name.removesuffix(suffix)
        out[name] = p
    return _Datasets(out)


def _read(path) -> AnnData:
    import anndata

    p = Path(path)
    if not p.exists():
        msg = f"dataset not found: {path}"
        raise FileNotFoundError(msg)
    return anndata.read_h5ad(p)


@dataclass
class _Job:
    """One (dataset, protocol, method, seed) of a benchmark run."""

    dataset: str
    protocol: str
    method: str
    seed: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset, self.protocol, self.method, self.seed)

    @property
    def task_key(self) -> tuple[str, str, int]:
        """The prepared task this job uses (shared by the methods of a dataset, protocol, seed)."""
        return (self.dataset, self.protocol, self.seed)

    def row(self, **values) -> dict:
        """A results row of this job (:data:`COLUMNS`)."""
        return {"dataset": self.dataset, "protocol": self.protocol, "method": self.method,
                "seed": self.seed, **values}

    def failure_row(self, status: str, error: str) -> dict:
        """The one row of a job that did not run (``status``: ``failed`` or ``skipped``)."""
        return self.row(metric="", value=np.nan, seconds=np.nan, peak_mem_mb=np.nan,
                        status=status, error=error)


#: per-job log of finished jobs in ``out_dir`` (what ``resume=True`` reads back)
JOURNAL = "jobs.csv"


def _read_journal(path: Path) -> dict[tuple, list[dict]]:
    """The rows of the jobs that finished with status ``ok`` in an earlier run, by job."""
    if not path.is_file():
        return {}
    try:
        old = pd.read_csv(path, keep_default_na=False, na_values=[""], on_bad_lines="skip")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        logger.warning("could not read '%s'; starting the benchmark afresh", path)
        return {}
    if list(old.columns) != COLUMNS:
        return {}
    old["error"] = old["error"].fillna("")
    old["metric"] = old["metric"].fillna("")
    done: dict[tuple, list[dict]] = {}
    for key, block in old.groupby(["dataset", "protocol", "method", "seed"], sort=False):
        if (block["status"] == "ok").all():
            done[(str(key[0]), str(key[1]), str(key[2]), int(key[3]))] = block.to_dict("records")
    return done


def _append_journal(path: Path | None, rows: list[dict]) -> None:
    """Append a finished job's rows (flushed: an interrupt keeps every finished job)."""
    if path is None or not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(f, header=new, index=False)
        f.flush()
        os.fsync(f.fileno())


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """A ``results.csv`` or ``jobs.csv`` written by the runner, read back as it was written:
    empty ``metric`` / ``error`` cells stay empty strings (not NaN), columns :data:`COLUMNS`."""
    res = pd.read_csv(path, keep_default_na=False, na_values=[""], on_bad_lines="skip")
    missing = [c for c in COLUMNS if c not in res.columns]
    if missing:
        msg = f"'{path}' is not a benchmark results table (no column(s) {missing})."
        raise ValueError(msg)
    res = res[COLUMNS].copy()
    res["metric"] = res["metric"].fillna("").astype(str)
    res["error"] = res["error"].fillna("").astype(str)
    # a line cut short by an interrupt has no status: dropped
    res = res[res["status"].isin(["ok", "failed", "skipped"])]
    res["seed"] = res["seed"].astype(int)
    return res.reset_index(drop=True)


def collect_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Every job a (possibly unfinished) run has recorded in ``out_dir``: the finished jobs of
    ``jobs.csv`` (:data:`JOURNAL`, written as each job ends) plus, from the ``results.csv`` of the
    last pass that ended, the jobs not in the journal (the failed and skipped ones). Empty
    (:data:`COLUMNS`) when neither file is there."""
    folder = Path(out_dir)
    keys = ["dataset", "protocol", "method", "seed"]
    parts = []
    journal = folder / JOURNAL
    if journal.is_file():
        done = _read_journal(journal)  # only jobs whose every row is ok
        parts.append(pd.DataFrame([r for rows in done.values() for r in rows], columns=COLUMNS))
    final = folder / "results.csv"
    if final.is_file():
        old = read_results(final)
        have = set(map(tuple, parts[0][keys].astype({"seed": int}).itertuples(index=False))
                   ) if parts else set()
        new = [tuple(k) not in have for k in old[keys].itertuples(index=False)]
        parts.append(old[new])
    if not parts:
        return pd.DataFrame(columns=COLUMNS)
    res = pd.concat(parts, ignore_index=True)
    res["seed"] = res["seed"].astype(int)
    res["metric"] = res["metric"].fillna("").astype(str)
    res["error"] = res["error"].fillna("").astype(str)
    return res


# --------------------------------------------------------------------------- runner
def run_benchmark(
    datasets,
    methods: Sequence[str],
    protocols: Sequence[str | Protocol] = ("masked",),
    seeds: Sequence[int] = (0,),
    out_dir: str | os.PathLike | None = None,
    *,
    method_params: Mapping[str, Mapping] | None = None,
    protocol_params: Mapping[str, Mapping] | None = None,
    plots: bool = True,
    progress: bool = True,
    command: str | None = None,
    resume: bool = False,
) -> pd.DataFrame:
    """Run every method on every dataset, protocol and seed and write the results.

    Parameters
    ----------
    datasets
        ``.h5ad`` paths, a mapping ``name -> AnnData | path | callable`` (a callable returns
        the AnnData, e.g. a simulation), or one AnnData. Raw counts in ``X``. Paths are
        checked at once; each dataset is read (or made) when a job first needs it, so a resumed
        run does not read the datasets whose jobs all finished.
    methods
        Method names: any registered screpair method (:func:`screpair.available_methods`) or a
        peer/baseline: ``raw``, ``gene_mean``, ``cqn``, ``magic``, ``scvi``. A method that
        fails is recorded as ``failed``, one whose package is missing as ``skipped``.
    protocols
        Protocol names (``masked``, ``mcv``, ``clustering``, ``deg``, ``dropout``, ``degrade``,
        ``degrade_reference``, ``smfish``, ``downsample``; see
        :data:`~screpair.evaluate.PROTOCOLS`) or :class:`~screpair.evaluate.Protocol` instances.
        Each (dataset, protocol, seed) is prepared once for all methods; a preparation that
        fails marks its jobs ``failed``.
    seeds
        Seeds; each seeds both the protocol's randomness (the mask, the MCV split) and the method.
    out_dir
        Folder for ``results.csv``, ``summary.md``, ``calibration.csv`` (reliability-diagram
        tables of the dropout protocol) and the PNG plots; ``None`` writes nothing.
    method_params
        Per-method parameters, e.g. ``{"scvi": {"max_epochs": 5}}``.
    protocol_params
        Per-protocol parameters, e.g. ``{"clustering": {"label_key": "cell_type"}}``.
    plots
        Write PNG plots (matplotlib, Agg backend).
    progress
        Show one tqdm bar over the jobs.
    command
        The command line that regenerates the run, quoted at the top of ``summary.md``.
    resume
        Continue an interrupted run: every finished job is appended to ``out_dir/jobs.csv`` as
        it ends, and with ``resume=True`` the jobs found there with status ``ok`` are not run
        again (their rows are reused; their embeddings and calibration tables are not redrawn).
        Without it ``jobs.csv`` is started afresh.

    Returns
    -------
    The tidy results: one row per (dataset, protocol, method, seed, metric) with columns
    ``dataset, protocol, method, seed, metric, value, seconds, peak_mem_mb, status, error``
    (``status``: ``ok``, ``failed`` or ``skipped``; failed/skipped jobs have one row with an empty
    metric and the error message). The reliability-diagram tables are in
    ``results.attrs["calibration"]``, a list of records with the columns
    :data:`CALIBRATION_COLUMNS` (``pd.DataFrame(results.attrs["calibration"])``; empty without
    the dropout protocol).
    """
    from tqdm.auto import tqdm

    method_params = dict(method_params or {})
    for name, params in method_params.items():
        if "rng" in (params or {}):
            msg = (f"method_params[{name!r}] sets 'rng', but the benchmark seeds every method "
                   "with the job's seed; choose the seeds with seeds= (CLI: --seeds).")
            raise ValueError(msg)
    data = _load_datasets(datasets)
    protos = _make_protocols(protocols, dict(protocol_params or {}))
    methods = list(dict.fromkeys(methods))
    seeds = [int(s) for s in seeds]
    jobs = [_Job(d, p, m, s) for d in data for p in protos for s in seeds for m in methods]
    journal, done = _start_journal(out_dir, resume)

    rows: list[dict] = []
    embeddings: dict[tuple[str, str], np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    calibs: list[pd.DataFrame] = []
    tasks = _CurrentTask(data, protos)
    bar = tqdm(jobs, desc="benchmark", unit="job", disable=not progress)
    for job in bar:
        bar.set_postfix_str(f"{job.dataset}/{job.protocol}/{job.method}/seed{job.seed}")
        if job.key in done:  # finished in an earlier, interrupted run
            rows += done[job.key]
            continue
        task, error = tasks.get(job)
        if task is None:
            rows.append(job.failure_row("failed", error))
            continue
        proto = protos[job.protocol]
        job_rows, imputed, calib = _run_job(job, proto, task, progress=progress,
                                            params=method_params.get(job.method))
        rows += job_rows
        if imputed is None:  # failed or skipped: not journaled, so a resumed run retries it
            continue
        _append_journal(journal, job_rows)
        if calib is not None:
            calibs.append(calib)
        if plots and job.seed == seeds[0]:
            _add_embedding(embeddings, labels, proto, task, job, imputed,
                           with_raw="raw" not in methods)
    bar.close()
    results, calibration = _results_frame(rows, calibs)
    if out_dir is not None:
        write_outputs(results, out_dir, embeddings=embeddings, labels=labels, plots=plots,
                      command=command, calibration=calibration)
    return results


def _make_protocols(protocols: Sequence[str | Protocol], protocol_params: Mapping[str, Mapping]
                    ) -> dict[str, Protocol]:
    """Protocol instances by name, each built with its ``protocol_params`` entry."""
    protos = {}
    for p in protocols:
        params = protocol_params.get(p if isinstance(p, str) else p.name, {})
        proto = get_protocol(p, **dict(params))
        protos[proto.name] = proto
    return protos


def _start_journal(out_dir, resume: bool) -> tuple[Path | None, dict[tuple, list[dict]]]:
    """The journal path (``None`` without ``out_dir``) and the finished jobs to reuse: those of
    the journal with ``resume=True``; without it the journal is started afresh."""
    if out_dir is None:
        return None, {}
    journal = Path(out_dir) / JOURNAL
    if resume:
        done = _read_journal(journal)
        logger.info("resuming: %d finished jobs found in '%s'", len(done), journal)
        return journal, done
    journal.unlink(missing_ok=True)
    return journal, {}


class _CurrentTask:
    """The prepared task of the current (dataset, protocol, seed), prepared when a job first
    needs it. Jobs come ordered by task, so one task is held at a time (the previous one is
    released before the next is prepared), and a task whose jobs all finished in an earlier run
    is never prepared."""

    def __init__(self, data: Mapping[str, AnnData], protos: Mapping[str, Protocol]):
        self.data, self.protos = data, protos
        self.key: tuple | None = None
        self.task: Task | None = None
        self.error: str | None = None

    def get(self, job: _Job) -> tuple[Task | None, str | None]:
        """``(task, None)``, or ``(None, error)`` when the preparation failed."""
        if job.task_key != self.key:
            self.key, self.task, self.error = job.task_key, None, None
            try:
                what = f"preparing {job.protocol} on {job.dataset} (seed {job.seed})"
                with log_task(what, logger):
                    proto = self.protos[job.protocol]
                    self.task = proto.prepare(self.data[job.dataset], rng=job.seed)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                self.error = f"protocol preparation failed: {type(e).__name__}: {e}"
                logger.warning("%s/%s seed %s: %s", job.dataset, job.protocol, job.seed,
                               self.error)
        return self.task, self.error


def _run_job(job: _Job, proto: Protocol, task: Task, *, params: Mapping | None, progress: bool
             ) -> tuple[list[dict], np.ndarray | None, pd.DataFrame | None]:
    """Run one method on a prepared task (timed, peak memory measured) and score it.

    Returns the job's rows (one per metric, status ``ok``; or one ``skipped`` row when the
    method's package is missing, one ``failed`` row when it raised), the imputed counts
    (``None`` unless ``ok``) and the calibration table with the job's columns in front (or
    ``None``).
    """
    try:
        with log_task(f"{job.method} on {job.dataset}/{job.protocol} (seed {job.seed})",
                      logger), PeakMemory() as mem:
            start = time.perf_counter()
            imputed, post = run_method(job.method, task.adata, rng=job.seed, params=params,
                                       reference=task.reference, progress=progress)
            seconds = time.perf_counter() - start
        scores = proto.score(task, imputed, post)
        calib = proto.calibration(task, post)
    except ImportError as e:
        row = job.failure_row("skipped", _one_line(e, with_notes=True))
        logger.warning("skipping %s: %s", job.method, row["error"])
        return [row], None, None
    except Exception as e:  # noqa: BLE001 - a failing method must not stop the run
        row = job.failure_row("failed", _one_line(e))
        logger.warning("%s failed on %s/%s seed %s: %s", job.method, job.dataset,
                       job.protocol, job.seed, row["error"])
        logger.debug("%s", traceback.format_exc())
        return [row], None, None
    rows = [job.row(metric=metric, value=float(value), seconds=seconds,
                    peak_mem_mb=mem.peak_mb, status="ok", error="")
            for metric, value in scores.items()]
    if calib is not None:
        base = job.row()
        calib = calib.assign(**base)[[*base, *calib.columns]]
    return rows, imputed, calib


def _add_embedding(embeddings: dict, labels: dict, proto: Protocol, task: Task, job: _Job,
                   imputed: np.ndarray, *, with_raw: bool) -> None:
    """Keep the protocol's 2-D embedding of ``imputed`` (and the task's labels) for the plots;
    ``with_raw``: also the embedding of the raw input, once per dataset."""
    emb = proto.embedding(task, imputed)
    if emb is None:
        return
    embeddings[(job.dataset, job.method)] = emb
    labels[job.dataset] = task.truth.get("labels")
    if with_raw and (job.dataset, "raw") not in embeddings:
        embeddings[(job.dataset, "raw")] = proto.embedding(task, task.adata.X)


def _results_frame(rows: list[dict], calibs: list[pd.DataFrame]
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy results (:data:`COLUMNS`) and the jobs' calibration tables in one frame
    (:data:`CALIBRATION_COLUMNS`), also stored as records in ``results.attrs["calibration"]``
    (records, not a DataFrame: pandas compares attrs when concatenating results)."""
    results = pd.DataFrame(rows, columns=COLUMNS)
    calibration = (pd.concat(calibs, ignore_index=True) if calibs
                   else pd.DataFrame(columns=[*CALIBRATION_COLUMNS]))
    results.attrs["calibration"] = calibration.to_dict("records")
    return results, calibration


def _one_line(e: BaseException, *, with_notes: bool = False) -> str:
    text = f"{type(e).__name__}: {e}"
    if with_notes:
        text += "".join(f" {n}" for n in getattr(e, "__notes__", []))
    return " ".join(text.split())


# --------------------------------------------------------------------------- summaries
def missing_jobs(results: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """The (dataset, protocol) pairs of a partial run that lack some of the run's jobs.

    A pair's jobs are every method that has a row (of any status) for that protocol on any
    dataset, times every seed that has a row for the pair. A job without any row (not run yet)
    is missing; a failed or skipped job has its row and counts as done. Returns
    ``{(dataset, protocol): ["method", "method (seed 1, 2)", ...]}`` for the incomplete pairs
    (a method missing on every seed is named alone), sorted; complete pairs are left out.
    """
    if results.empty:
        return {}
    methods = results.groupby("protocol", sort=False)["method"].agg(lambda m: sorted(set(m)))
    out = {}
    for (d, p), block in results.groupby(["dataset", "protocol"], sort=False):
        seeds = sorted({int(v) for v in block["seed"]})
        have = block.groupby("method")["seed"].agg(lambda v: {int(x) for x in v})
        lack = []
        for m in methods[p]:
            gone = [s for s in seeds if s not in have.get(m, set())]
            if len(gone) == len(seeds):
                lack.append(m)
            elif gone:
                lack.append(f"{m} (seed {', '.join(map(str, gone))})")
        if lack:
            out[(d, p)] = lack
    return out


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and number of seeds per (dataset, protocol, method, metric), plus the method's
    rank among the methods of that (dataset, protocol, metric) (1 = best; ties share the
    average rank; direction from :data:`~screpair.evaluate.GREATER_IS_BETTER`; NaN for the
    metrics that are only reported, such as ``zeros_imputed``, and for every metric of a
    (dataset, protocol) pair that some of the run's jobs have not reached yet,
    :func:`missing_jobs`: a pair with one finished method would rank it first, so a partial
    report ranks only complete pairs)."""
    ok = results[(results["status"] == "ok") & results["metric"].astype(bool)]
    cols = ["dataset", "protocol", "method", "metric"]
    if ok.empty:
        return pd.DataFrame(columns=[*cols, "mean", "sd", "n", "seconds", "peak_mem_mb", "rank"])
    g = ok.groupby(cols, sort=False)
    summ = g["value"].agg(mean="mean", sd="std", n="count").reset_index()
    summ["sd"] = summ["sd"].fillna(0.0)
    summ = summ.merge(g[["seconds", "peak_mem_mb"]].mean().reset_index(), on=cols)

    sign = summ["metric"].map(lambda m: -1.0 if GREATER_IS_BETTER.get(m, True) else 1.0)
    summ["rank"] = (summ["mean"] * sign).groupby(
        [summ["dataset"], summ["protocol"], summ["metric"]], sort=False
    ).rank(method="average")
    summ.loc[summ["metric"].isin(UNRANKED), "rank"] = np.nan  # reported, not ranked
    partial = missing_jobs(results)
    if partial:
        pairs = pd.MultiIndex.from_frame(summ[["dataset", "protocol"]])
        summ.loc[pairs.isin(list(partial)), "rank"] = np.nan
    return summ


def rank_table(results: pd.DataFrame) -> pd.DataFrame:
    """The cnnImpute paper's ranking (its Fig. 6): every method's rank over all experiments.

    An *experiment* is one ranked (dataset, protocol, metric) of :func:`summarize`. Per method:
    ``mean_rank`` and ``rank_sd`` (sample sd, 0 for one experiment) over the experiments it
    took part in, ``n_experiments``, and its mean ``seconds`` and ``peak_mem_mb`` per job on
    every dataset (columns ``seconds[<dataset>]`` / ``peak_mem_mb[<dataset>]``). Sorted by mean
    rank (best first).
    """
    summ = summarize(results)
    summ = summ[np.isfinite(summ["rank"].astype(float))]
    if summ.empty:
        return pd.DataFrame(columns=["mean_rank", "rank_sd", "n_experiments"])
    g = summ.groupby("method")["rank"]
    out = pd.DataFrame({"mean_rank": g.mean(), "rank_sd": g.std().fillna(0.0),
                        "n_experiments": g.count()})
    ok = results[results["status"] == "ok"].drop_duplicates(
        ["dataset", "protocol", "method", "seed"])
    for what in ("seconds", "peak_mem_mb"):
        per = ok.pivot_table(index="method", columns="dataset", values=what, aggfunc="mean")
        per.columns = [f"{what}[{d}]" for d in per.columns]
        out = out.join(per)
    out.index.name = "method"
    return out.sort_values(["mean_rank", "rank_sd"])


def _ours(methods, ours) -> set[str]:
    """The screpair methods among ``methods``: ``ours`` if given, else the registered ones."""
    if ours is None:
        from ..methods._registry import available_methods

        ours = available_methods()
    return set(ours) & set(methods)


def losses(results: pd.DataFrame, *, ours=None) -> pd.DataFrame:
    """Where each screpair method is not first: one row per (screpair method, experiment it took
    part in and does not win).

    An experiment is one ranked (dataset, protocol, metric) of :func:`summarize`; its winner is
    the method with the best mean over seeds (ties: every tied method, joined by ``", "``; a
    method tied for first is first). ``ours``: the screpair method names (default: every
    registered method, :func:`screpair.available_methods`). Columns: ``method``, ``dataset``,
    ``protocol``, ``metric``, ``value`` (its mean), ``rank``, ``winner``, ``winner_value``,
    ``winner_is_peer`` (no screpair method among the winners), ``gap`` (how much better the
    winner is, in the metric's units: ``|winner_value - value|``) and ``gap_pct`` (``gap`` as a
    percentage of ``|winner_value|``; NaN when that is 0).
    """
    cols = ["method", "dataset", "protocol", "metric", "value", "rank", "winner",
            "winner_value", "winner_is_peer", "gap", "gap_pct"]
    summ = summarize(results)
    summ = summ[np.isfinite(summ["rank"].astype(float))]
    mine = _ours(summ["method"], ours)
    rows = []
    for (d, p, m), block in summ.groupby(["dataset", "protocol", "metric"], sort=False):
        higher = GREATER_IS_BETTER.get(m, True)
        best = block["mean"].max() if higher else block["mean"].min()
        winners = block.loc[block["mean"] == best, "method"].tolist()
        for _, r in block[block["method"].isin(mine)].iterrows():
            if r["method"] in winners:
                continue
            gap = abs(best - r["mean"])
            rows.append({"method": r["method"], "dataset": d, "protocol": p, "metric": m,
                         "value": r["mean"], "rank": r["rank"], "winner": ", ".join(winners),
                         "winner_value": best, "winner_is_peer": not set(winners) & mine,
                         "gap": gap, "gap_pct": 100 * gap / abs(best) if best != 0 else np.nan})
    return pd.DataFrame(rows, columns=cols)


def _num(v: float) -> str:
    """A value at 3 significant digits (no exponent for ordinary magnitudes)."""
    if not np.isfinite(v):
        return "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _losses_markdown(results: pd.DataFrame, ours) -> list[str]:
    """The report's "Where screpair's methods lose" section (:func:`losses`)."""
    summ = summarize(results)
    summ = summ[np.isfinite(summ["rank"].astype(float))]
    mine = sorted(_ours(summ["method"], ours))
    if not mine or summ["method"].nunique() < 2:
        return []
    lost = losses(results, ours=mine)
    arrow = {m: _arrow(m) for m in summ["metric"].unique()}
    lines = ["## Where screpair's methods lose", "",
             "Generated from the results. An experiment is one ranked dataset x protocol x "
             "metric; the winner has the best mean over seeds; *gap* is how much better the "
             "winner is, in the metric's units (and as a % of the winner's value).", ""]
    n_exp = summ.groupby("method").size()
    lines += ["| screpair method | experiments | first | not first | of which won by a peer | "
              "beaten most often by |", "|---|---|---|---|---|---|"]
    for m in mine:
        lm = lost[lost["method"] == m]
        top = lm["winner"].value_counts()
        most = (", ".join(f"{w} ({c})" for w, c in top.head(3).items()) if len(top) else "–")
        lines.append(f"| {m} | {n_exp.get(m, 0)} | {n_exp.get(m, 0) - len(lm)} | {len(lm)} | "
                     f"{int(lm['winner_is_peer'].sum())} | {most} |")
    lines.append("")
    # experiments that no screpair method wins: the best screpair method vs the winning peer
    peer_wins = lost[lost["winner_is_peer"]]
    if not peer_wins.empty:
        best = (peer_wins.assign(order=peer_wins["gap"])
                .sort_values("order").drop_duplicates(["dataset", "protocol", "metric"]))
        lines += [f"### Experiments no screpair method wins ({len(best)})", "",
                  "| dataset | protocol | metric | winner (peer) | winner's value | "
                  "best screpair method | its value | gap | gap % |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for _, r in best.sort_values(["protocol", "dataset", "metric"]).iterrows():
            lines.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} "
                         f"{arrow[r['metric']]} | {r['winner']} | {_num(r['winner_value'])} | "
                         f"{r['method']} | {_num(r['value'])} | {_num(r['gap'])} | "
                         f"{_num(r['gap_pct'])} |")
        lines.append("")
    for m in mine:
        lm = lost[lost["method"] == m].sort_values(["protocol", "dataset", "metric"])
        if lm.empty:
            continue
        lines += [f"### {m}: not first in {len(lm)} of {n_exp.get(m, 0)} experiments", "",
                  f"| dataset | protocol | metric | {m} | rank | winner | winner's value | gap "
                  "| gap % |", "|---|---|---|---|---|---|---|---|---|"]
        for _, r in lm.iterrows():
            who = r["winner"] + ("" if r["winner_is_peer"] else " (screpair)")
            lines.append(f"| {r['dataset']} | {r['protocol']} | {r['metric']} "
                         f"{arrow[r['metric']]} | {_num(r['value'])} | {r['rank']:g} | {who} | "
                         f"{_num(r['winner_value'])} | {_num(r['gap'])} | "
                         f"{_num(r['gap_pct'])} |")
        lines.append("")
    return lines


#: no denoising: the baseline every MCV method must beat
RAW = "raw"
#: why a peer can win an MCV metric that no screpair method wins (the report's explanation)
MCV_WHY = {
    "mcv_mse": (
        "Open Problems' MSE compares log1p(CP10k) of the denoised train split with log1p(CP10k) "
        "of the test split, which holds only 10 % of the molecules: most test entries are 0, so "
        "a gene's expected log value lies far below the log of its expected expression (Jensen's "
        "inequality) and the metric rewards outputs that shrink sparse genes towards 0 rather "
        "than accurate means (on a simulation with known means, the true means score worse than "
        "the raw counts: tests/test_knn_mcv.py). MAGIC averages log1p(CPM) values, a "
        "geometric-like mean that does exactly this; methods that average or model counts "
        "cannot, whatever their smoothing (knn over k = 5-200 and 1-3 steps), while knn "
        "averaging log1p(CPM) (`space=\"log\"`) comes within a few % of MAGIC "
        "(benchmarks/mcv_smoothing.py, KNNImputer's docstring). On the proper Poisson NLL "
        "(`mcv_poisson_mcv`) the ranking differs."),
    "mcv_poisson": (
        "This is openproblems v1's argument order, `mean(test - d * log(test + 1e-6))`: linear "
        "in the denoised values `d`, with weight +13.8 on every test zero and -log(test) <= 0 "
        "elsewhere, so it rewards predicting about 0 wherever the 10 % test split has no count "
        "(strong smoothing of log values, MAGIC) and is not a likelihood of the test counts; "
        "the MCV paper's order (`mcv_poisson_mcv`) is."),
}


def mcv_verdict(results: pd.DataFrame, *, ours=None) -> pd.DataFrame:
    """Issue 19's MCV goal per ranked (dataset, metric) of the ``mcv`` protocol: does a
    screpair method beat no denoising (``raw``) and every peer?

    Columns: ``dataset``, ``metric``, ``best_ours`` / ``ours_value`` (the best screpair method
    and its mean), ``raw_value``, ``best_peer`` / ``peer_value`` (the best method that is
    neither screpair's nor ``raw``), ``wins`` (``ours_value`` strictly better than both),
    ``winner`` / ``winner_value`` (the best method overall; ``best_ours`` when it wins), ``gap``
    (how much better the winner is than ``best_ours``, in the metric's units; 0 when screpair's
    method wins) and ``gap_pct`` (``gap`` as a % of ``|winner_value|``).
    """
    cols = ["dataset", "metric", "best_ours", "ours_value", "raw_value", "best_peer",
            "peer_value", "wins", "winner", "winner_value", "gap", "gap_pct"]
    summ = summarize(results)
    summ = summ[(summ["protocol"] == "mcv") & np.isfinite(summ["rank"].astype(float))]
    mine = _ours(summ["method"], ours)
    rows = []
    for (d, m), block in summ.groupby(["dataset", "metric"], sort=False):
        sign = 1.0 if GREATER_IS_BETTER.get(m, True) else -1.0
        score = block.set_index("method")["mean"] * sign  # higher is better
        own = score[score.index.isin(mine)]
        peers = score[~score.index.isin(mine) & (score.index != RAW)]
        if own.empty:
            continue
        best_own = own.idxmax()
        others = score.drop(index=list(mine))
        wins = bool(others.empty or own.max() > others.max())
        winner = best_own if wins else score.idxmax()
        rows.append({
            "dataset": d, "metric": m, "best_ours": best_own, "ours_value": own.max() * sign,
            "raw_value": score.get(RAW, np.nan) * sign,
            "best_peer": peers.idxmax() if len(peers) else "",
            "peer_value": peers.max() * sign if len(peers) else np.nan, "wins": wins,
            "winner": winner, "winner_value": score[winner] * sign,
            "gap": 0.0 if wins else abs(score.max() - own.max())})
        rows[-1]["gap_pct"] = (100 * rows[-1]["gap"] / abs(rows[-1]["winner_value"])
                               if rows[-1]["winner_value"] else np.nan)
    return pd.DataFrame(rows, columns=cols)


def _mcv_markdown(results: pd.DataFrame, ours) -> list[str]:
    """The report's MCV section: :func:`mcv_verdict`, and why a peer wins where one does."""
    v = mcv_verdict(results, ours=ours)
    if v.empty:
        return []
    lines = ["## MCV: does a screpair method beat no denoising and every peer?", "",
             "Per dataset and metric of the MCV protocol (Open Problems' denoising task): the "
             "best screpair method, no denoising (raw), the best peer, and the gap to the "
             "winner where no screpair method wins.", "",
             "| dataset | metric | best screpair method | its value | raw | best peer | its value "
             "| screpair wins | winner | gap | gap % |", "|---" * 11 + "|"]
    for _, r in v.iterrows():
        lines.append(f"| {r['dataset']} | {r['metric']} {_arrow(r['metric'])} | "
                     f"{r['best_ours']} | {_num(r['ours_value'])} | {_num(r['raw_value'])} | "
                     f"{r['best_peer'] or '–'} | {_num(r['peer_value'])} | "
                     f"{'yes' if r['wins'] else 'no'} | {r['winner']} | {_num(r['gap'])} | "
                     f"{_num(r['gap_pct'])} |")
    lines.append("")
    lost = v[~v["wins"]]
    for m, block in lost.groupby("metric", sort=False):
        who = ", ".join(sorted(set(block["winner"])))
        lines += [f"**{m}: no screpair method wins on {len(block)} of "
                  f"{int((v['metric'] == m).sum())} datasets** (won by {who}). "
                  + MCV_WHY.get(m, ""), ""]
    return lines


def _seeds_line(results: pd.DataFrame) -> str:
    """"Seeds: ..." for the report: the seeds most (dataset, protocol) pairs have, and the pairs
    that have other seeds."""
    ok = results[results["status"] == "ok"]
    if ok.empty:
        ok = results
    per = ok.groupby(["dataset", "protocol"], sort=False)["seed"].agg(
        lambda s: tuple(sorted(set(int(v) for v in s))))
    if per.empty:
        return "Seeds: none."
    common = per.value_counts().index[0]
    text = f"Seeds: {', '.join(map(str, common))}"
    other = per[per != common]
    if len(other):
        text += " (other seeds: " + "; ".join(
            f"{d} · {p}: {', '.join(map(str, v))}" for (d, p), v in other.items()) + ")"
    return text + "."


def _arrow(metric: str) -> str:
    """``↑`` for a metric where higher is better, ``↓`` where lower is
    (:data:`~screpair.evaluate.GREATER_IS_BETTER`)."""
    return "↑" if GREATER_IS_BETTER.get(metric, True) else "↓"


def _fmt(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "nan"
    digits = 3 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown_summary(results: pd.DataFrame, *, command: str | None = None, ours=None) -> str:
    """Markdown report: per dataset and protocol a table of methods x metrics (mean ± sd over
    seeds, rank in brackets), the mean rank, time and peak memory; then an overall mean-rank
    table, where each screpair method loses (:func:`losses`; ``ours``: the screpair method
    names, default the registered methods), whether a screpair method wins each MCV metric and,
    where none does, who wins, by how much and why (:func:`mcv_verdict`, :data:`MCV_WHY`), and
    the failed/skipped jobs. The (dataset, protocol) pairs of a partial run that lack some jobs
    (:func:`missing_jobs`) are listed and not ranked."""
    summ = summarize(results)
    lines = ["# screpair benchmark", ""]
    if command:
        lines += ["Regenerate with:", "", "```", command, "```", ""]
    lines += [f"{_seeds_line(results)} Values are mean ± sd over seeds; "
              "(rank) is the method's rank on that metric (1 = best). Arrows: ↑ higher is better, "
              "↓ lower is better.", ""]
    partial = missing_jobs(results)
    if partial:
        lines += [f"Not ranked ({len(partial)} dataset x protocol pairs whose jobs have not "
                  "all finished; a pair with one finished method would rank it first): "
                  + "; ".join(f"{d} · {p}" for d, p in partial) + ".", ""]
    for (dataset, protocol), block in summ.groupby(["dataset", "protocol"], sort=False):
        metrics = list(dict.fromkeys(block["metric"]))
        head = [m if m in UNRANKED else f"{m} {_arrow(m)}"
                for m in metrics]
        lines += [f"## {dataset} · {protocol}", ""]
        if (dataset, protocol) in partial:
            lines += ["Not ranked: not finished yet for "
                      + ", ".join(partial[(dataset, protocol)]) + ".", ""]
        lines += ["| method | " + " | ".join(head) + " | mean rank | seconds | peak MB |",
                  "|---" * (len(metrics) + 4) + "|"]
        by_method = block.groupby("method", sort=False)
        order = by_method["rank"].mean().sort_values().index
        for method in order:
            mb = block[block["method"] == method].set_index("metric")
            cells = [("–" if m not in mb.index else _fmt(mb.at[m, "mean"], mb.at[m, "sd"])
                      + (f" ({mb.at[m, 'rank']:g})" if np.isfinite(mb.at[m, "rank"]) else ""))
                     for m in metrics]
            lines.append(f"| {method} | " + " | ".join(cells)
                         + f" | {mb['rank'].mean():.2f} | {mb['seconds'].mean():.1f}"
                         f" | {mb['peak_mem_mb'].mean():.0f} |")
        lines.append("")
    ranks = rank_table(results)
    if not ranks.empty:
        datasets = list(dict.fromkeys(results["dataset"]))
        lines += ["## Overall ranking", "",
                  "Rank of every method over all experiments (dataset x protocol x metric; "
                  "1 = best), as the cnnImpute paper's Fig. 6, with seconds / peak MB per job "
                  "on each dataset.", "",
                  "| method | mean rank | rank sd | experiments | "
                  + " | ".join(f"{d} s / MB" for d in datasets) + " |",
                  "|---" * (4 + len(datasets)) + "|"]
        for m, r in ranks.iterrows():
            cost = [f"{r.get(f'seconds[{d}]', np.nan):.1f} / {r.get(f'peak_mem_mb[{d}]', np.nan):.0f}"
                    for d in datasets]
            lines.append(f"| {m} | {r['mean_rank']:.2f} | {r['rank_sd']:.2f} | "
                         f"{int(r['n_experiments'])} | " + " | ".join(cost) + " |")
        lines.append("")
    lines += _losses_markdown(results, ours)
    lines += _mcv_markdown(results, ours)
    bad = results[results["status"] != "ok"]
    if not bad.empty:
        lines += ["## Failed or skipped", "", "| dataset | protocol | method | seed | status | error |",
                  "|---|---|---|---|---|---|"]
        for _, r in bad.iterrows():
            err = str(r["error"]).replace("|", "\\|")[:300]
            lines.append(f"| {r['dataset']} | {r['protocol']} | {r['method']} | {r['seed']} "
                         f"| {r['status']} | {err} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_outputs(results: pd.DataFrame, out_dir, *, embeddings=None, labels=None,
                  plots: bool = True, command: str | None = None,
                  calibration: pd.DataFrame | None = None) -> dict[str, list[Path]]:
    """Write ``results.csv``, ``summary.md``, ``calibration.csv`` (when ``calibration`` has rows)
    and (``plots=True``) the PNGs into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"csv": [], "md": [], "png": []}
    csv = out / "results.csv"
    results.to_csv(csv, index=False)
    written["csv"].append(csv)
    md = out / "summary.md"
    md.write_text(markdown_summary(results, command=command))
    written["md"].append(md)
    has_calib = calibration is not None and not calibration.empty
    if has_calib:
        cal = out / "calibration.csv"
        calibration.to_csv(cal, index=False)
        written["csv"].append(cal)
    if plots:
        written["png"] += plot_results(results, out, embeddings=embeddings or {},
                                       labels=labels or {})
        if has_calib:
            written["png"] += plot_reliability(calibration, out)
    return written


def plot_reliability(calibration: pd.DataFrame, out_dir) -> list[Path]:
    """Reliability diagram per dataset (``reliability_<dataset>.png``): the fraction of zeros that
    are dropouts against the mean dropout probability of each probability bin, one line per
    method (first seed), with the diagonal of a calibrated model; bar heights below show the share
    of zeros in each bin."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    files: list[Path] = []
    for dataset, block in calibration.groupby("dataset", sort=False):
        block = block[block["seed"] == block["seed"].min()]
        fig, (ax, axn) = plt.subplots(2, 1, figsize=(4.2, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="calibrated")
        n_methods = block["method"].nunique()
        for i, (method, b) in enumerate(block.groupby("method", sort=False)):
            ax.plot(b["mean_prob"], b["frac_dropout"], marker="o", ms=3, color=f"C{i}",
                    label=method)
            width = (b["bin_hi"] - b["bin_lo"]) / n_methods
            axn.bar(b["bin_lo"] + i * width, b["n"] / b["n"].sum(), width=width, align="edge",
                    color=f"C{i}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of zeros that are dropouts")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"{dataset}: dropout calibration", fontsize=10)
        axn.set_xlabel("dropout probability (bin mean)")
        axn.set_ylabel("share of zeros", fontsize=8)
        files.append(_save(fig, out / f"reliability_{_safe(dataset)}.png"))
    return files


def _save(fig, path: Path) -> Path:
    """Lay out (``tight_layout`` without matplotlib's "could not fit" warning for crowded
    figures, unless the figure has its own layout engine), write (PNG, 100 dpi) and close
    ``fig``; returns ``path``."""
    import warnings

    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:  # figures made with layout="constrained" keep it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


#: screpair's methods in the figures (peers and baselines: grey)
OURS_COLOR = "C0"
PEER_COLOR = "0.62"


def _direction(metric: str) -> str:
    """A metric's axis label with its direction (``mse ↓ lower is better``)."""
    if metric in UNRANKED:
        return f"{metric} (not ranked)"
    word = "higher" if GREATER_IS_BETTER.get(metric, True) else "lower"
    return f"{metric} {_arrow(metric)} {word} is better"


def _style_method_labels(labels, ours: set[str]) -> None:
    """Bold, blue tick labels for screpair's methods; grey for the peers."""
    for t in labels:
        mine = t.get_text() in ours
        t.set_fontweight("bold" if mine else "normal")
        t.set_color(OURS_COLOR if mine else "0.3")


def _method_order(results: pd.DataFrame, summ: pd.DataFrame) -> list[str]:
    """Methods in the order of the overall ranking (best first), then any others."""
    ranked = list(rank_table(results).index)
    return ranked + [m for m in dict.fromkeys(summ["method"]) if m not in ranked]


def _grid(n_metrics: int) -> tuple[int, int]:
    """``(rows per dataset, columns)`` of a protocol's panel grid: the metrics of a dataset
    side by side, wrapped into rows of at most 5 panels of about equal length."""
    rows = -(-n_metrics // 5)
    return rows, -(-n_metrics // rows)


def _plot_protocol(block: pd.DataFrame, protocol: str, methods: list[str], ours: set[str],
                   path: Path) -> Path:
    """``bars_<protocol>.png``: one panel per dataset x metric (mean ± sd over seeds), every
    panel with the same methods in the same order; the no-imputation ``raw`` value dashed."""
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(block["dataset"]))
    metrics = list(dict.fromkeys(block["metric"]))
    metrics = [m for m in metrics if m not in UNRANKED] + [m for m in metrics if m in UNRANKED]
    methods = [m for m in methods if m in set(block["method"])]
    per, ncols = _grid(len(metrics))
    nrows = per * len(datasets)
    width = max(2.6, 0.22 * len(methods) + 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 2.5 * nrows + 0.8),
                             squeeze=False, layout="constrained")
    used = set()
    x = np.arange(len(methods))
    for (i, dataset), (j, metric) in itertools.product(enumerate(datasets), enumerate(metrics)):
        ax = axes[i * per + j // ncols, j % ncols]
        used.add(id(ax))
        b = block[(block["dataset"] == dataset) & (block["metric"] == metric)].set_index("method")
        b = b.reindex(methods)
        colors = [OURS_COLOR if m in ours else PEER_COLOR for m in methods]
        ax.bar(x, b["mean"].fillna(0.0), yerr=b["sd"].fillna(0.0), capsize=2, color=colors,
               error_kw={"lw": 0.8})
        for i in np.flatnonzero(b["mean"].isna().to_numpy()):
            ax.text(x[i], 0, "n/a", ha="center", va="bottom", fontsize=6, color="0.4")
        if "raw" in b.index and np.isfinite(b.at["raw", "mean"]) and metric not in UNRANKED:
            ax.axhline(b.at["raw", "mean"], ls="--", lw=0.8, color="0.25", zorder=0)
        ax.set_title(dataset, fontsize=9)
        ax.set_ylabel(_direction(metric), fontsize=7)
        ax.set_xticks(x, methods, rotation=60, ha="right", fontsize=7)
        _style_method_labels(ax.get_xticklabels(), ours)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel():
        if id(ax) not in used:
            ax.set_visible(False)
    fig.suptitle(f"{protocol} (one row of panels per dataset)\nblue, bold = screpair's methods;"
                 " grey = peers and baselines; dashed = raw (no imputation); bars: mean ± sd "
                 "over seeds", fontsize=9)
    return _save(fig, path)


def _heat(ax, values: np.ndarray, *, cmap, norm, fmt) -> object:
    """Annotated heat map on ``ax`` (NaN cells blank, marked "–"); returns the image."""
    import matplotlib.pyplot as plt

    cm = plt.get_cmap(cmap)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cm, norm=norm, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=6, color="0.5")
                continue
            r, g, b_, _ = cm(norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b_ < 0.5
            ax.text(j, i, fmt(v), ha="center", va="center", fontsize=6,
                    color="w" if dark else "k")
    return im


def _group_labels(ax, groups: list[str]) -> None:
    """Separate the runs of equal ``groups`` along the x axis by white lines and name each run
    on a secondary axis on top."""
    starts = [j for j in range(len(groups)) if j == 0 or groups[j] != groups[j - 1]]
    ends = [*starts[1:], len(groups)]
    for b in starts[1:]:
        ax.axvline(b - 0.5, color="w", lw=2.5)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(b + e - 1) / 2 for b, e in zip(starts, ends, strict=True)],
                   [groups[b] for b in starts], fontsize=8, rotation=30, ha="left")
    top.tick_params(length=0)


def _short(v: float) -> str:
    """Seconds or MB in at most 4 characters: 0.3, 12, 340, 1.2k."""
    if v < 10:
        return f"{v:.1f}"
    if v < 1000:
        return f"{v:.0f}"
    return f"{v / 1000:.1f}k"


def plot_ranking(results: pd.DataFrame, out_dir, *, ours=None) -> list[Path]:
    """The cnnImpute paper's Fig. 6 (``ranking.png``) and the per-experiment rank heat map
    (``rank_heatmap.png``).

    ``ranking.png``, one row per method (best mean rank on top): the heat map of ranks per
    protocol x dataset (mean of that pair's metric ranks, columns grouped by protocol), each
    method's mean rank ± sd over all experiments (:func:`rank_table`), and its mean seconds and
    peak MB per job on every dataset (log colour scales). ``rank_heatmap.png``: the rank of
    every experiment (dataset x protocol x metric), grouped by protocol. ``ours``: screpair's
    methods (default: the registered ones), drawn blue and bold.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize

    out = Path(out_dir)
    summ = summarize(results)
    summ = summ[np.isfinite(summ["rank"].astype(float))]
    if summ.empty:
        return []
    ranks = rank_table(results)
    methods = list(ranks.index)
    mine = _ours(methods, ours)
    protocols = list(dict.fromkeys(summ["protocol"]))
    datasets = list(dict.fromkeys(results["dataset"]))
    pairs = [(p, d) for p in protocols for d in datasets
             if ((summ["protocol"] == p) & (summ["dataset"] == d)).any()]
    pair_rank = summ.groupby(["protocol", "dataset", "method"])["rank"].mean()
    heat = np.array([[pair_rank.get((p, d, m), np.nan) for p, d in pairs] for m in methods])
    n_m = len(methods)
    rank_norm = Normalize(1, max(2, n_m))
    files = []

    # ----- ranking.png: heat map | mean rank ± sd | seconds | peak MB
    cost = {w: np.array([[ranks.at[m, f"{w}[{d}]"] if f"{w}[{d}]" in ranks else np.nan
                          for d in datasets] for m in methods], dtype=float)
            for w in ("seconds", "peak_mem_mb")}
    w_heat = max(3.2, 0.34 * len(pairs) + 0.4)
    w_bar, w_cost = 2.6, max(1.8, 0.36 * len(datasets) + 0.4)
    fig, axes = plt.subplots(
        1, 4, figsize=(w_heat + w_bar + 2 * w_cost + 1.6, 0.34 * n_m + 3.2),
        gridspec_kw={"width_ratios": [w_heat, w_bar, w_cost, w_cost]}, layout="constrained")
    ax = axes[0]
    im = _heat(ax, heat, cmap="viridis_r", norm=rank_norm, fmt=lambda v: f"{v:.1f}")
    ax.set_xticks(range(len(pairs)), [d for _, d in pairs], rotation=90, fontsize=7)
    ax.set_yticks(range(n_m), methods, fontsize=8)
    _style_method_labels(ax.get_yticklabels(), mine)
    _group_labels(ax, [p for p, _ in pairs])
    ax.set_title("rank per protocol · dataset\n(mean over its metrics; 1 = best)", fontsize=9)
    cb = fig.colorbar(im, ax=ax, location="bottom", shrink=0.25, aspect=30, pad=0.01)
    cb.set_label("rank (1 = best)", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    ax = axes[1]
    y = np.arange(n_m)
    ax.barh(y, ranks["mean_rank"], xerr=ranks["rank_sd"], capsize=2,
            color=[OURS_COLOR if m in mine else PEER_COLOR for m in methods])
    right = float((ranks["mean_rank"] + ranks["rank_sd"]).max())
    for yi, (mr, sd) in enumerate(zip(ranks["mean_rank"], ranks["rank_sd"], strict=True)):
        ax.text(mr + sd + 0.08, yi, f"{mr:.2f} ± {sd:.2f}", va="center", fontsize=7)
    ax.set_ylim(n_m - 0.5, -0.5)
    ax.set_yticks(y, [])
    ax.set_xlim(0, right * 1.45 + 0.5)
    ax.set_xlabel("mean rank ± sd ↓ lower is better", fontsize=8)
    ax.set_title(f"mean rank ± sd\nover {int(ranks['n_experiments'].max())} experiments",
                 fontsize=9)
    ax.tick_params(labelsize=7)
    for ax, what, title, cmap in ((axes[2], "seconds", "seconds / job ↓", "Oranges"),
                                  (axes[3], "peak_mem_mb", "peak MB / job ↓", "Purples")):
        v = cost[what]
        finite = v[np.isfinite(v) & (v > 0)]
        lo, hi = (max(finite.min(), 1e-2), finite.max()) if finite.size else (0.1, 1.0)
        norm = LogNorm(lo, max(hi, lo * 1.01))
        _heat(ax, np.where(v > 0, v, lo), cmap=cmap, norm=norm, fmt=_short)
        ax.set_xticks(range(len(datasets)), datasets, rotation=90, fontsize=7)
        ax.set_yticks(range(n_m), [])
        ax.set_title(f"{title}\n(fit + repair, mean)", fontsize=9)
    axes[3].yaxis.tick_right()
    axes[3].set_yticks(range(n_m), methods, fontsize=8)
    _style_method_labels(axes[3].get_yticklabels(), mine)
    fig.suptitle("Overall ranking (cnnImpute Fig. 6 style): blue, bold = screpair's methods; "
                 "grey = peers and baselines", fontsize=10)
    files.append(_save(fig, out / "ranking.png"))

    # ----- rank_heatmap.png: every experiment, grouped by protocol
    summ = summ.assign(order=summ["protocol"].map({p: i for i, p in enumerate(protocols)}))
    exps = (summ[["order", "protocol", "dataset", "metric"]].drop_duplicates()
            .sort_values(["order"], kind="stable"))
    keys = list(exps[["protocol", "dataset", "metric"]].itertuples(index=False, name=None))
    per = summ.set_index(["protocol", "dataset", "metric", "method"])["rank"]
    full = np.array([[per.get((*k, m), np.nan) for k in keys] for m in methods])
    label_h = 0.075 * max(len(f"{d} · {m}") for _, d, m in keys)
    fig, ax = plt.subplots(figsize=(0.24 * len(keys) + 2.5, 0.34 * n_m + 1.9 + label_h),
                           layout="constrained")
    im = _heat(ax, full, cmap="viridis_r", norm=rank_norm, fmt=lambda v: f"{v:g}")
    ax.set_xticks(range(len(keys)), [f"{d} · {m}" for _, d, m in keys], rotation=90,
                  fontsize=6)
    ax.set_yticks(range(n_m), methods, fontsize=8)
    _style_method_labels(ax.get_yticklabels(), mine)
    _group_labels(ax, [k[0] for k in keys])
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="rank (1 = best)")
    ax.set_title("rank per experiment (dataset · metric, grouped by protocol)", fontsize=9)
    files.append(_save(fig, out / "rank_heatmap.png"))
    return files


def plot_results(results: pd.DataFrame, out_dir, *, embeddings=None, labels=None,
                 ours=None) -> list[Path]:
    """One panel grid per protocol (``bars_<protocol>.png``: a panel per dataset x metric,
    screpair's methods blue with bold labels, peers grey, the no-imputation ``raw`` value
    dashed, each axis labelled with the metric's direction), the ranking figures of
    :func:`plot_ranking` (``ranking.png``, ``rank_heatmap.png``), the overall ranking alone
    (``rank_overall.png``: mean rank ± sd, :func:`rank_table`) and 2-D embeddings by label.
    ``ours``: screpair's methods (default: the registered ones)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    files: list[Path] = []
    summ = summarize(results)
    mine = _ours(summ["method"], ours)
    order = _method_order(results, summ)
    for protocol, block in summ.groupby("protocol", sort=False):
        files.append(_plot_protocol(block, protocol, order, mine,
                                    out / f"bars_{_safe(protocol)}.png"))
    if not summ.empty:
        files += plot_ranking(results, out, ours=mine)
        ranks = rank_table(results)
        if not ranks.empty:
            fig, ax = plt.subplots(figsize=(5, 0.4 * len(ranks) + 1.2))
            ypos = np.arange(len(ranks))[::-1]
            colors = [OURS_COLOR if m in mine else PEER_COLOR for m in ranks.index]
            ax.barh(ypos, ranks["mean_rank"], xerr=ranks["rank_sd"], color=colors, capsize=3)
            ax.set_yticks(ypos, ranks.index, fontsize=8)
            _style_method_labels(ax.get_yticklabels(), mine)
            ax.set_xlabel("mean rank over experiments ± sd ↓ lower is better")
            ax.set_title("overall ranking (blue, bold: screpair; grey: peers)", fontsize=9)
            files.append(_save(fig, out / "rank_overall.png"))
    datasets = dict.fromkeys(d for d, _ in (embeddings or {}))
    for dataset in datasets:
        embs = {m: e for (d, m), e in embeddings.items() if d == dataset}
        order = (["raw"] if "raw" in embs else []) + [m for m in embs if m != "raw"]
        y = labels.get(dataset)
        fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.2), squeeze=False)
        cats = pd.unique(y) if y is not None else None
        for ax, m in zip(axes[0], order, strict=True):
            e = embs[m]
            if cats is None:
                ax.scatter(e[:, 0], e[:, 1], s=3)
            else:
                for i, c in enumerate(cats):
                    sel = y == c
                    ax.scatter(e[sel, 0], e[sel, 1], s=3, color=plt.cm.tab20(i % 20), label=str(c))
            ax.set_title(m, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        if cats is not None and len(cats) <= 20:
            axes[0][-1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
        fig.suptitle(f"{dataset}: PCA of log1p(CP10k), coloured by label", fontsize=10)
        files.append(_save(fig, out / f"embedding_{_safe(dataset)}.png"))
    return files
