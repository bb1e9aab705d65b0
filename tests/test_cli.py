"""CLI through `main([...])`: results, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import screpair
from screpair.cli import main


@pytest.fixture
def h5ad_path(tmp_path, counts_adata):
    path = tmp_path / "in.h5ad"
    counts_adata.write_h5ad(path)
    return path


def test_impute_h5ad(tmp_path, h5ad_path, capsys):
    out = tmp_path / "out.h5ad"
    assert main(["impute", str(h5ad_path), str(out), "--method", "knn", "--key-added", "sm", "-q"]) == 0
    ad = anndata.read_h5ad(out)
    assert ad.layers["sm"].shape == ad.shape and ad.layers["sm"].min() >= 0
    assert "counts" in ad.layers and ad.uns["sm"]["method"] == "knn"
    assert "imputed with 'knn'" in capsys.readouterr().out


def test_impute_csv_round_trip(tmp_path, h5ad_path):
    """genes x cells CSV in, imputed CSV out, read back with the same names and shape."""
    src = anndata.read_h5ad(h5ad_path)
    csv_in = tmp_path / "in.csv"
    screpair.write(src, csv_in)
    csv_out = tmp_path / "out.csv"
    assert main(["impute", str(csv_in), str(csv_out), "--method", "alra", "-q"]) == 0
    back = screpair.read(csv_out, transpose=False)
    assert back.shape == src.shape
    assert list(back.obs_names) == list(src.obs_names)
    assert list(back.var_names) == list(src.var_names)
    ref = screpair.impute(src, "alra", copy=True).layers["alra"]
    np.testing.assert_allclose(back.X.toarray(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_quiet_silences_the_methods_own_bars(tmp_path, h5ad_path, capsys, chunked):
    """``-q`` (``impute_file(progress=False)`` by name too): no bar on stderr, SAVER's gene
    batches and the training epochs included; without it SAVER's bar is there. A training
    setting from the config file is kept (the epochs), only ``progress`` goes."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"train": {"n_epochs": 1}}))
    extra = ["--chunk-rows", "16"] if chunked else []
    for method, opts in (("saver", []), ("dae", ["--config", str(cfg)])):
        out = tmp_path / f"{method}.h5ad"
        assert main(["impute", str(h5ad_path), str(out), "--method", method, "-q", *opts,
                     *extra]) == 0
        assert capsys.readouterr().err == "", method
    assert anndata.read_h5ad(out).uns["dae"]["params"]["train"]["n_epochs"] == 1
    assert main(["impute", str(h5ad_path), str(tmp_path / "v.h5ad"), "--method", "saver",
                 *extra]) == 0
    assert "SAVER regression" in capsys.readouterr().err
    src = tmp_path / "in.h5ad"
    rec = screpair.impute_file(src, tmp_path / "f.h5ad", "saver", chunk_rows=16, progress=False)
    err = capsys.readouterr().err  # the log lines of the last main() call's level, no bar
    assert rec["method"] == "saver" and "SAVER regression" not in err and "it/s]" not in err


def test_config_file_and_seed(tmp_path, h5ad_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"k": 5, "n_pcs": 3}))
    out = tmp_path / "o.h5ad"
    assert main(["impute", str(h5ad_path), str(out), "--method", "knn", "--config", str(cfg), "-q"]) == 0
    assert anndata.read_h5ad(out).uns["knn"]["params"]["k"] == 5
    toml = tmp_path / "cfg.toml"
    toml.write_text("k = 4\n")
    assert main(["impute", str(h5ad_path), str(out), "--method", "knn", "--config", str(toml),
                 "--overwrite", "-q"]) == 0
    assert anndata.read_h5ad(out).uns["knn"]["params"]["k"] == 4


def _one_line_error(capsys, code, *needles):
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    err = [ln for ln in lines if ln.startswith("screpair: error:")]
    assert len(err) == 1 and lines[-1] == err[0], captured.err  # log lines may come before
    assert "Traceback" not in captured.err
    for n in needles:
        assert n in err[0]


def test_error_missing_file(tmp_path, capsys):
    code = main(["impute", str(tmp_path / "nope.h5ad"), str(tmp_path / "o.h5ad")])
    _one_line_error(capsys, code, "nope.h5ad")


def test_error_log_normalized(tmp_path, counts_adata, capsys):
    ad = counts_adata.copy()
    x = ad.X.toarray()
    ad.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    del ad.layers["counts"]
    path = tmp_path / "lognorm.h5ad"
    ad.write_h5ad(path)
    out = tmp_path / "o.h5ad"
    code = main(["impute", str(path), str(out)])
    _one_line_error(capsys, code, "normalized or log-transformed")
    assert not out.exists()


def test_error_text_cell(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("gene,c1,c2\nGAPDH,1,2\nACTB,3,oops\n")
    code = main(["impute", str(path), str(tmp_path / "o.h5ad")])
    _one_line_error(capsys, code, "oops")


def test_error_unknown_method_and_bad_config(tmp_path, h5ad_path, capsys):
    code = main(["impute", str(h5ad_path), str(tmp_path / "o.h5ad"), "--method", "magicx"])
    _one_line_error(capsys, code, "available methods")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code = main(["impute", str(h5ad_path), str(tmp_path / "o.h5ad"), "--config", str(bad)])
    _one_line_error(capsys, code, "could not parse")


def test_debug_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["impute", str(tmp_path / "nope.h5ad"), str(tmp_path / "o.h5ad"), "--debug"])


def test_existing_output_untouched_on_error(tmp_path, h5ad_path, capsys):
    out = tmp_path / "o.h5ad"
    out.write_bytes(b"previous")
    code = main(["impute", str(h5ad_path), str(out), "--method", "knn", "--config", str(tmp_path / "missing.json")])
    _one_line_error(capsys, code, "already exists", "--overwrite")
    code = main(["impute", str(h5ad_path), str(out), "--method", "knn", "--overwrite",
                 "--config", str(tmp_path / "missing.json")])
    _one_line_error(capsys, code, "config file not found")
    assert out.read_bytes() == b"previous"


def test_info(h5ad_path, capsys):
    assert main(["info", str(h5ad_path)]) == 0
    out = capsys.readouterr().out
    assert "100 cells x 40 genes" in out and "counts: OK" in out and "obs['group']" in out


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo.h5ad"
    assert main(["demo", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "demo data" in text and "silhouette" in text
    ad = anndata.read_h5ad(out)
    assert ad.layers["alra"].shape == ad.shape


def test_demo_dataset():
    ad = screpair.datasets.demo()
    assert ad.shape == (414, 8605) and sp.issparse(ad.X)
    assert ad.obs["cell_type"].nunique() == 9
    x = ad.X.data
    assert np.all(x == np.round(x)) and x.min() > 0


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and screpair.__version__ in capsys.readouterr().out
