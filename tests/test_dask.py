"""The chunked pipeline on a Dask cluster (issue 17): impute_file(client=) and `screpair impute
--scheduler` give the single-process chunked output bit for bit, whatever the number of
workers; a lost worker or a failing task leaves a complete output or the old one."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import screpair
from screpair.cli import main
from screpair.methods import _dask

distributed = pytest.importorskip("distributed")

FAST = {"alra": {"k": 5}, "knn": {"k": 5, "n_pcs": 5}, "saver": {}}
ROWS = 64  # 200 cells: blocks of 64, 64, 64 and 8


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(path) if str(path).endswith(".h5ad") else anndata.read_zarr(path)


def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _assert_same(a, b):
    """Every matrix of the two outputs identical, bit for bit (values and kinds)."""
    assert sorted(a.layers) == sorted(b.layers)
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    for key in a.layers:
        assert sp.issparse(a.layers[key]) == sp.issparse(b.layers[key]), key
        assert a.layers[key].dtype == b.layers[key].dtype, key
        np.testing.assert_array_equal(_dense(a.layers[key]), _dense(b.layers[key]), err_msg=key)
    assert sp.isspmatrix_csr(b.X)
    np.testing.assert_array_equal(a.X.indptr, b.X.indptr)
    np.testing.assert_array_equal(a.X.indices, b.X.indices)
    np.testing.assert_array_equal(a.X.data, b.X.data)


def _cluster(n_workers: int):
    return distributed.LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1,
                                    dashboard_address=":0")


@pytest.fixture(scope="module")
def client():
    with _cluster(2) as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def stores(sim, tmp_path_factory):
    """The simulation as .zarr and .h5ad inputs."""
    d = tmp_path_factory.mktemp("stores")
    ad = sim.copy()
    paths = {"zarr": d / "in.zarr", "h5ad": d / "in.h5ad"}
    for p in paths.values():
        screpair.write(ad, p)
    return ad, paths


@pytest.fixture
def no_fault(client):
    yield
    client.run(_dask._set_test_fault, None)


def _plain(src, out, method, **kw):
    screpair.impute_file(src, out, method, chunk_rows=ROWS, progress=False,
                         **(FAST[method] | kw))
    return _read(out)


@pytest.mark.parametrize("method", ["alra", "saver"])
def test_fit_on_a_sample_equals_single_process(stores, tmp_path, client, method):
    """Above the sample size (60 of 200 cells) the fit reads only the sample's rows; the
    posterior blocks on the workers equal the single-process output bit for bit."""
    _, paths = stores
    ref = _plain(paths["zarr"], tmp_path / "plain.zarr", method, n_fit_cells=60)
    out = tmp_path / "dask.zarr"
    rec = screpair.impute_file(paths["zarr"], out, method, chunk_rows=ROWS, progress=False,
                               client=client, n_fit_cells=60, **FAST[method])
    assert rec["fit_cells_read"] == 60
    _assert_same(ref, _read(out))


@pytest.mark.parametrize("method", sorted(FAST))
def test_equals_single_process(stores, tmp_path, client, method):
    ad, paths = stores
    ref = _plain(paths["zarr"], tmp_path / "plain.zarr", method)
    out = tmp_path / "dask.zarr"
    rec = screpair.impute_file(paths["zarr"], out, method, chunk_rows=ROWS, progress=False,
                               client=client, **FAST[method])
    back = _read(out)
    _assert_same(ref, back)
    assert back.shape == ad.shape and back.layers[method].dtype == np.float32
    assert (method == "saver") == ("saver_var" in back.layers)
    assert rec["dask"]["n_workers"] == 2 and back.uns[method]["dask"]["n_workers"] == 2
    assert back.uns[method]["chunk_rows"] == ROWS
    # only the output is left: no temporary store, no block parts inside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask.zarr", "plain.zarr"]
    assert not (out / ".screpair-parts").exists()


def test_cnn_inference(stores, tmp_path, client, one_torch_thread):
    """cnn trains on this process; its dropout model's EM runs its E-step blocks on the
    workers, and its trained networks and dropout model are applied by blocks on the workers:
    the single-process output bit for bit."""
    ad, paths = stores
    params = dict(groupby="group", module={"n_hidden": 8}, targets={"n_ensemble": 1},
                  train={"n_epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"})
    kw = {"chunk_rows": ROWS, "progress": False, **params}
    screpair.impute_file(paths["zarr"], tmp_path / "plain.zarr", "cnn", **kw)
    with distributed.get_task_stream(client) as ts:
        screpair.impute_file(paths["zarr"], tmp_path / "dask.zarr", "cnn", client=client,
                             **kw)
    assert _tasks(ts)["_e_step_block"] >= 2  # one block of cells per EM update here
    ref, back = _read(tmp_path / "plain.zarr"), _read(tmp_path / "dask.zarr")
    _assert_same(ref, back)
    assert {"cnn", "dropout_prob"} <= set(back.layers)
    assert back.uns["cnn"]["posterior_by_rows"] and back.uns["cnn"]["dask"]["n_workers"] == 2


def test_h5ad_input_genes_and_empty_cells(sim, tmp_path, client):
    """An .h5ad input read by the workers, cells and genes without counts set aside, and an
    output gene subset: the same bits as the single-process path."""
    ad = sim.copy()
    x = ad.X.toarray()
    x[[5, 70, 71], :] = 0  # cells without counts, one of them in a block of its own below
    x[:, 3] = 0
    ad.X = sp.csr_matrix(x)
    src = tmp_path / "in.h5ad"
    screpair.write(ad, src)
    kw = {"genes": "hvg:15", "chunk_rows": 10, "progress": False, "k": 5}
    with pytest.warns(UserWarning, match="no counts"):
        screpair.impute_file(src, tmp_path / "plain.zarr", "alra", **kw)
    with pytest.warns(UserWarning, match="no counts"):
        screpair.impute_file(src, tmp_path / "dask.zarr", "alra", client=client, **kw)
    ref, back = _read(tmp_path / "plain.zarr"), _read(tmp_path / "dask.zarr")
    _assert_same(ref, back)
    assert back.n_vars == 15 and back.uns["alra"]["n_cells_set_aside"] == 3
    np.testing.assert_array_equal(_dense(back.layers["alra"])[[5, 70, 71]], 0.0)


@pytest.mark.parametrize("n_workers", [1, 4])
def test_same_output_for_any_number_of_workers(stores, tmp_path, n_workers):
    """1 and 4 workers (the module's client: 2) give the single-process output, the fit's
    gene batches included (SAVER_BLOCKS: several regression batches)."""
    ad, paths = stores
    ref = _plain(paths["zarr"], tmp_path / "plain.zarr", "saver", **SAVER_BLOCKS)
    with _cluster(n_workers) as cluster, distributed.Client(cluster) as c, \
            distributed.get_task_stream(c) as ts:
        rec = screpair.impute_file(paths["zarr"], tmp_path / "dask.zarr", "saver",
                                   chunk_rows=ROWS, progress=False, client=c, **SAVER_BLOCKS)
    assert rec["dask"]["n_workers"] == n_workers
    assert _tasks(ts)["_regression_task"] >= 5
    _assert_same(ref, _read(tmp_path / "dask.zarr"))


# ------------------------------------------------------------------ the fits and passes

#: SAVER on the 99 simulated genes with several regression batches: no cutoff-learning stage
#: (it would fit the first 100 genes on the calling process), batches of 16 genes
SAVER_BLOCKS = {"maxcor_cutoff": 0.0, "batch_size": 16}


def _tasks(ts) -> dict[str, int]:
    """Tasks run per function, from a ``get_task_stream`` record (keys
    ``screpair-<function>-<token>-...``)."""
    from collections import Counter

    keys = [str(t["key"]) for t in ts.data]
    return Counter(k.split("-")[1] for k in keys if k.startswith("screpair-"))


def _fitted(est) -> dict:
    return {k: v for k, v in vars(est).items() if k.endswith("_") and k != "var_names_"}


def _assert_equal_attrs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_equal_attrs(a[k], b[k])
        elif sp.issparse(a[k]):
            assert (a[k] != b[k]).nnz == 0, k
        elif a[k] is None or isinstance(a[k], (str, float, int)):
            assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), k  # NaN == NaN
        else:  # arrays (object arrays of strings too), tuples
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("fmt", ["zarr", "h5ad"])
def test_gene_stats_on_workers(stores, client, fmt):
    """The streaming gene pass by the workers (each block read from the store, the float sums
    chained in row order) equals the single-process pass bit for bit."""
    from screpair import _chunks

    ad, paths = stores
    with _chunks.open_rows(paths[fmt]) as src:
        ref = _chunks.gene_stats(src, 37)
    with distributed.get_task_stream(client) as ts:
        got = _dask.gene_stats(client, paths[fmt], None, ad.n_obs, ad.n_vars, 37)
    assert _tasks(ts)["stats"] == 2 * 6 + 1  # 6 blocks of 37 (200 cells): read, add; zeros
    for field in ("library_size", "counts", "n_cells", "mean", "mean_sq"):
        a, b = getattr(ref, field), getattr(got, field)
        assert a.dtype == b.dtype, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert got.n_obs == ad.n_obs
    np.testing.assert_allclose(got.counts, np.asarray(ad.X.sum(0)).ravel(), rtol=0)
    # the counts read from a layer by the workers (the same counts as X here)
    got = _dask.gene_stats(client, paths[fmt], "counts", ad.n_obs, ad.n_vars, 64)
    np.testing.assert_array_equal(got.mean, ref.mean)


@pytest.mark.parametrize("fmt", ["zarr", "h5ad"])
def test_row_totals_on_workers(stores, tmp_path, client, fmt):
    """The sample path's streaming pass (cells and genes with counts, library sizes, per-gene
    sums of count / library size) by the workers equals the single-process pass bit for bit;
    and a sampled fit's run takes it on the workers."""
    from screpair import _chunks

    ad, paths = stores
    ref = _chunks.TotalsPass(*ad.shape)
    with _chunks.open_rows(paths[fmt]) as src:
        for s, _, xb in src.blocks(37):
            ref.add(s, xb)
    with distributed.get_task_stream(client) as ts:
        got = _dask.row_totals(client, paths[fmt], None, ad.n_obs, ad.n_vars, 37)
    assert _tasks(ts)["totals"] == 2 * 6 + 1  # 6 blocks of 37 (200 cells): read, add; zeros
    for field in ("lib", "row_nnz", "col_nnz", "norm_sum"):
        a, b = getattr(ref, field), getattr(got, field)
        assert a.dtype == b.dtype, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    x = np.asarray(ad.X.toarray() if hasattr(ad.X, "toarray") else ad.X, dtype=np.float64)
    lib = x.sum(1)
    np.testing.assert_allclose(got.norm_sum, (x[lib > 0] / lib[lib > 0, None]).sum(0),
                               rtol=1e-12)
    with distributed.get_task_stream(client) as ts:
        screpair.impute_file(paths[fmt], tmp_path / "out.zarr", "alra",
                             chunk_rows=ROWS, progress=False, client=client, n_fit_cells=60)
    assert _tasks(ts)["totals"] > 0


def test_saver_fit_on_workers(stores, tmp_path, client):
    """SAVER's max-correlation and regression batches as tasks: the fitted prior (every
    attribute) and the output layers identical to the fit on this process."""
    from screpair.methods.saver import SaverImputer

    ad, paths = stores
    ests = {}
    for name, c in [("plain", None), ("dask", client)]:
        ests[name] = SaverImputer(rng=0, progress=False, **SAVER_BLOCKS)
        with distributed.get_task_stream(client) as ts:
            screpair.impute_file(paths["zarr"], tmp_path / f"{name}.zarr", ests[name],
                                 chunk_rows=ROWS, progress=False, client=c)
        tasks = _tasks(ts)
        n_batches = -(-int(ests[name].predicted_.sum()) // 16)
        assert tasks["_regression_task"] == (n_batches if c is not None else 0)
    assert n_batches >= 5 and tasks["_max_correlation_task"] >= 5
    a, b = _fitted(ests["plain"]), _fitted(ests["dask"])
    _assert_equal_attrs(a, b)
    assert {"coef_", "intercept_", "var_param_", "maxcor_"} <= a.keys()
    assert np.any(a["coef_"] != 0)
    _assert_same(_read(tmp_path / "plain.zarr"), _read(tmp_path / "dask.zarr"))


@pytest.mark.parametrize("model", ["zinb", "scimpute"])
def test_dropout_model_fit_on_workers(sim, client, model, monkeypatch):
    """cnn's dropout model: the ZINB EM's E-step by cell blocks, scImpute's mixture EM by
    cluster x gene blocks, as tasks: parameters and probabilities identical to the fit on this
    process."""
    from screpair._parallel import on_cluster
    from screpair.dropout import DropoutModel
    from screpair.methods._dask import map_on_cluster

    x = sp.csr_matrix(sim.X, dtype=np.float64)
    # zinb: blocks of 20 cells (10 E-step tasks per update); scImpute: blocks of genes of
    # about 500 entries (several per cluster)
    kw = {"block_size": 2_000} if model == "zinb" else {}
    monkeypatch.setattr("screpair.dropout._em._EM_BLOCK", 500)
    fits = {}
    for name in ("plain", "dask"):
        dm = DropoutModel(model=model, fit_kwargs=kw, rng=0)
        with on_cluster(*((client, map_on_cluster) if name == "dask" else (None,))), \
                distributed.get_task_stream(client) as ts:
            fits[name] = dm.fit(x, labels=sim.obs["group"])
        tasks = _tasks(ts)
    key = "_e_step_block" if model == "zinb" else "_cluster_block_task"
    assert tasks[key] >= (10 if model == "zinb" else 6)
    a, b = fits["plain"], fits["dask"]
    _assert_equal_attrs(a.params_, b.params_)
    assert (a.prob_ != b.prob_).nnz == 0 and a.prob_.nnz > 0
    np.testing.assert_array_equal(a.labels_, b.labels_)


def test_lost_worker_output_complete(stores, tmp_path, client, no_fault):
    """A worker process that dies in the middle of a block: Dask runs the block again
    elsewhere; the output is complete and equal to the single-process one."""
    ad, paths = stores
    ref = _plain(paths["zarr"], tmp_path / "plain.zarr", "knn")
    marker = tmp_path / "killed"
    client.run(_dask._set_test_fault, ("kill", 1, str(marker)))
    screpair.impute_file(paths["zarr"], tmp_path / "dask.zarr", "knn", chunk_rows=ROWS,
                         progress=False, client=client, **FAST["knn"])
    assert marker.exists()  # a worker was killed in block 1
    _assert_same(ref, _read(tmp_path / "dask.zarr"))


def test_failed_task_leaves_old_output(stores, tmp_path, client, no_fault):
    """A task that fails: the run stops, the old output is kept, nothing else is left."""
    ad, paths = stores
    out = tmp_path / "out.zarr"
    old = _plain(paths["zarr"], out, "knn")
    client.run(_dask._set_test_fault, ("fail", 2, ""))
    with pytest.raises(RuntimeError, match="test fault in block 2"):
        screpair.impute_file(paths["zarr"], out, "alra", chunk_rows=ROWS, progress=False,
                             overwrite=True, client=client, k=5)
    back = _read(out)
    assert "alra" not in back.layers and "alra" not in back.uns
    assert back.uns["knn"]["method"] == "knn"
    np.testing.assert_array_equal(_dense(back.layers["knn"]), _dense(old.layers["knn"]))
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]
    # a new output that fails leaves none
    with pytest.raises(RuntimeError, match="test fault"):
        screpair.impute_file(paths["zarr"], tmp_path / "new.zarr", "alra", chunk_rows=ROWS,
                             progress=False, client=client, k=5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


def test_checked_before_the_work(stores, tmp_path, client, monkeypatch):
    ad, paths = stores

    def no_reading(*a, **k):
        msg = "read before the checks"
        raise AssertionError(msg)

    monkeypatch.setattr("screpair.methods._file.read_all", no_reading)
    with pytest.raises(ValueError, match=r"output must be a \.zarr store"):
        screpair.impute_file(paths["zarr"], tmp_path / "out.h5ad", "alra", client=client)
    from screpair.methods.alra import ALRAImputer

    class WholeALRA(ALRAImputer):  # a method whose posterior needs all cells at once
        posterior_by_rows = False

    with pytest.raises(ValueError, match="posterior_by_rows is False"):
        screpair.impute_file(paths["zarr"], tmp_path / "out.zarr", WholeALRA(k=5),
                             client=client)
    csv = tmp_path / "in.csv"
    screpair.write(ad, csv)
    with pytest.raises(ValueError, match=r"input must be an \.h5ad file or a \.zarr store"):
        screpair.impute_file(csv, tmp_path / "out.zarr", "alra", client=client)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        screpair.impute_file(paths["zarr"], tmp_path / "out.zarr", "alra", client="tcp://x:1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_cli_scheduler(stores, tmp_path, client, capsys):
    ad, paths = stores
    ref = _plain(paths["h5ad"], tmp_path / "plain.zarr", "alra")
    address = client.scheduler.address
    out = tmp_path / "dask.zarr"
    argv = ["impute", str(paths["h5ad"]), str(out), "--method", "alra", "--chunk-rows",
            str(ROWS), "--scheduler", address, "-q"]
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"k": 5}')
    assert main([*argv, "--config", str(cfg)]) == 0
    assert "Dask worker(s): all genes" in capsys.readouterr().out
    _assert_same(ref, _read(out))
    # the same through a scheduler file
    sched = tmp_path / "scheduler.json"
    sched.write_text(json.dumps({"type": "Scheduler", "address": address}))
    argv[argv.index(address)] = str(sched)
    assert main([*argv, "--config", str(cfg), "--overwrite"]) == 0
    _assert_same(ref, _read(out))


@pytest.mark.parametrize("scheduler, message", [
    ("tcp://127.0.0.1:1", "cannot reach the Dask scheduler at 'tcp://127.0.0.1:1' within 1 s"),
    ("no-such-file.json", "neither an address (tcp://HOST:PORT) nor an existing scheduler file"),
])
def test_cli_bad_scheduler(stores, tmp_path, capsys, monkeypatch, scheduler, message):
    """A scheduler that cannot be reached: exit 2, one line, before anything is read."""
    ad, paths = stores
    monkeypatch.setattr(_dask, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr("screpair.methods._file.read_all", None)  # never reached
    out = tmp_path / "out.zarr"
    code = main(["impute", str(paths["zarr"]), str(out), "--scheduler", scheduler])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("screpair: error: ") and "Traceback" not in err
    assert not out.exists()
    # an output the workers cannot write into: refused before connecting
    code = main(["impute", str(paths["zarr"]), str(tmp_path / "o.h5ad"), "--scheduler",
                 "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and "output must be a .zarr store" in err and "within" not in err


def test_no_dask_without_client(stores, tmp_path):
    """Without a client screpair never imports distributed (nor dask on `import screpair`;
    anndata itself imports dask.array when dask is installed, so dask may be loaded by it)."""
    ad, paths = stores
    code = (
        "import sys, screpair\n"
        "assert 'dask' not in sys.modules and 'distributed' not in sys.modules\n"
        f"screpair.impute_file({str(paths['zarr'])!r}, {str(tmp_path / 'o.zarr')!r}, 'alra',"
        " chunk_rows=64, progress=False, k=5)\n"
        "assert 'distributed' not in sys.modules, 'distributed imported'\n"
        "assert not [m for m in sys.modules if m.startswith('screpair.methods._dask')]\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "o.zarr").is_dir()


def test_mixture_blocks_equal_whole_cluster(sim):
    """fit_dropout's cluster x gene blocks (the tasks of a Dask fit) give what the EM of each
    whole cluster gives (fit_mixture over its own blocks of genes), bit for bit: the split
    follows fit_mixture's blocks, which are fitted independently."""
    from screpair import _norm
    from screpair.dropout import _em

    x = sp.csr_matrix(sim.X, dtype=np.float64)
    fit = _em.fit_dropout(x, sim.obs["group"])
    vals = _em._scimpute_log(x, _norm.library_size(x))
    for c in range(fit.clusters.size):
        rows = np.flatnonzero(fit.cell_cluster == c)
        values, unit_len, mult = _em._cluster_units(vals[rows])  # the whole cluster's EM
        whole = _em.fit_mixture(values, unit_len, mult=mult, max_iter=100, tol=0.5)
        fitted = np.isin(whole.status, [0, 1])  # converged / max_iter (others: later codes)
        assert fitted.sum() > 50
        for name in ("eta", "alpha", "beta", "mu", "sigma"):
            np.testing.assert_array_equal(getattr(fit, name)[c], getattr(whole, name))
        np.testing.assert_array_equal(fit.n_iter[c], whole.n_iter)


@pytest.mark.parametrize("method", ["dae", "diffusion"])
def test_pair_methods_by_rows_on_workers(stores, tmp_path, client, one_torch_thread, method):
    """dae / vae / diffusion compute their posterior by rows (diffusion's noise laid out by
    fixed blocks of cells): trained on this process, applied by blocks on the workers, the
    single-process output bit for bit."""
    ad, paths = stores
    params = {"train": {"n_epochs": 1, "batch_size": 64, "patience": 0, "progress": False,
                        "device": "cpu"},
              "pairs": {"n_top_genes": 60, "n_views": 2}}
    params["module"] = ({"hidden": 16, "latent": 4} if method == "dae" else
                        {"patch_size": 10, "d_model": 16, "n_layers": 1, "n_heads": 2,
                         "dim_feedforward": 16, "cond_hidden": 16, "cond_dim": 8})
    if method == "diffusion":  # a random repair: eta > 0, two samples
        params |= {"n_samples": 2, "n_inference_steps": 3, "eta": 0.5}
    kw = {"chunk_rows": ROWS, "progress": False, **params}
    screpair.impute_file(paths["zarr"], tmp_path / "plain.zarr", method, **kw)
    rec = screpair.impute_file(paths["zarr"], tmp_path / "dask.zarr", method, client=client,
                               **kw)
    ref, back = _read(tmp_path / "plain.zarr"), _read(tmp_path / "dask.zarr")
    _assert_same(ref, back)
    assert method in back.layers and rec["dask"]["n_workers"] == 2
