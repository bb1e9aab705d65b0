"""Issue 19 pieces: the CQN baseline, the downsample protocol's scores and the rank table,
each against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from screpair.evaluate import _peers


def _with_length_effect(rng, n=40, g=300):
    """Integer counts whose log-expression depends on gene length with a per-cell slope."""
    length = np.exp(rng.normal(np.log(2000), 0.7, g))
    z = (np.log(length) - np.log(length).mean()) / np.log(length).std()
    base = rng.gamma(2.0, 1.5, g)
    slope = rng.normal(0.0, 0.6, n)
    mean = base[None, :] * np.exp(slope[:, None] * z[None, :]) * rng.lognormal(1.5, 0.3, (n, 1))
    x = rng.poisson(mean).astype(float)
    var = pd.DataFrame({"gene_length": length}, index=[f"g{i}" for i in range(g)])
    return AnnData(sp.csr_matrix(x), var=var), z, slope


def test_cqn_matches_per_cell_least_squares():
    """The vectorised fit equals numpy's lstsq, cell by cell, and the correction is exactly
    ``y - B (beta_i - beta_mean)`` (without the intercept) at the observed entries."""
    rng = np.random.default_rng(0)
    ad, _, _ = _with_length_effect(rng)
    x = ad.X.toarray()
    lib = x.sum(1)
    y = np.log1p(x / lib[:, None] * 1e4)
    basis = _peers._cqn_basis(ad.var, ad.var_names, 3)
    z = np.log(ad.var["gene_length"].to_numpy())
    z = (z - z.mean()) / z.std()
    np.testing.assert_allclose(basis, np.column_stack([z**0, z, z**2, z**3]), rtol=1e-12)
    coefs = np.array([np.linalg.lstsq(basis[x[i] > 0], y[i, x[i] > 0], rcond=None)[0]
                      for i in range(len(x))])
    est = _peers.CQNImputer().fit(ad)
    np.testing.assert_allclose(est.coef_mean_, coefs.mean(0), rtol=1e-6, atol=1e-8)
    out = est.posterior(ad).mean.toarray()
    want = y - (coefs - coefs.mean(0))[:, 1:] @ basis[:, 1:].T
    want = np.clip(want, 0, y.max(1, keepdims=True))  # never above the cell's largest value
    want = np.where(x > 0, np.expm1(want) * lib[:, None] / 1e4, 0.0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-8)


def test_cqn_removes_a_known_length_effect():
    rng = np.random.default_rng(1)
    ad, z, slope = _with_length_effect(rng)
    out = _peers.CQNImputer().fit(ad).posterior(ad).mean.toarray()

    def cell_slopes(m):
        lib = m.sum(1, keepdims=True)
        lg = np.log1p(m / lib * 1e4)
        return np.array([np.polyfit(z[r > 0], lg[i, r > 0], 1)[0] for i, r in enumerate(m)])

    before, after = cell_slopes(ad.X.toarray()), cell_slopes(out)
    assert np.corrcoef(before, slope)[0, 1] > 0.9  # the damage is there
    assert np.std(after) < 0.15 * np.std(before)  # and gone: every cell has the common slope
    assert not np.any((out > 0) & (ad.X.toarray() == 0))  # zeros stay zero: nothing imputed


def test_cqn_leaves_sparse_cells_alone():
    """A cell with few expressed genes gets no cubic of its own (it extrapolated to 1e38)."""
    rng = np.random.default_rng(3)
    ad, _, _ = _with_length_effect(rng)
    x = ad.X.toarray()
    x[0, 20:] = 0  # cell 0: at most 20 genes, below 10 per term for 4 terms
    ad.X = sp.csr_matrix(x)
    out = _peers.CQNImputer().fit(ad).posterior(ad).mean.toarray()
    np.testing.assert_allclose(out[0], x[0], rtol=1e-5)
    assert np.isfinite(out).all()


def test_cqn_bad_degree():
    rng = np.random.default_rng(2)
    ad, _, _ = _with_length_effect(rng, n=5, g=20)
    with pytest.raises(ValueError, match="degree"):
        _peers.CQNImputer(degree=0).fit(ad)


# ----------------------------------------------------------------------------- downsample
def test_downsample_scores_hand_computed():
    from screpair.evaluate import downsample_recovery

    t = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0], [0.0, 1.0, 1.0], [3.0, 0.0, 2.0]])
    perfect = downsample_recovery(t, t, n_corr_genes=3)
    assert perfect == {"gene_corr": 1.0, "cell_corr": 1.0, "corr_matrix_error": 0.0}
    p = t.copy()
    p[:, 2] = p[::-1, 2]  # gene 2 reversed over cells
    got = downsample_recovery(t, p, n_corr_genes=3)
    r = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    want_gene = np.mean([1.0, 1.0, r(t[:, 2], p[:, 2])])
    want_cell = np.mean([r(t[i], p[i]) for i in range(4)])
    ct, cp = np.corrcoef(t.T), np.corrcoef(p.T)
    want_err = np.mean(np.abs(ct - cp)[np.triu_indices(3, 1)])
    np.testing.assert_allclose(
        [got["gene_corr"], got["cell_corr"], got["corr_matrix_error"]],
        [want_gene, want_cell, want_err], rtol=1e-12)
    const = t.copy()
    const[:, 0] = 1.0  # a constant gene has no correlation: left out, not NaN
    assert np.isfinite(downsample_recovery(t, const, n_corr_genes=3)["gene_corr"])


def test_downsample_protocol():
    import screpair
    from screpair.evaluate import get_protocol

    ad = screpair.simulate.splat(n_obs=120, n_vars=150, rng=0)
    proto = get_protocol("downsample", frac=0.2)
    task = proto.prepare(ad, rng=0)
    deep = task.truth["deep"]
    lib = np.asarray(ad.X.sum(1)).ravel()
    assert task.adata.n_obs <= int(np.ceil(0.5 * ad.n_obs)) + 1  # the deeper half of the cells
    assert np.all(lib[ad.obs_names.get_indexer(task.adata.obs_names)] >= np.median(lib))
    thin = task.adata.X
    assert np.all(thin.toarray() <= deep.toarray())  # binomial thinning of each count
    np.testing.assert_allclose(thin.sum() / deep.sum(), 0.2, atol=0.01)
    again = proto.prepare(ad, rng=0).adata.X
    assert (again != thin).nnz == 0  # seeded
    oracle = deep.toarray() * (np.asarray(thin.sum(1)) / np.asarray(deep.sum(1)))
    best = proto.score(task, oracle)
    assert best["gene_corr"] > 0.999 and best["cell_corr"] > 0.999
    assert best["corr_matrix_error"] < 1e-9
    raw = proto.score(task, thin.toarray())
    assert raw["gene_corr"] < best["gene_corr"] and raw["corr_matrix_error"] > 0.01
    with pytest.raises(ValueError, match="frac"):
        get_protocol("downsample", frac=1.5)


# ----------------------------------------------------------------------------- ranking
def test_rank_table_known_ranks():
    from screpair.evaluate import rank_table

    rows = []
    # experiment 1 (mse, lower better): a 0.1, b 0.2, c 0.3 -> ranks 1, 2, 3
    # experiment 2 (pearson, higher better): a 0.5, b 0.9, c 0.9 -> ranks 3, 1.5, 1.5
    for m, mse, r, sec in (("a", 0.1, 0.5, 1.0), ("b", 0.2, 0.9, 2.0), ("c", 0.3, 0.9, 4.0)):
        for metric, v in (("mse", mse), ("pearson", r), ("zeros_imputed", 0.3)):
            rows.append({"dataset": "d", "protocol": "masked", "method": m, "seed": 0,
                         "metric": metric, "value": v, "seconds": sec, "peak_mem_mb": 10 * sec,
                         "status": "ok", "error": ""})
    res = pd.DataFrame(rows)
    tab = rank_table(res)
    assert list(tab.index) == ["b", "a", "c"]  # mean ranks 1.75, 2, 2.25
    np.testing.assert_allclose(tab.loc[["a", "b", "c"], "mean_rank"], [2.0, 1.75, 2.25])
    np.testing.assert_allclose(tab.loc[["a", "b", "c"], "rank_sd"],
                               [np.std([1, 3], ddof=1), np.std([2, 1.5], ddof=1),
                                np.std([3, 1.5], ddof=1)])
    assert (tab["n_experiments"] == 2).all()  # zeros_imputed is reported, not ranked
    np.testing.assert_allclose(tab.loc[["a", "b", "c"], "seconds[d]"], [1.0, 2.0, 4.0])
    np.testing.assert_allclose(tab.loc["c", "peak_mem_mb[d]"], 40.0)


# ----------------------------------------------------------------------------- suites, resume
def test_benchmark_resumes_finished_jobs(tmp_path, monkeypatch):
    """An interrupted run keeps every finished job in jobs.csv; resume=True runs only the rest."""
    import screpair
    from screpair import evaluate as ev

    calls = []

    class Counting(_peers.RawImputer):
        name = "counting"

        def fit(self, data, *, layer=None):
            calls.append(self.rng)
            return super().fit(data, layer=layer)

    monkeypatch.setitem(_peers.PEERS, "counting", Counting)
    ad = screpair.simulate.splat(n_obs=60, n_vars=50, rng=0)
    first = ev.run_benchmark({"s": ad}, ["counting", "gene_mean"], ["masked"], [0, 1], tmp_path,
                             plots=False, progress=False)
    assert len(calls) == 2
    journal = pd.read_csv(tmp_path / "jobs.csv")
    assert len(journal) == len(first)
    # an interruption after the first job of seed 1: drop the jobs that followed it
    keep = ~((journal["seed"] == 1) & (journal["method"] == "gene_mean"))
    journal[keep].to_csv(tmp_path / "jobs.csv", index=False)
    calls.clear()
    again = ev.run_benchmark({"s": ad}, ["counting", "gene_mean"], ["masked"], [0, 1], tmp_path,
                             plots=False, progress=False, resume=True)
    assert calls == []  # both counting jobs came from the journal
    cols = ["dataset", "protocol", "method", "seed", "metric"]
    a = first.sort_values(cols).reset_index(drop=True)
    b = again.sort_values(cols).reset_index(drop=True)
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-12)
    assert list(a["metric"]) == list(b["metric"])
    ev.run_benchmark({"s": ad}, ["counting"], ["masked"], [0], tmp_path, plots=False,
                     progress=False)  # resume=False starts afresh
    assert len(calls) == 1


def test_resume_reads_only_the_datasets_it_needs(tmp_path):
    """Datasets given as callables (the suite's simulations) or paths are made / read when a
    job first needs them: a resumed run whose jobs on one dataset all finished never makes it,
    and one read dataset is held at a time. A missing path is refused before any work."""
    import screpair
    from screpair import evaluate as ev
    from screpair.evaluate._benchmark import _load_datasets

    made = []

    def make(seed):
        def f():
            made.append(seed)
            return screpair.simulate.splat(n_obs=60, n_vars=50, rng=seed)
        return f

    path = tmp_path / "p.h5ad"
    screpair.simulate.splat(n_obs=50, n_vars=40, rng=2).write_h5ad(path)
    data = {"a": make(0), "b": make(1), "p": path}
    args = (["gene_mean"], ["masked"], [0], tmp_path / "run")
    first = ev.run_benchmark(data, *args, plots=False, progress=False)
    assert made == [0, 1] and set(first["dataset"]) == {"a", "b", "p"}
    journal = pd.read_csv(tmp_path / "run" / "jobs.csv")
    journal[journal["dataset"] != "b"].to_csv(tmp_path / "run" / "jobs.csv", index=False)
    made.clear()
    again = ev.run_benchmark(data, *args, plots=False, progress=False, resume=True)
    assert made == [1] and len(again) == len(first)
    lazy = _load_datasets({"a": make(0), "p": path})
    assert lazy["p"] is lazy["p"] and lazy["a"].n_obs == 60 and made == [1, 0]
    lazy["a"]
    assert made == [1, 0]  # held, not made again
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        ev.run_benchmark({"x": tmp_path / "none.h5ad"}, *args, plots=False, progress=False)


def test_suites_defined_and_checked(tmp_path):
    from screpair.evaluate import SUITES, _suites

    papers = SUITES["papers"]
    protocols = {p for r in papers.runs for p in r.protocols}
    assert protocols == {"masked", "clustering", "deg", "smfish", "mcv", "downsample", "degrade",
                         "degrade_reference"}
    assert {"cqn", "raw", "magic", "scvi", "cnn", "saver", "diffusion"} <= set(papers.methods)
    assert papers.seeds == (0, 1, 2, 3, 4)
    # the protocols never run on real data first; masked and degrade (published) last
    assert [r.name for r in papers.runs] == ["mcv", "clustering", "deg_bulk", "deg_splat",
                                            "smfish", "downsample", "masked", "masked_sparse",
                                            "degrade"]
    # one seed where the protocol draws nothing at random, the suite's 5 elsewhere
    seeds = {r.name: r.seeds_for(papers) for r in papers.runs}
    assert seeds.pop("deg_bulk") == seeds.pop("deg_splat") == seeds.pop("smfish") == [0]
    assert all(s == [0, 1, 2, 3, 4] for s in seeds.values())
    assert all(r.seeds_for(papers, [7, 8]) == [7, 8] for r in papers.runs)  # --seeds wins
    with pytest.raises(FileNotFoundError, match="missing from the data folder"):
        _suites.check_suite("papers", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown suite"):
        _suites.check_suite("nope")
    assert _suites.check_suite("quick", data_dir=tmp_path) is SUITES["quick"]  # demo: no files


def test_deg_and_smfish_prepare_nothing_random():
    """The reason those runs have one seed: different seeds give the same task and scores."""
    import screpair
    from screpair.evaluate import get_protocol

    ad = screpair.simulate.splat(n_obs=80, n_vars=60, group_prob=[0.5, 0.5], rng=0)
    proto = get_protocol("deg", k=10, n_top_genes=None)
    a, b = proto.prepare(ad, rng=0), proto.prepare(ad, rng=1)
    assert (a.adata.X != b.adata.X).nnz == 0
    x = a.adata.X.toarray()
    assert proto.score(a, x) == proto.score(b, x)


def test_suite_runs_use_their_own_seeds(tmp_path, monkeypatch):
    """A run with its own seeds runs only those; --seeds overrides every run; jobs.csv and
    results.csv keep the runner's columns (so resuming works)."""
    from screpair import evaluate as ev
    from screpair.evaluate import _benchmark, _suites

    suite = _suites.Suite(
        runs=(_suites.SuiteRun("random", ("demo",), ("mcv",)),
              _suites.SuiteRun("fixed", ("demo",), ("deg",), {"deg": {"k": 10}}, seeds=(0,))),
        methods=("raw",), seeds=(0, 1))
    monkeypatch.setitem(_suites.SUITES, "tiny", suite)
    res = ev.run_suite("tiny", tmp_path, plots=False, progress=False)
    got = res.groupby("protocol")["seed"].unique().map(sorted).to_dict()
    assert got == {"mcv": [0, 1], "deg": [0]}
    for run in ("random", "fixed"):
        assert list(pd.read_csv(tmp_path / run / "jobs.csv").columns) == _benchmark.COLUMNS
    assert list(pd.read_csv(tmp_path / "results.csv").columns) == _benchmark.COLUMNS
    res = ev.run_suite("tiny", tmp_path / "override", seeds=[3], plots=False, progress=False)
    assert sorted(res["seed"].unique()) == [3]


@pytest.mark.slow
def test_quick_suite_runs(tmp_path):
    from screpair.cli import main

    assert main(["benchmark", "--suite", "quick", "--out", str(tmp_path), "--no-progress",
                 "-q"]) == 0
    assert (tmp_path / "rank_overall.png").exists() and (tmp_path / "summary.md").exists()


def test_cli_benchmark_needs_data_or_suite(tmp_path, capsys):
    from screpair.cli import main

    assert main(["benchmark", "--out", str(tmp_path)]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    assert main(["benchmark", "--suite", "papers", "--data-dir", str(tmp_path), "--out",
                 str(tmp_path)]) == 2
    assert "missing from the data folder" in capsys.readouterr().err


def test_report_only_from_an_unfinished_suite(tmp_path, capsys):
    """--report-only writes the combined report from the runs' jobs.csv without running
    anything, also while a run is unfinished (a cut-off last line is dropped)."""
    from screpair.cli import main
    from screpair.evaluate import _benchmark

    rows = [{"dataset": "demo", "protocol": "masked", "method": m, "seed": 0, "metric": k,
             "value": v, "seconds": 1.0, "peak_mem_mb": 2.0, "status": "ok", "error": ""}
            for m, vals in (("raw", (0.5, 0.9)), ("knn", (0.4, 0.8)))
            for k, v in zip(("mse", "pearson"), vals, strict=True)]
    run = tmp_path / "demo"
    run.mkdir()
    pd.DataFrame(rows, columns=_benchmark.COLUMNS).to_csv(run / "jobs.csv", index=False)
    with open(run / "jobs.csv", "a") as f:
        f.write("demo,masked,alra,0,mse,0.3,1.0")  # the job being written when read
    assert main(["benchmark", "--suite", "quick", "--out", str(tmp_path), "--report-only",
                 "--no-plots", "-q"]) == 0
    assert "benchmark report: 2 ok and 0 failed or skipped jobs" in capsys.readouterr().out
    res = _benchmark.read_results(tmp_path / "results.csv")
    assert sorted(res["method"].unique()) == ["knn", "raw"] and len(res) == 4
    md = (tmp_path / "summary.md").read_text()
    assert "--report-only" in md and "## demo · masked" in md
    assert "| knn | 2 | 1 | 1 | 1 | raw (1) |" in md  # loses pearson to raw
    empty = tmp_path / "empty"
    assert main(["benchmark", "--suite", "quick", "--out", str(empty), "--report-only"]) == 2
    assert "no job of suite 'quick' recorded" in capsys.readouterr().err
