"""The benchmark runner end to end on a tiny simulation: CSV, markdown and PNG outputs agree."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from screpair import evaluate as ev
from screpair.evaluate import _peers
from screpair.methods import BaseImputer


class _Boom(BaseImputer):
    name = "boom"

    def __init__(self, *, rng=None):
        self.rng = rng

    def fit(self, data, *, layer=None):
        msg = "boom: deliberate failure"
        raise RuntimeError(msg)


class _Missing(BaseImputer):
    name = "missing_peer"

    def __init__(self, *, rng=None):
        self.rng = rng

    def fit(self, data, *, layer=None):
        e = ImportError("No module named 'not_installed'")
        e.add_note("pip install not-installed")
        raise e


@pytest.fixture(scope="module")
def tiny():
    from screpair import simulate

    return simulate.splat(n_obs=80, n_vars=60, group_prob=(0.5, 0.5), de_prob=0.3, de_fac_loc=1.0,
                          lib_loc=8.0, rng=0)


@pytest.fixture(scope="module")
def bench(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setitem(_peers.PEERS, "boom", _Boom)
    mp.setitem(_peers.PEERS, "missing_peer", _Missing)
    try:
        res = ev.run_benchmark({"tiny": tiny}, ["gene_mean", "knn", "boom", "missing_peer"],
                               ["masked", "clustering"], [0, 1], out, progress=False,
                               protocol_params={"clustering": {"n_pcs": 5}},
                               command="screpair benchmark --data tiny.h5ad")
    finally:
        mp.undo()
    return res, out


def test_csv_is_tidy_and_complete(bench):
    res, out = bench
    csv = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert list(csv.columns) == ev._benchmark.COLUMNS
    ok = csv[csv.status == "ok"]
    # 2 working methods x 2 seeds x (3 masked + 4 clustering metrics)
    assert len(ok) == 2 * 2 * (3 + 4)
    assert set(ok.metric) == {"mse", "pearson", "zeros_imputed", "ari", "purity", "entropy",
                              "silhouette"}
    assert ok.value.notna().all() and (ok.seconds >= 0).all() and (ok.peak_mem_mb >= 0).all()
    np.testing.assert_allclose(ok.value.to_numpy(), res[res.status == "ok"].value.to_numpy(),
                               rtol=1e-12)


def test_failures_are_recorded_and_the_run_goes_on(bench):
    res, _ = bench
    boom = res[res.method == "boom"]
    assert (boom.status == "failed").all() and len(boom) == 2 * 2
    assert boom.error.str.contains("deliberate failure").all()
    miss = res[res.method == "missing_peer"]
    assert (miss.status == "skipped").all()
    assert miss.error.str.contains("pip install not-installed").all()


def test_markdown_agrees_with_csv(bench):
    res, out = bench
    md = (out / "summary.md").read_text()
    assert "screpair benchmark --data tiny.h5ad" in md
    assert "## tiny · masked" in md and "## tiny · clustering" in md
    assert "## Failed or skipped" in md and "deliberate failure" in md
    ok = res[res.status == "ok"]
    for method in ("gene_mean", "knn"):
        vals = ok[(ok.method == method) & (ok.protocol == "masked") & (ok.metric == "mse")].value
        row = next(line for line in md.split("## tiny · masked")[1].splitlines()
                   if line.startswith(f"| {method} |"))
        mean, sd = map(float, re.search(r"([-\d.]+) ± ([-\d.]+)", row).groups())
        assert mean == pytest.approx(vals.mean(), abs=6e-4)
        assert sd == pytest.approx(vals.std(ddof=1), abs=6e-4)


def test_pngs_are_written(bench):
    _, out = bench
    names = {p.name for p in out.glob("*.png")}
    # one panel grid per protocol, the Fig. 6 ranking (heat map, mean rank, time, memory)
    assert {"bars_masked.png", "bars_clustering.png", "ranking.png", "rank_heatmap.png",
            "rank_overall.png", "embedding_tiny.png"} <= names
    for name in names:
        head = (out / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 2000


def test_summarize_ranks_hand():
    rows = []
    for method, values in {"a": [1.0, 3.0], "b": [0.5, 0.5], "c": [2.0, 2.0]}.items():
        for seed, v in enumerate(values):
            for metric, sign in (("mse", 1.0), ("pearson", -1.0)):
                rows.append({"dataset": "d", "protocol": "p", "method": method, "seed": seed,
                             "metric": metric, "value": sign * v, "seconds": 1.0,
                             "peak_mem_mb": 1.0, "status": "ok", "error": ""})
    summ = ev.summarize(pd.DataFrame(rows)).set_index(["method", "metric"])
    # mse (lower is better): b 0.5, a 2.0, c 2.0 -> ranks 1, 2.5, 2.5
    assert summ.loc[("b", "mse"), "rank"] == 1 and summ.loc[("a", "mse"), "rank"] == 2.5
    # pearson (higher is better) of -values: b -0.5 best
    assert summ.loc[("b", "pearson"), "rank"] == 1
    assert summ.loc[("a", "mse"), "sd"] == pytest.approx(np.std([1.0, 3.0], ddof=1))


def test_peak_memory_sees_numpy_allocations():
    with ev.PeakMemory() as mem:
        a = np.ones((1000, 2000))
        del a
    assert 14.0 < mem.peak_mb < 200.0  # 15.3 MiB array


def test_gene_mean_baseline_hand():
    x = np.array([[2.0, 0.0], [2.0, 4.0]])
    est = _peers.GeneMeanImputer().fit(x)
    lib = np.array([2.0, 6.0])
    v0 = np.mean([np.log1p(1e6), np.log1p(2 / 6 * 1e6)])
    v1 = np.log1p(4 / 6 * 1e6)
    np.testing.assert_allclose(est.gene_log_mean_, [v0, v1], rtol=1e-12)
    out = est.transform(x)
    np.testing.assert_allclose(out, np.expm1([[v0, v1], [v0, v1]]) * lib[:, None] / 1e6, rtol=1e-12)


@pytest.mark.requires("magic")
def test_magic_peer_runs(counts_adata):
    x = counts_adata.X
    out = ev.run_method("magic", counts_adata, rng=0)[0]
    assert out.shape == x.shape and np.all(np.isfinite(out)) and out.min() >= 0
    # output is on the count scale: library sizes within a factor 3 of the input's
    ratio = out.sum(1) / np.asarray(x.sum(1)).ravel()
    assert 0.3 < np.median(ratio) < 3.0


@pytest.mark.slow
@pytest.mark.requires("scvi")
def test_scvi_peer_runs(counts_adata):
    out = ev.run_method("scvi", counts_adata, rng=0, params={"max_epochs": 2})[0]
    lib = np.asarray(counts_adata.X.sum(1)).ravel()
    np.testing.assert_allclose(out.sum(1), lib, rtol=1e-3)


def test_unknown_method_fails_cleanly(tiny):
    res = ev.run_benchmark({"tiny": tiny}, ["no_such_method"], ["masked"], [0], None,
                           progress=False)
    assert (res.status == "failed").all() and res.error.str.contains("unknown method").all()


def test_method_params_may_not_set_the_seed(tiny, tmp_path):
    """The job's seed seeds the method; an ``rng`` in method_params is refused before any job
    (it used to fail every job of that method with a duplicate-keyword error)."""
    with pytest.raises(ValueError, match=r"method_params\['knn'\] sets 'rng'.*seeds="):
        ev.run_benchmark({"tiny": tiny}, ["knn"], ["masked"], [0], tmp_path / "out",
                         method_params={"knn": {"rng": 5}}, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_benchmark(tiny, tmp_path):
    from screpair.cli import main

    path = tmp_path / "tiny.h5ad"
    tiny.write_h5ad(path)
    out = tmp_path / "res"
    rc = main(["benchmark", "--data", str(path), "--methods", "gene_mean,raw",
               "--protocol", "masked", "--seeds", "0", "--out", str(out), "--no-plots",
               "--no-progress", "-q"])
    assert rc == 0
    res = pd.read_csv(out / "results.csv")
    assert set(res.method) == {"gene_mean", "raw"} and (res.status == "ok").all()
    assert "screpair benchmark --data" in (out / "summary.md").read_text()
    assert not list(out.glob("*.png"))


def test_make_method_quiet_turns_off_epoch_bars():
    from screpair.methods._torch import TrainConfig

    assert ev.make_method("cnn", progress=False)._config("train").progress is False
    kept = ev.make_method("cnn", params={"train": {"progress": True}}, progress=False)
    assert kept._config("train").progress is True
    assert ev.make_method("cnn")._config("train").progress is True
    assert ev.make_method("dae", progress=False)._config("train").progress is False
    kept = ev.make_method("dae", params={"train": TrainConfig(n_epochs=3)}, progress=False).train
    assert kept == TrainConfig(n_epochs=3, progress=False)
    assert ev.make_method("vae", params={"train": {"n_epochs": 2}}, progress=False).train == {
        "n_epochs": 2,
        "progress": False,
    }
    assert ev.make_method("knn", progress=False).get_params() == ev.make_method("knn").get_params()
    quiet = ev.make_method("diffusion", progress=False)._config("train")  # keeps its epoch cap
    assert quiet == TrainConfig(epoch_size=16_384, progress=False)


def test_make_method_quiet_keeps_cnn_preset_training():
    import dataclasses

    from screpair.methods.cnn import PRESETS

    for preset in ("default", "paper"):
        est = ev.make_method("cnn", params={"preset": preset}, progress=False)
        want = dataclasses.replace(PRESETS[preset]["train"], progress=False)
        assert est._config("train") == want


def test_zeros_imputed_is_reported_not_ranked(bench):
    res, out = bench
    summ = ev.summarize(res)
    z = summ[summ.metric == "zeros_imputed"]
    assert len(z) == 2 and z["rank"].isna().all()
    # gene_mean fills every zero, knn smooths every zero of an expressed gene
    assert z.set_index("method").loc["gene_mean", "mean"] == pytest.approx(1.0)
    text = (out / "summary.md").read_text()
    assert "| zeros_imputed |" in text or " zeros_imputed |" in text
    assert "(nan)" not in text


def test_dropout_protocol_writes_reliability_diagram(tmp_path):
    from screpair import simulate
    from screpair.methods import BaseImputer, Posterior

    class _Oracle(BaseImputer):
        """Returns its input, and dropout probability 0.3 for every zero."""

        name = "oracle_p"

        def __init__(self, *, rng=None):
            self.rng = rng

        def fit(self, data, *, layer=None):
            return self

        def posterior(self, data, *, layer=None):
            x = data.X.toarray()
            return Posterior(mean=x, dropout_prob=np.where(x == 0, 0.3, 0.0))

    sim = simulate.splat(n_obs=60, n_vars=50, group_prob=(0.5, 0.5), lib_loc=8.0, rng=1)
    mp = pytest.MonkeyPatch()
    mp.setitem(_peers.PEERS, "oracle_p", _Oracle)
    try:
        res = ev.run_benchmark({"sim": sim}, ["oracle_p", "gene_mean"], ["dropout"], [0],
                               tmp_path, progress=False)
    finally:
        mp.undo()
    cal = pd.read_csv(tmp_path / "calibration.csv")
    assert list(cal.columns) == ev._benchmark.CALIBRATION_COLUMNS
    # one bin [0.3, 0.4) holding every zero; its dropout fraction is the data's base rate
    assert len(cal) == 1 and cal["method"].tolist() == ["oracle_p"]
    assert cal["bin_lo"].iat[0] == pytest.approx(0.3) and cal["mean_prob"].iat[0] == pytest.approx(0.3)
    ok = res[(res.status == "ok") & (res.method == "oracle_p")].set_index("metric")["value"]
    assert ok["dropout_ece"] == pytest.approx(abs(0.3 - cal["frac_dropout"].iat[0]), rel=1e-6)
    assert ok["zeros_imputed"] == 0.0  # the output is the input
    assert (tmp_path / "reliability_sim.png").is_file()
    back = pd.DataFrame(res.attrs["calibration"])
    np.testing.assert_allclose(back["frac_dropout"], cal["frac_dropout"], rtol=1e-12)
    pd.concat([res, res])  # results with calibration records still concatenate


# ----------------------------------------------------------------------------- where we lose
def _table(values: dict) -> pd.DataFrame:
    """Results rows from ``{(metric, method): [value per seed]}`` on one dataset / protocol."""
    rows = []
    for (metric, method), vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"dataset": "d", "protocol": "masked", "method": method, "seed": seed,
                         "metric": metric, "value": v, "seconds": 1.0, "peak_mem_mb": 1.0,
                         "status": "ok", "error": ""})
    return pd.DataFrame(rows, columns=ev._benchmark.COLUMNS)


def test_losses_hand_computed():
    """mse (lower better): cnn 0.4, raw 0.5, knn 0.6 -> cnn first, knn loses to cnn by 0.2
    (50% of 0.4). pearson (higher better): raw 0.9, knn 0.8, cnn 0.7 -> a peer wins; knn loses
    by 0.1 (11.1%), cnn by 0.2 (22.2%). Means over two seeds."""
    res = _table({("mse", "cnn"): [0.3, 0.5], ("mse", "raw"): [0.5, 0.5],
                  ("mse", "knn"): [0.6, 0.6], ("pearson", "cnn"): [0.7, 0.7],
                  ("pearson", "raw"): [0.85, 0.95], ("pearson", "knn"): [0.8, 0.8],
                  ("zeros_imputed", "cnn"): [1.0, 1.0], ("zeros_imputed", "raw"): [0.0, 0.0]})
    lost = ev._benchmark.losses(res, ours=["cnn", "knn"]).set_index(["method", "metric"])
    assert sorted(lost.index) == [("cnn", "pearson"), ("knn", "mse"), ("knn", "pearson")]
    np.testing.assert_allclose(lost.loc[("knn", "mse"), ["value", "winner_value", "gap",
                                                         "gap_pct", "rank"]].astype(float),
                               [0.6, 0.4, 0.2, 50.0, 3.0], rtol=1e-12)
    assert lost.loc[("knn", "mse"), "winner"] == "cnn"
    assert not lost.loc[("knn", "mse"), "winner_is_peer"]
    np.testing.assert_allclose(lost.loc[("cnn", "pearson"), ["gap", "gap_pct"]].astype(float),
                               [0.2, 100 * 0.2 / 0.9], rtol=1e-12)
    np.testing.assert_allclose(lost.loc[("knn", "pearson"), ["gap", "gap_pct"]].astype(float),
                               [0.1, 100 * 0.1 / 0.9], rtol=1e-12)
    assert lost.loc[("cnn", "pearson"), "winner"] == "raw"
    assert lost.loc[("cnn", "pearson"), "winner_is_peer"]

    md = ev.markdown_summary(res, ours=["cnn", "knn"])
    assert "## Where screpair's methods lose" in md
    assert "| cnn | 2 | 1 | 1 | 1 | raw (1) |" in md  # 2 experiments (zeros_imputed unranked)
    assert "| knn | 2 | 0 | 2 | 1 | cnn (1), raw (1) |" in md
    # the one experiment no screpair method wins: raw, with knn the closest screpair method
    assert "### Experiments no screpair method wins (1)" in md
    assert "| d | masked | pearson ↑ | raw | 0.9 | knn | 0.8 | 0.1 | 11.1 |" in md
    assert "| d | masked | mse ↓ | 0.6 | 3 | cnn (screpair) | 0.4 | 0.2 | 50 |" in md


def test_losses_ties_count_as_first():
    res = _table({("mse", "cnn"): [0.4], ("mse", "raw"): [0.4], ("mse", "knn"): [0.5]})
    lost = ev._benchmark.losses(res, ours=["cnn", "knn"])
    assert list(lost["method"]) == ["knn"]
    assert lost["winner"].iloc[0] == "cnn, raw" and not lost["winner_is_peer"].iloc[0]
    assert lost["gap"].iloc[0] == pytest.approx(0.1, rel=1e-12)


def test_seeds_line_names_the_exceptions():
    a = _table({("mse", "raw"): [0.1, 0.2, 0.3]})
    b = _table({("mse", "raw"): [0.1]}).assign(protocol="deg")
    line = ev._benchmark._seeds_line(pd.concat([a, b]))
    assert line == "Seeds: 0, 1, 2 (other seeds: d · deg: 0)."


def test_collect_results_reads_an_unfinished_run(tmp_path):
    """jobs.csv rows (finished ok jobs) plus the failed/skipped rows of the last results.csv;
    a line cut short by an interrupt is dropped."""
    cols = ev._benchmark.COLUMNS
    ok = _table({("mse", "raw"): [0.1, 0.2], ("mse", "knn"): [0.3]})
    ok.to_csv(tmp_path / "jobs.csv", index=False)
    with open(tmp_path / "jobs.csv", "a") as f:
        f.write("d,masked,knn,1,mse,0.4")  # interrupted mid-line: no status
    failed = pd.DataFrame([{"dataset": "d", "protocol": "masked", "method": "boom", "seed": 0,
                            "metric": "", "value": np.nan, "seconds": np.nan,
                            "peak_mem_mb": np.nan, "status": "failed", "error": "x"}])
    pd.concat([ok.iloc[:1], failed]).to_csv(tmp_path / "results.csv", index=False)
    got = ev._benchmark.collect_results(tmp_path)
    assert list(got.columns) == cols
    assert sorted(zip(got["method"], got["seed"], got["status"], strict=True)) == [
        ("boom", 0, "failed"), ("knn", 0, "ok"), ("raw", 0, "ok"), ("raw", 1, "ok")]
    assert got.loc[got["method"] == "boom", "metric"].iloc[0] == ""
    assert ev._benchmark.collect_results(tmp_path / "none").empty


def test_panel_grid_shape():
    """A dataset's metrics side by side, wrapped into rows of at most 5 of about equal length."""
    grid = ev._benchmark._grid
    assert [grid(n) for n in (1, 2, 4, 5, 6, 10, 11)] == [(1, 1), (1, 2), (1, 4), (1, 5),
                                                          (2, 3), (2, 5), (3, 4)]


def test_figure_labels_show_direction_and_ours():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = ev._benchmark
    assert b._direction("mse") == "mse ↓ lower is better"
    assert b._direction("ari") == "ari ↑ higher is better"
    assert b._direction("zeros_imputed") == "zeros_imputed (not ranked)"
    fig, ax = plt.subplots()
    ax.set_xticks([0, 1], ["cnn", "raw"])
    b._style_method_labels(ax.get_xticklabels(), {"cnn"})
    cnn, raw = ax.get_xticklabels()
    assert cnn.get_fontweight() == "bold" and cnn.get_color() == b.OURS_COLOR
    assert raw.get_fontweight() == "normal"
    plt.close(fig)


def test_partial_report_ranks_only_finished_pairs():
    """Dataset d has every job of methods a, b, c on seeds 0, 1; on dataset e only a (both
    seeds) and b (seed 0) have finished, c not at all: e is not ranked (a would be first
    there), d is, and the report names what e still lacks. A failed job counts as finished."""
    d = _table({("mse", "a"): [0.3, 0.3], ("mse", "b"): [0.2, 0.2], ("mse", "c"): [0.1, 0.1]})
    e = _table({("mse", "a"): [0.5, 0.5], ("mse", "b"): [0.9]}).assign(dataset="e")
    res = pd.concat([d, e], ignore_index=True)
    b = ev._benchmark
    assert b.missing_jobs(res) == {("e", "masked"): ["b (seed 1)", "c"]}
    summ = ev.summarize(res).set_index(["dataset", "method"])
    assert summ.loc[("d", "c"), "rank"] == 1 and summ.loc[("d", "a"), "rank"] == 3
    assert summ.loc["e", "rank"].isna().all()
    ranks = ev.rank_table(res)
    assert ranks["n_experiments"].to_dict() == {"c": 1, "b": 1, "a": 1}
    assert list(ranks.index) == ["c", "b", "a"]
    lost = b.losses(res, ours=["a"])
    assert list(lost["dataset"]) == ["d"]  # a's unranked "win" on e is not a result
    md = ev.markdown_summary(res, ours=["a"])
    assert "Not ranked (1 dataset x protocol pairs" in md and ": e · masked." in md
    assert "Not ranked: not finished yet for b (seed 1), c." in md
    # the missing jobs fail: every job has its row, e is ranked among a and b
    failed = pd.DataFrame([{"dataset": "e", "protocol": "masked", "method": m, "seed": s,
                            "metric": "", "value": np.nan, "seconds": np.nan,
                            "peak_mem_mb": np.nan, "status": "failed", "error": "x"}
                           for m, s in (("b", 1), ("c", 0), ("c", 1))], columns=res.columns)
    done = pd.concat([res, failed], ignore_index=True)
    assert b.missing_jobs(done) == {}
    assert ev.summarize(done).set_index(["dataset", "method"]).loc[("e", "a"), "rank"] == 1


def test_mcv_verdict_says_who_wins_and_why():
    """mcv_mse (lower better): magic 0.15, saver 0.23, raw 0.28 -> no screpair win, gap 0.08
    (53.3 % of 0.15); mcv_poisson_mcv: saver 0.037 < scvi 0.040 < raw 0.078 -> saver wins.
    A screpair method worse than raw cannot win even without peers (pbmc: knn 0.3 vs raw 0.28)."""
    res = _table({("mcv_mse", "magic"): [0.15], ("mcv_mse", "saver"): [0.23],
                  ("mcv_mse", "raw"): [0.28], ("mcv_poisson_mcv", "magic"): [0.056],
                  ("mcv_poisson_mcv", "saver"): [0.037], ("mcv_poisson_mcv", "raw"): [0.078],
                  ("mcv_poisson_mcv", "scvi"): [0.040], ("mcv_mse", "scvi"): [0.27]})
    res = res.assign(protocol="mcv")
    only_raw = _table({("mcv_mse", "knn"): [0.3], ("mcv_mse", "raw"): [0.28]}).assign(
        protocol="mcv", dataset="pbmc")
    v = ev._benchmark.mcv_verdict(res, ours=["saver", "knn"]).set_index(["dataset", "metric"])
    mse = v.loc[("d", "mcv_mse")]
    assert (mse["best_ours"], mse["best_peer"], mse["winner"], bool(mse["wins"])) == (
        "saver", "magic", "magic", False)
    np.testing.assert_allclose([mse["ours_value"], mse["raw_value"], mse["peer_value"],
                                mse["gap"], mse["gap_pct"]],
                               [0.23, 0.28, 0.15, 0.08, 100 * 0.08 / 0.15], rtol=1e-12)
    pois = v.loc[("d", "mcv_poisson_mcv")]
    assert bool(pois["wins"]) and pois["winner"] == "saver" and pois["gap"] == 0
    assert pois["best_peer"] == "scvi" and pois["peer_value"] == pytest.approx(0.040)
    pb = ev._benchmark.mcv_verdict(only_raw, ours=["knn"]).iloc[0]
    assert not pb["wins"] and pb["winner"] == "raw" and pb["best_peer"] == ""
    md = ev.markdown_summary(res, ours=["saver"])
    assert "## MCV: does a screpair method beat no denoising and every peer?" in md
    assert "| d | mcv_mse ↓ | saver | 0.23 | 0.28 | magic | 0.15 | no | magic | 0.08 | 53.3 |" in md
    assert "| d | mcv_poisson_mcv ↓ | saver | 0.037 | 0.078 | scvi | 0.04 | yes | saver | 0 | 0 |" in md
    assert "**mcv_mse: no screpair method wins on 1 of 1 datasets** (won by magic)." in md
    assert "Jensen" in md and "**mcv_poisson_mcv:" not in md
