"""The chunked file pipeline (issue 16): impute_file and `screpair impute --chunk-rows/--genes`
give the layers of the in-memory impute, written block by block, atomically."""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import screpair
from screpair.cli import main
from screpair.methods import _api, _file


def _dense(m):
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(path) if str(path).endswith(".h5ad") else anndata.read_zarr(path)


@pytest.fixture
def sim_path(sim, tmp_path):
    ad = sim.copy()
    ad.var["chosen"] = np.arange(ad.n_vars) % 7 == 0
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    return ad, path


FAST = {"alra": {"k": 5}, "knn": {"k": 5, "n_pcs": 5}}


@pytest.mark.parametrize("method", sorted(FAST))
@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_equals_in_memory(sim_path, tmp_path, method, fmt):
    ad, path = sim_path
    ref = screpair.impute(ad, method, copy=True, **FAST[method]).layers[method]
    out = tmp_path / f"out.{fmt}"
    rec = screpair.impute_file(path, out, method, chunk_rows=64, progress=False, **FAST[method])
    back = _read(out)
    assert back.shape == ad.shape and rec["chunk_rows"] == 64
    assert back.layers[method].dtype == np.float32
    np.testing.assert_allclose(_dense(back.layers[method]), _dense(ref), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(back.X.toarray(), ad.X.toarray())  # the input counts
    assert list(back.obs_names) == list(ad.obs_names) and back.uns[method]["method"] == method
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.h5ad", out.name])


@pytest.mark.parametrize("top", [None, 70_000])
def test_knn_compact_counts_same_output(sim, tmp_path, caplog, top):
    """knn's fit reads every cell: impute_file holds the counts as uint16 (float32 with a count
    above 65,535) and its output is the in-memory output bit for bit, set-aside cells and a
    count too large for uint16 included."""
    ad = sim.copy()
    x = ad.X.tolil()
    x[:5] = 0
    if top is not None:
        x[7, 3] = top
    ad.X = sp.csr_matrix(x)
    ad.X.eliminate_zeros()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    params = {"k": 5, "n_pcs": 5, "steps": 2}
    with pytest.warns(UserWarning, match="5 cell"):
        ref = screpair.impute(ad, "knn", copy=True, **params).layers["knn"]
    with caplog.at_level("INFO", logger="screpair"), pytest.warns(UserWarning, match="5 cell"):
        screpair.impute_file(path, tmp_path / "o.h5ad", "knn", chunk_rows=40, progress=False,
                             **params)
    assert "values in the narrowest exact type" in caplog.text
    np.testing.assert_array_equal(_dense(_read(tmp_path / "o.h5ad").layers["knn"]), _dense(ref))


def test_drop_empty_is_the_subset_sharing_the_values(monkeypatch):
    monkeypatch.setattr(_api, "NNZ_PIECE", 7)  # the indices renumbered over several pieces
    rng = np.random.default_rng(3)
    x = sp.random(60, 40, density=0.2, format="csr", random_state=rng, dtype=np.float64)
    x.data = np.ceil(x.data * 9)
    x = x.tolil()
    x[[0, 7, 59]] = 0
    x[:, [2, 3, 39]] = 0
    x = sp.csr_matrix(x, dtype=np.uint16)
    x.eliminate_zeros()
    x.sort_indices()
    cells, genes = (np.diff(x.indptr) > 0), np.bincount(x.indices, minlength=40) > 0
    ref = _api._subset(x, np.flatnonzero(cells), np.flatnonzero(genes))
    data = x.data
    got = _api._drop_empty(x, cells, genes)
    assert got.shape == (57, 37) and got.dtype == np.uint16 and got.has_sorted_indices
    assert np.shares_memory(got.data, data)  # no copy of the values
    np.testing.assert_array_equal(got.toarray(), ref.toarray())
    np.testing.assert_array_equal(got.indices, ref.indices)
    np.testing.assert_array_equal(got.indptr, ref.indptr)


def test_all_cells_fit_holds_the_counts_once(sim, tmp_path, monkeypatch):
    """knn reads every cell: with cells and genes without counts the job takes the kept ones
    from the matrix read, sharing its values (no second copy), and the output (layer, X, the
    hvg:N genes, read from the store again) equals the in-memory output bit for bit."""
    ad = sim.copy()
    x = ad.X.tolil()
    x[3:9] = 0
    x[:, [0, 11]] = 0
    ad.X = sp.csr_matrix(x)
    ad.X.eliminate_zeros()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    seen = {}
    read_all, fit = _file.read_all, _api._Job.fit

    def spy_read(*args, **kwargs):
        seen["read"] = read_all(*args, **kwargs)
        return seen["read"]

    def spy_fit(job):
        seen["job"] = job.x
        return fit(job)

    monkeypatch.setattr(_file, "read_all", spy_read)
    monkeypatch.setattr(_api._Job, "fit", spy_fit)
    params = {"k": 5, "n_pcs": 5, "steps": 2}
    with pytest.warns(UserWarning, match="6 cell"):
        ref = screpair.impute(ad, "knn", copy=True, genes="hvg:15", **params)
    with pytest.warns(UserWarning, match="6 cell"):
        screpair.impute_file(path, tmp_path / "o.h5ad", "knn", genes="hvg:15", chunk_rows=40,
                             progress=False, **params)
    assert seen["job"].shape == (ad.n_obs - 6, ad.n_vars - 2)
    assert np.shares_memory(seen["job"].data, seen["read"].data)
    back = _read(tmp_path / "o.h5ad")
    chosen = ad.var_names.isin(back.var_names)
    assert chosen.sum() == 15
    screpair.pp.highly_variable_genes(ad, n_top_genes=15)
    np.testing.assert_array_equal(chosen, ad.var["highly_variable"].to_numpy())
    np.testing.assert_array_equal(_dense(back.layers["knn"]),
                                  _dense(ref.layers["knn"])[:, chosen])
    np.testing.assert_array_equal(back.X.toarray(), ad.X[:, chosen].toarray())


@pytest.mark.parametrize("params", [{"steps": 2}, {"space": "log"}, {"k": "mcv"}])
def test_knn_above_n_fit_cells_reads_the_counts_from_a_file(sim, tmp_path, caplog, monkeypatch,
                                                            params):
    """Above ``n_fit_cells`` knn's fit reads a sample and every cell's counts from a temporary
    file written during the streaming pass (not held in memory): the output equals the
    in-memory output bit for bit, with set-aside cells and genes, a count above uint16 and
    ``hvg:N`` genes; the file is gone afterwards, and the fit never holds all counts."""
    ad = sim.copy()
    x = ad.X.tolil()
    x[3:9] = 0
    x[:, [0, 11]] = 0
    x[20, 5] = 70_000
    ad.X = sp.csr_matrix(x)
    ad.X.eliminate_zeros()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    opts = {"k": 5, "n_pcs": 5, "n_fit_cells": 60, "k_grid": (3, 6), **params}
    with pytest.warns(UserWarning, match="6 cell"):
        ref = screpair.impute(ad, "knn", copy=True, genes="hvg:15", **opts)
    read_all, seen = _file.read_all, []

    def spy_read(*args, **kwargs):
        seen.append(read_all(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_file, "read_all", spy_read)
    with caplog.at_level("INFO", logger="screpair"), pytest.warns(UserWarning, match="6 cell"):
        rec = screpair.impute_file(path, tmp_path / "o.h5ad", "knn", genes="hvg:15",
                                   chunk_rows=32, progress=False, **opts)
    assert "every cell's counts go to a temporary file" in caplog.text
    assert [m.shape[0] for m in seen] == [60] and rec["fit_cells_read"] == 60  # the sample
    back = _read(tmp_path / "o.h5ad")
    chosen = ad.var_names.isin(back.var_names)
    np.testing.assert_array_equal(_dense(back.layers["knn"]),
                                  _dense(ref.layers["knn"])[:, chosen])
    np.testing.assert_array_equal(back.X.toarray(), ad.X[:, chosen].toarray())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "o.h5ad"]


def test_knn_counts_file_removed_on_interrupt(sim_path, tmp_path, monkeypatch):
    """An error or Ctrl-C during the posterior leaves neither an output nor the counts file."""
    _, path = sim_path

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(_file, "_write_blocks", stop)
    with pytest.raises(KeyboardInterrupt):
        screpair.impute_file(path, tmp_path / "o.h5ad", "knn", progress=False, k=5, n_pcs=5,
                             n_fit_cells=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.mark.parametrize("genes", ["hvg:15", "chosen", ["GENE_UNUSED"]])
def test_genes_subset(sim_path, tmp_path, genes):
    ad, path = sim_path
    if isinstance(genes, list):
        genes = list(ad.var_names[[3, 1, 40]])  # any order: the output keeps the file's order
    ref_ad = screpair.impute(ad, "alra", copy=True, genes=genes, k=5)
    full = screpair.impute(ad, "alra", copy=True, k=5).layers["alra"]
    layer = ref_ad.layers["alra"]
    assert sp.isspmatrix_csr(layer) and layer.dtype == np.float32
    n = ref_ad.uns["alra"]["n_genes_imputed"]
    out = tmp_path / "out.h5ad"
    screpair.impute_file(path, out, "alra", genes=genes, chunk_rows=50, progress=False, k=5)
    back = _read(out)
    chosen = ad.var_names.isin(back.var_names)
    assert back.n_vars == n == chosen.sum() and list(back.var_names) == list(ad.var_names[chosen])
    # chosen genes: imputed (the method saw every gene: same values as without genes=)
    np.testing.assert_allclose(_dense(back.layers["alra"]), _dense(full)[:, chosen], rtol=1e-6)
    np.testing.assert_allclose(layer[:, chosen].toarray(), _dense(full)[:, chosen], rtol=1e-6)
    # the other genes of the in-memory layer: the observed counts
    np.testing.assert_array_equal(layer[:, ~chosen].toarray(), ad.X[:, ~chosen].toarray())
    if genes == "hvg:15":
        screpair.pp.highly_variable_genes(ad, n_top_genes=15)
        np.testing.assert_array_equal(chosen, ad.var["highly_variable"].to_numpy())


def test_empty_cells_and_genes_set_aside(sim, tmp_path):
    ad = sim.copy()
    x = ad.X.tolil()
    x[:70] = 0  # the first two blocks of 32 cells have no counts
    x[:, 5] = 0
    ad.X = sp.csr_matrix(x)
    ad.X.eliminate_zeros()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    with pytest.warns(UserWarning, match="70 cell"):
        ref = screpair.impute(ad, "alra", copy=True, k=5).layers["alra"]
    with pytest.warns(UserWarning, match="70 cell"):
        rec = screpair.impute_file(path, tmp_path / "o.h5ad", "alra", chunk_rows=32,
                                   progress=False, k=5)
    assert rec["n_cells_set_aside"] == 70 and rec["n_genes_set_aside"] == 1
    got = _dense(_read(tmp_path / "o.h5ad").layers["alra"])
    np.testing.assert_allclose(got, _dense(ref), rtol=1e-6, atol=0)
    assert not got[:70].any() and not got[:, 5].any()


def test_checks_before_any_work(sim_path, tmp_path, monkeypatch):
    ad, path = sim_path

    def boom(*a, **k):  # reading the counts is the first expensive step
        msg = "read the counts"
        raise AssertionError(msg)

    monkeypatch.setattr(_file, "read_all", boom)
    out = tmp_path / "o.h5ad"
    cases = [
        ({"genes": "NOPE"}, KeyError, "'NOPE' is not a gene name or a var column"),
        ({"genes": ["NOPE", ad.var_names[0]]}, KeyError, "1 of 2 gene names"),
        ({"genes": "hvg:x"}, ValueError, "hvg:N"),
        ({"genes": "group"}, KeyError, "not a gene name"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows"),
        ({"max_memory": "lots"}, ValueError, "max_memory"),
        ({"k": "a"}, TypeError, "'k'"),
        ({"key_added": "a/b"}, ValueError, "contains '/'"),
        ({"layer": "nope"}, KeyError, "layer 'nope' not found"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            screpair.impute_file(path, out, "alra", progress=False, **kwargs)
    with pytest.raises(ValueError, match="must be .h5ad or .zarr"):
        screpair.impute_file(path, tmp_path / "o.csv", "alra")
    with pytest.raises(ValueError, match="is the input file"):
        screpair.impute_file(path, path, "alra")
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists"):
        screpair.impute_file(path, out, "alra")
    assert out.read_bytes() == b"old"


def test_interrupt_leaves_old_output(sim_path, tmp_path, monkeypatch):
    ad, path = sim_path
    out = tmp_path / "o.h5ad"
    out.write_bytes(b"old")
    real = _file._zeros
    calls = []

    def append_then_stop(w, job, x, *a, **k):
        calls.append(1)
        w.matrix("X", 3)
        w.append("X", sp.csr_matrix((10, 3)))
        raise KeyboardInterrupt

    monkeypatch.setattr(_file, "_write_blocks", append_then_stop)
    with pytest.raises(KeyboardInterrupt):
        screpair.impute_file(path, out, "alra", overwrite=True, progress=False, k=5)
    assert calls and out.read_bytes() == b"old" and real is _file._zeros
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "o.h5ad"]


def test_sizes_and_budget():
    assert _file.parse_bytes("8G") == 8 * 2**30 and _file.parse_bytes("500MB") == 500 * 2**20
    assert _file.parse_bytes("1.5GiB") == int(1.5 * 2**30) and _file.parse_bytes(1024) == 1024
    for bad in ("", "-1G", "abc", 0):
        with pytest.raises(ValueError, match="max_memory"):
            _file.parse_bytes(bad)
    assert _file.memory_budget() == int(_file.DEFAULT_MEMORY_FRACTION * _file.total_memory())
    assert _file.default_chunk_rows(20_000, 2**30) == 256
    assert _file.default_chunk_rows(100, 64 * 2**30) == _file.DEFAULT_CHUNK_ROWS
    # multiples of 256 (the pair methods' prediction batch): 0.1 * 2 GiB / (2,000 * 32) = 3,355
    assert _file.default_chunk_rows(2_000, 2 * 2**30) == 3_328
    assert _file.DEFAULT_CHUNK_ROWS % 256 == 0


def test_cli_chunked(sim_path, tmp_path, capsys):
    ad, path = sim_path
    out = tmp_path / "o.h5ad"
    args = ["impute", str(path), str(out), "--method", "alra", "--config"]
    cfg = tmp_path / "c.json"
    cfg.write_text('{"k": 5}')
    assert main([*args, str(cfg), "--genes", "hvg:10", "--chunk-rows", "40", "-q"]) == 0
    back = _read(out)
    assert back.n_vars == 10 and back.uns["alra"]["chunk_rows"] == 40
    ref = screpair.impute(ad, "alra", copy=True, k=5).layers["alra"]
    chosen = ad.var_names.isin(back.var_names)
    np.testing.assert_allclose(_dense(back.layers["alra"]), _dense(ref)[:, chosen], rtol=1e-6)
    # a budget below the in-memory estimate takes the chunked path by itself
    out2 = tmp_path / "o2.zarr"
    assert main(["impute", str(path), str(out2), "--method", "alra", "--config", str(cfg),
                 "--max-memory", "1K"]) == 0
    assert "by blocks of" in capsys.readouterr().out
    np.testing.assert_allclose(_dense(_read(out2).layers["alra"]), _dense(ref), rtol=1e-6)
    capsys.readouterr()
    for extra, msg in ((["--genes", "NOPE"], "not a gene name"),
                       (["--chunk-rows", "0"], "--chunk-rows"),
                       (["--max-memory", "x"], "max_memory"),
                       (["--genes", "hvg:0"], "hvg:N")):
        assert main(["impute", str(path), str(tmp_path / "n.h5ad"), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert main(["impute", str(path), str(tmp_path / "n.csv"), "--chunk-rows", "5"]) == 2
    assert not (tmp_path / "n.h5ad").exists()
    assert main(["impute", str(path), str(out), "--chunk-rows", "50"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alra", "knn", "cnn", "saver"])
def test_demo_equals_in_memory(tmp_path, method, one_torch_thread):
    """The demo data (414 x 8,605): the chunked layers equal impute's to float32 rounding."""
    ad = screpair.datasets.demo()
    params = {"cnn": {"train": {"n_epochs": 1, "progress": False},
                      "targets": {"n_ensemble": 1}}}.get(method, {})
    ref = screpair.impute(ad, method, copy=True, **params)
    path = tmp_path / "demo.h5ad"
    screpair.write(ad, path)
    screpair.impute_file(path, tmp_path / "o.h5ad", method, chunk_rows=100, progress=False,
                         **params)
    back = _read(tmp_path / "o.h5ad")
    for key in ref.layers:
        if key in back.layers:
            np.testing.assert_allclose(_dense(back.layers[key]), _dense(ref.layers[key]),
                                       rtol=1e-6, atol=1e-7)
    assert method in back.layers


def test_blocks_bounded_by_chunk_rows(sim_path, tmp_path, monkeypatch):
    """Every read and every write holds at most chunk_rows cells (the budget check on the
    block sizes used); no layer is assembled whole."""
    from screpair import _chunks

    ad, path = sim_path
    reads, writes = [], []
    real_read, real_append = _chunks.RowSource.read, _chunks.StoreWriter.append

    def read(self, start, stop):
        reads.append(stop - start)
        return real_read(self, start, stop)

    def append(self, key, block):
        writes.append((key, block.shape[0]))
        return real_append(self, key, block)

    monkeypatch.setattr(_chunks.RowSource, "read", read)
    monkeypatch.setattr(_chunks.StoreWriter, "append", append)
    screpair.impute_file(path, tmp_path / "o.h5ad", "alra", chunk_rows=30, progress=False, k=5)
    assert reads and max(reads) <= 30 and sum(reads) == ad.n_obs
    # the input's layers are carried over by blocks too
    assert {k for k, _ in writes} == {"X", "layers/alra"} | {f"layers/{k}" for k in ad.layers}
    assert max(n for _, n in writes) <= 30
    assert sum(n for k, n in writes if k == "layers/alra") == ad.n_obs


def test_cli_in_memory_zarr_output(sim_path, tmp_path):
    ad, path = sim_path
    out = tmp_path / "o.zarr"
    assert main(["impute", str(path), str(out), "--method", "knn", "-q"]) == 0
    back = _read(out)
    assert back.shape == ad.shape and "knn" in back.layers and "chosen" in back.var
    assert main(["impute", str(path), str(out), "--method", "knn", "-q"]) == 2  # exists
    assert main(["impute", str(path), str(out), "--method", "knn", "-q", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "o.zarr"]


_BOUNDED = r'''
import resource, sys
import numpy as np
import screpair
from screpair.methods import BaseImputer, Posterior

class Scale(BaseImputer):
    """A method with no memory of its own: 1.5 x the counts, dense, by rows."""
    name = "scale"
    def __init__(self, *, rng=None):
        self.rng = rng
    def _fit(self, x, ctx):
        self.n_ = x.shape[0]
    def _posterior(self, x, ctx):
        return Posterior(mean=x.toarray() * 1.5)

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
screpair.impute_file(sys.argv[1], sys.argv[2], Scale(), chunk_rows=500, progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
'''


@pytest.mark.slow
def test_memory_bounded_by_blocks(tmp_path):
    """40,000 cells x 2,000 genes: the dense output is 320 MB in float32 (640 MB in float64),
    the counts 1.6 M values; written by blocks of 500 cells with a method that holds nothing,
    the run's peak RSS grows by far less than one dense copy of the output."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    n, g = 40_000, 2_000
    x = sp.random(n, g, density=0.02, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    path = tmp_path / "big.h5ad"
    anndata.AnnData(X=x).write_h5ad(path)
    out = subprocess.run([sys.executable, "-c", _BOUNDED, str(path), str(tmp_path / "o.h5ad")],
                         capture_output=True, text=True, check=True)
    grew_mb = float(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS grew by {grew_mb:.0f} MB")
    assert grew_mb < 100, f"peak RSS grew by {grew_mb:.0f} MB (a dense output copy: 320 MB)"
    import h5py

    with h5py.File(tmp_path / "o.h5ad", "r") as f:  # read back a few rows, not the whole layer
        np.testing.assert_allclose(f["layers/scale"][-3:], x[-3:].toarray() * 1.5, rtol=1e-6)


def test_zarr_and_text_input(sim_path, tmp_path):
    ad, path = sim_path
    ref = screpair.impute(ad, "alra", copy=True, k=5).layers["alra"]
    zin = tmp_path / "in.zarr"
    screpair.write(ad, zin)
    screpair.impute_file(zin, tmp_path / "a.h5ad", "alra", chunk_rows=70, progress=False, k=5)
    np.testing.assert_allclose(_dense(_read(tmp_path / "a.h5ad").layers["alra"]), _dense(ref),
                               rtol=1e-6)
    csv = tmp_path / "in.csv"
    screpair.write(ad, csv)  # genes x cells
    assert main(["impute", str(csv), str(tmp_path / "b.h5ad"), "--method", "alra", "--config",
                 _cfg(tmp_path), "--chunk-rows", "70", "--no-transpose", "-q"]) == 0
    np.testing.assert_allclose(_dense(_read(tmp_path / "b.h5ad").layers["alra"]), _dense(ref),
                               rtol=1e-6)


def _cfg(tmp_path):
    cfg = tmp_path / "k5.json"
    cfg.write_text('{"k": 5}')
    return str(cfg)


def test_cnn_with_dropout_layer(sim, tmp_path, one_torch_thread):
    """A layer the method reads besides the counts (cnn's dropout_layer) comes from the file."""
    ad = sim.copy()
    x = ad.X.toarray()
    ad.layers["p"] = np.where(x == 0, 0.9, 0.0)
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    params = dict(dropout_layer="p", groupby="group", module={"n_hidden": 8},
                  train={"n_epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"},
                  targets={"n_ensemble": 1})
    ref = screpair.impute(ad, "cnn", copy=True, **params).layers["cnn"]
    screpair.impute_file(path, tmp_path / "o.h5ad", "cnn", chunk_rows=64, progress=False,
                         **params)
    np.testing.assert_allclose(_dense(_read(tmp_path / "o.h5ad").layers["cnn"]), _dense(ref),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(KeyError, match="layer 'q' not found"):  # before reading the counts
        screpair.impute_file(path, tmp_path / "o2.h5ad", "cnn", **{**params, "dropout_layer": "q"})
    assert not (tmp_path / "o2.h5ad").exists()


def _rich(sim):
    """``sim`` with every AnnData slot filled: layers of several kinds, obsm, obsp, varm, varp,
    uns and raw."""
    ad = sim.copy()
    rng = np.random.default_rng(0)
    n, g = ad.shape
    ad.layers["dense"] = rng.normal(size=(n, g))
    ad.layers["ints"] = sp.csr_matrix(ad.layers["true_counts"].astype(np.int64))
    ad.obsm["X_pca"] = rng.normal(size=(n, 3)).astype(np.float32)
    ad.obsp["connectivities"] = sp.random(n, n, density=0.02, format="csr", random_state=1)
    ad.varm["PCs"] = rng.normal(size=(g, 3))
    ad.varp["corr"] = rng.normal(size=(g, g))
    ad.uns["note"] = {"a": 1, "b": np.arange(3)}
    ad.raw = ad.copy()
    return ad


def _same_value(a, b) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same_value(a[k], b[k])
    elif hasattr(a, "equals"):  # DataFrame
        assert a.equals(b)
    elif isinstance(a, (np.ndarray,)) or sp.issparse(a):
        assert _dense(a).dtype == _dense(b).dtype
        np.testing.assert_array_equal(_dense(a), _dense(b))
    else:
        assert a == b


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
@pytest.mark.parametrize("layer", [None, "counts"])
def test_output_keeps_the_rest_of_the_anndata(sim, tmp_path, fmt, layer):
    ad = _rich(sim)
    path = tmp_path / f"in.{fmt}"
    screpair.write(ad, path)
    mem = screpair.impute(_read(path), "alra", layer=layer, copy=True, k=5)
    out = tmp_path / f"out.{fmt}"
    screpair.impute_file(path, out, "alra", layer=layer, chunk_rows=37, progress=False, k=5)
    back = _read(out)
    for slot in ("layers", "obsm", "obsp", "varm", "varp"):
        assert set(getattr(back, slot)) == set(getattr(mem, slot)), slot
        for k in getattr(mem, slot):
            if slot == "layers" and k == "alra":
                continue
            _same_value(getattr(back, slot)[k], getattr(mem, slot)[k])
    np.testing.assert_allclose(_dense(back.layers["alra"]), _dense(mem.layers["alra"]),
                               rtol=1e-6, atol=0)
    assert set(back.uns) == set(mem.uns) == {"note", "simulate", "alra"}
    _same_value(back.uns["note"], mem.uns["note"])
    _same_value(back.uns["simulate"], mem.uns["simulate"])
    assert back.raw is not None and back.raw.var.equals(mem.raw.var)
    _same_value(back.raw.X, mem.raw.X)
    assert back.layers["dropout_mask"].dtype == bool and back.layers["ints"].dtype == np.int64
    np.testing.assert_array_equal(back.X.toarray(), mem.layers["counts"].toarray())


def test_output_keeps_the_rest_restricted_to_the_genes(sim, tmp_path):
    ad = _rich(sim)
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    out = tmp_path / "out.h5ad"
    screpair.impute_file(path, out, "alra", genes="hvg:15", chunk_rows=50, progress=False, k=5)
    back = _read(out)
    cols = np.flatnonzero(ad.var_names.isin(back.var_names))
    assert len(cols) == 15
    np.testing.assert_array_equal(back.layers["dense"], ad.layers["dense"][:, cols])
    np.testing.assert_array_equal(back.varm["PCs"], ad.varm["PCs"][cols])
    np.testing.assert_array_equal(back.varp["corr"], ad.varp["corr"][np.ix_(cols, cols)])
    np.testing.assert_array_equal(back.obsm["X_pca"], ad.obsm["X_pca"])
    assert back.raw.shape == ad.raw.shape  # raw keeps every gene


def test_existing_output_slot_in_the_input_refused(sim, tmp_path, monkeypatch):
    ad = sim.copy()
    ad.layers["alra"] = ad.X.copy()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    out = tmp_path / "out.h5ad"
    monkeypatch.setattr(_file, "read_all", lambda *a, **k: pytest.fail("read before the check"))
    with pytest.raises(ValueError, match=r"layers\['alra'\] already exists.*overwrite=True"):
        screpair.impute_file(path, out, "alra", progress=False, k=5)
    monkeypatch.undo()
    screpair.impute_file(path, out, "alra", overwrite=True, progress=False, k=5)
    ref = screpair.impute(ad, "alra", overwrite=True, copy=True, k=5).layers["alra"]
    np.testing.assert_allclose(_dense(_read(out).layers["alra"]), _dense(ref), rtol=1e-6)
