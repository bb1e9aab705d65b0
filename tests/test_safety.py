"""Issue 14 regressions: a user's counts are never lost, and wrong results are never reported as
success. Each test names the behaviour of the old main it guards against."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import screpair
from screpair import io as sio
from screpair.cli import main


@pytest.fixture
def h5ad_path(tmp_path, counts_adata):
    path = tmp_path / "in.h5ad"
    counts_adata.write_h5ad(path)
    return path


def _one_error_line(capsys, code, *needles) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    err = [ln for ln in lines if ln.startswith("screpair: error:")]
    assert len(err) == 1 and lines[-1] == err[0], lines  # log lines (not -q) may come before
    assert all(ln.startswith("screpair: ") for ln in lines), lines  # no traceback, no excerpt
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- data loss


def test_key_added_never_replaces_the_input_layer(counts_adata):
    """old: key_added == layer silently overwrote the raw counts."""
    ad = counts_adata.copy()
    before = ad.layers["counts"].copy()
    with pytest.raises(ValueError, match=r"overwrite the input counts in layers\['counts'\]"):
        screpair.impute(ad, "knn", layer="counts", key_added="counts")
    with pytest.raises(ValueError, match="input counts"):  # not even with overwrite
        screpair.impute(ad, "knn", layer="counts", key_added="counts", overwrite=True)
    assert (ad.layers["counts"] != before).nnz == 0 and "knn" not in ad.uns


def test_existing_layer_and_uns_need_overwrite(counts_adata):
    ad = counts_adata.copy()
    ad.layers["mine"] = ad.X.copy()
    with pytest.raises(ValueError, match=r"layers\['mine'\] already exists.*overwrite=True"):
        screpair.impute(ad, "knn", key_added="mine")
    ad.uns["pca"] = {"keep": 1}
    with pytest.raises(ValueError, match=r"uns\['pca'\] already exists"):
        screpair.impute(ad, "knn", key_added="pca")
    assert ad.uns["pca"] == {"keep": 1}
    screpair.impute(ad, "knn", key_added="mine", overwrite=True)
    assert ad.uns["mine"]["method"] == "knn"
    screpair.impute(ad, "knn")  # a new name is fine, and a second run needs overwrite
    with pytest.raises(ValueError, match="already exists"):
        screpair.impute(ad, "knn")


def test_dropout_probability_key_checks(counts_adata):
    ad = counts_adata.copy()
    with pytest.raises(ValueError, match="input counts"):
        screpair.dropout_probability(ad, layer="counts", groupby="group", key_added="counts")
    with pytest.raises(ValueError, match="'/'"):
        screpair.dropout_probability(ad, groupby="group", key_added="a/b")


def test_clustering_outputs_need_overwrite(counts_adata):
    """cluster / dropout_probability (without groupby) refuse to replace an existing
    obs[key], obsm["X_tsne"] (e.g. scanpy's 2-D t-SNE) or uns[key], before any work."""
    ad = counts_adata.copy()
    ad.obsm["X_tsne"] = np.zeros((ad.n_obs, 2))
    before = ad.obsm["X_tsne"].copy()
    with pytest.raises(ValueError, match=r"obsm\['X_tsne'\].*overwrite=True"):
        screpair.dropout.cluster(ad, rng=0)
    with pytest.raises(ValueError, match="X_tsne"):
        screpair.dropout_probability(ad, rng=0)
    assert "screpair_cluster" not in ad.obs and "dropout_prob" not in ad.layers
    np.testing.assert_array_equal(ad.obsm["X_tsne"], before)
    del ad.obsm["X_tsne"]
    ad.obs["screpair_cluster"] = "a"
    with pytest.raises(ValueError, match=r"obs\['screpair_cluster'\].*groupby='screpair_cluster'"):
        screpair.dropout.cluster(ad, rng=0)
    screpair.dropout.cluster(ad, rng=0, overwrite=True)
    assert ad.obsm["X_tsne"].shape == (ad.n_obs, 3) and ad.obs["screpair_cluster"].nunique() >= 1
    # reusing the clusters needs no overwrite of them
    screpair.dropout_probability(ad, groupby="screpair_cluster", key_added="dp")
    assert "dp" in ad.layers


def test_cli_key_added_equal_to_input_layer(tmp_path, h5ad_path, capsys):
    out = tmp_path / "o.h5ad"
    code = main(["impute", str(h5ad_path), str(out), "--layer", "counts", "--key-added", "counts"])
    _one_error_line(capsys, code, "layers['counts']")
    assert not out.exists()


def test_output_equal_to_input_is_refused(tmp_path, h5ad_path, capsys):
    """old: `impute f.h5ad f.h5ad` rewrote the input."""
    before = h5ad_path.read_bytes()
    for other in (str(h5ad_path), f"{tmp_path}/./sub/../in.h5ad"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        code = main(["impute", str(h5ad_path), other, "--method", "knn"])
        _one_error_line(capsys, code, "is the input file", "--overwrite")
    link = tmp_path / "link.h5ad"
    link.symlink_to(h5ad_path)
    code = main(["impute", str(h5ad_path), str(link), "--method", "knn"])
    _one_error_line(capsys, code, "is the input file")
    assert h5ad_path.read_bytes() == before
    # explicitly allowed: written via a temporary file, the link stays a link to the new file
    assert main(["impute", str(h5ad_path), str(link), "--method", "knn", "--overwrite", "-q"]) == 0
    assert link.is_symlink() and anndata.read_h5ad(h5ad_path).uns["knn"]["method"] == "knn"
    _no_temp_files(tmp_path)


def test_existing_output_needs_overwrite(tmp_path, h5ad_path, capsys):
    out = tmp_path / "o.h5ad"
    out.write_bytes(b"someone's file")
    code = main(["impute", str(h5ad_path), str(out), "--method", "knn"])
    _one_error_line(capsys, code, "already exists")
    assert out.read_bytes() == b"someone's file"


def test_write_through_symlink_updates_target(tmp_path, counts_adata):
    target = tmp_path / "real.h5ad"
    target.write_bytes(b"old")
    link = tmp_path / "link.h5ad"
    link.symlink_to(target)
    screpair.write(counts_adata, link)
    assert link.is_symlink() and anndata.read_h5ad(target).shape == counts_adata.shape


# ----------------------------------------------------------------------------- interrupts


def test_interrupt_during_write_aborts_it(tmp_path):
    """A KeyboardInterrupt raised inside anndata's writer can be lost ("Exception ignored" in a
    GC callback; old: exit 0 and the finished file replaced the old one). The guard records the
    signal, abandons the write when the step returns and keeps the old file."""
    target = tmp_path / "out.h5ad"
    target.write_bytes(b"old")
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the test run was started with `&`
    with pytest.raises(KeyboardInterrupt):
        with sio._atomic_target(target) as tmp:
            tmp.write_bytes(b"new")
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
            except KeyboardInterrupt:
                pass  # swallowed, as h5py does
    assert target.read_bytes() == b"old"
    _no_temp_files(tmp_path)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "screpair.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_write_leaves_old_output(tmp_path, h5ad_path, sig, code):
    """old: SIGTERM left a hidden partial .NAME.*.tmp beside the output; Ctrl-C exited 0."""
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"previous output")
    proc = _cli(["impute", str(h5ad_path), str(out), "--method", "knn", "--overwrite", "-q"],
                {"SCREPAIR_TEST_WRITE_PAUSE": "30"})
    deadline = time.time() + 60
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5ad.")]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no partial output" in lines[0], err
    assert out.read_bytes() == b"previous output"
    _no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- wrong results


def test_dropout_csv_holds_probabilities(tmp_path, h5ad_path, capsys):
    """old: `screpair dropout in.h5ad out.csv` wrote the input counts to the CSV."""
    out = tmp_path / "p.csv"
    assert main(["dropout", str(h5ad_path), str(out), "--groupby", "group", "-q"]) == 0
    back = screpair.read(out, transpose=False).X.toarray()
    counts = anndata.read_h5ad(h5ad_path).X.toarray()
    assert back.max() <= 1.0 and np.all(back[counts > 0] == 0)
    assert np.any((back > 0) & (back < 1))


def _rounded_cp10k(ad: AnnData) -> AnnData:
    x = ad.X.toarray()
    y = np.round(x / x.sum(1, keepdims=True) * 1e4)
    return AnnData(sp.csr_matrix(y), obs=ad.obs.copy(), var=ad.var.copy())


def test_rounded_normalized_data_rejected(tmp_path, capsys):
    """old: CP10k rounded to integers passed as raw counts ('OK (raw integers)')."""
    demo = screpair.datasets.demo()
    bad = _rounded_cp10k(demo[:100].copy())
    with pytest.raises(ValueError, match="does not look like raw counts.*SCREPAIR_TRUST_COUNTS"):
        screpair.impute(bad, "knn")
    path = tmp_path / "cp10k.h5ad"
    bad.write_h5ad(path)
    assert main(["info", str(path)]) == 0
    assert "NOT raw counts" in capsys.readouterr().out
    out = tmp_path / "o.h5ad"
    _one_error_line(capsys, main(["impute", str(path), str(out), "-q"]), "--trust-counts")
    assert main(["impute", str(path), str(out), "--method", "knn", "--trust-counts", "-q"]) == 0
    assert "SCREPAIR_TRUST_COUNTS" not in os.environ  # the flag does not leak


def test_raw_counts_pass_the_normalized_check():
    from screpair._utils import looks_normalized

    assert looks_normalized(screpair.datasets.demo().X) is None
    assert looks_normalized(screpair.simulate.splat(n_obs=100, n_vars=300, rng=0).X) is None
    rng = np.random.default_rng(0)
    depth = rng.lognormal(0, 0.5, (60, 1))
    log_rounded = np.round(np.log1p(rng.poisson(20 * depth, (60, 300)).astype(float)))
    assert looks_normalized(log_rounded) is not None
    log_rounded[:, :30] = 1  # ones in every cell: only the "small values only" signature is left
    assert "no value exceeds" in looks_normalized(log_rounded)
    cpm = np.round(rng.poisson(3, (60, 300)) * 1e6 / 900)
    assert "library sizes are nearly constant" in looks_normalized(cpm)


def test_counts_scaled_to_the_median_library_size_are_refused():
    """old: scanpy's normalize_total default (median target) then rounding passed as counts."""
    from screpair._utils import _skipped_count_fraction, looks_normalized

    # hand case: 30 cells with 25 ones, 10 threes and no two (the 2 skipped), 30 raw cells
    cell_scaled = [1] * 25 + [3] * 10 + [5] * 4
    cell_raw = [1] * 25 + [2] * 12 + [3] * 8 + [4] * 5
    rows = [cell_scaled] * 30 + [cell_raw] * 30
    x = sp.csr_matrix(np.array([r + [0] * (60 - len(r)) for r in rows], dtype=float))
    assert _skipped_count_fraction(x) == 0.5
    assert _skipped_count_fraction(x[30:]) == 0.0
    assert _skipped_count_fraction(x[:19]) is None  # too few cells to judge
    shallow = x.copy()
    shallow.data[:] = np.minimum(shallow.data, 1)
    assert _skipped_count_fraction(shallow) is None  # no value has 20 neighbours
    demo = sp.csr_matrix(screpair.datasets.demo().X, dtype=float)
    lib = np.asarray(demo.sum(1)).ravel()
    scaled = sp.csr_matrix(sp.diags(np.median(lib) / lib) @ demo)
    scaled.data = np.round(scaled.data)
    scaled.eliminate_zeros()
    assert looks_normalized(demo) is None
    assert "small count is skipped" in looks_normalized(scaled)


def test_benchmark_fails_when_jobs_fail_and_on_unknown_keys(tmp_path, capsys):
    """old: exit 0 when every job failed; misspelled config keys silently ignored."""
    data = tmp_path / "d.h5ad"
    screpair.simulate.splat(n_obs=40, n_vars=60, rng=0).write_h5ad(data)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"method_param": {}}))
    code = main(["benchmark", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--config", str(cfg), "--no-plots", "--no-progress"])
    _one_error_line(capsys, code, "'method_param'", "method_params, protocol_params")
    cfg.write_text(json.dumps({"method_params": {"knn": {"k": -3}}}))
    code = main(["benchmark", "--data", str(data), "--methods", "knn", "--out",
                 str(tmp_path / "r"), "--config", str(cfg), "--no-plots", "--no-progress", "-q"])
    captured = capsys.readouterr()
    assert code == 1 and "0/1 jobs ok" in captured.out and "knn" in captured.out
    assert "1 of 1 benchmark jobs failed" in captured.err


def test_unlabelled_csv_orientation_warns(tmp_path, capsys):
    path = tmp_path / "u.csv"
    rng = np.random.default_rng(0)
    x = rng.poisson(rng.gamma(1.0, 3.0, (40, 1)) * rng.lognormal(0, 0.5, 30))  # genes x cells
    path.write_text("x," + ",".join(f"q{i}y" for i in range(30)) + "\n" + "".join(
        f"r{i}x," + ",".join(map(str, row)) + "\n" for i, row in enumerate(x)))
    with pytest.warns(UserWarning, match="do not tell.*transpose="):
        screpair.read(path)
    out = tmp_path / "o.csv"
    assert main(["impute", str(path), str(out), "--method", "knn"]) == 0
    warns = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warns and all(ln.startswith("screpair: warning:") for ln in warns)
    assert not any(".py" in ln for ln in warns)  # one line, no source path or code excerpt


def test_non_canonical_csr(counts_adata):
    """old: duplicate entries of a damaged file were silently summed."""
    x = counts_adata.X
    indptr = x.indptr.copy()
    indptr[1:] += 1  # row 0 stores its first entry twice
    raw = sp.csr_matrix((np.insert(x.data, 0, 5.0), np.insert(x.indices, 0, x.indices[0]), indptr),
                        shape=x.shape)
    ad = AnnData(raw, obs=counts_adata.obs.copy(), var=counts_adata.var.copy())
    with pytest.raises(ValueError, match="stores 1 entry twice.*damaged"):
        screpair.impute(ad, "knn")
    unsorted = counts_adata.X.copy()
    s, e = unsorted.indptr[0], unsorted.indptr[1]
    unsorted.indices[s:e] = unsorted.indices[s:e][::-1].copy()
    unsorted.data[s:e] = unsorted.data[s:e][::-1].copy()
    unsorted.has_sorted_indices = False
    ref = screpair.impute(counts_adata, "knn", copy=True).layers["knn"]
    got = screpair.impute(AnnData(unsorted, obs=counts_adata.obs, var=counts_adata.var),
                          "knn", copy=True).layers["knn"]
    np.testing.assert_allclose(got, ref, rtol=1e-6)  # unsorted indices are fine


# ----------------------------------------------------------------------------- checked early


def test_checks_before_reading_the_input(tmp_path, h5ad_path, capsys):
    """Every check that needs no data runs before the input is read: the input here does not
    exist, so any error that names something else proves the order."""
    missing = str(tmp_path / "nope.h5ad")
    out = str(tmp_path / "o.h5ad")
    cases = [
        (["impute", missing, str(tmp_path / "no_dir" / "o.h5ad")], "does not exist"),
        (["impute", missing, str(tmp_path / "o.xlsx")], "unknown extension"),
        (["impute", missing, out, "--key-added", "a/b"], "'/'"),
        (["impute", missing, out, "--method", "magicx"], "available methods"),
        (["impute", missing, out, "--seed", "-1"], "--seed"),
        (["impute", missing, out, "--seed", str(2**64)], "from 0 to 4294967295"),
        (["dropout", missing, out, "--threshold", "2"], "--threshold"),
        (["degrade", missing, out, "--dropout-rate", "1.5"], "--dropout-rate must be in [0, 1]"),
    ]
    for argv, needle in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse-level errors (--seed) exit from parse_args
            code = e.code
        _one_error_line(capsys, code, needle)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"n_pcs": "abc"}))
    code = main(["impute", missing, out, "--method", "knn", "--config", str(cfg)])
    _one_error_line(capsys, code, "parameter 'n_pcs' must be an integer, got 'abc'")
    cfg.write_text(json.dumps({"k": "abc"}))  # k may be a string ('mcv'): the method checks it
    code = main(["impute", missing, out, "--method", "knn", "--config", str(cfg)])
    _one_error_line(capsys, code, "k must be an integer >= 1 or 'mcv', got 'abc'")
    cfg.write_text(json.dumps({"threshold": 7.5}))
    code = main(["impute", missing, out, "--method", "cnn", "--config", str(cfg)])
    _one_error_line(capsys, code, "threshold")
    assert not Path(out).exists()


def test_seed_range_checked_before_work(counts_adata):
    """old: a huge seed failed after the computation, with an HDF5 dtype error."""
    for bad in (2**70, -1, True):
        with pytest.raises(ValueError, match="rng must be"):
            screpair.impute(counts_adata.copy(), "alra", rng=bad)


def test_pp_layers_never_replace_counts(counts_adata):
    ad = counts_adata.copy()
    with pytest.raises(ValueError, match="input counts"):
        screpair.pp.normalize(ad, layer="counts", key_added="counts")
    screpair.pp.normalize(ad)
    with pytest.raises(ValueError, match="input counts"):  # the input layer: never
        screpair.pp.log1p(ad, layer="normalized", key_added="normalized", overwrite=True)
    screpair.pp.log1p(ad, layer="normalized")
    with pytest.raises(ValueError, match="already exists"):
        screpair.pp.log1p(ad, layer="normalized")
    screpair.pp.log1p(ad, layer="normalized", overwrite=True)


def test_simulate_lib_loc_message(tmp_path, capsys):
    code = main(["simulate", str(tmp_path / "s.h5ad"), "--lib-loc", "100", "--n-obs", "10"])
    _one_error_line(capsys, code, "lib_loc is the log of the typical library size")


def test_counts_in_raw_and_no_x(tmp_path, counts_adata, capsys):
    """`--layer raw` reads adata.raw.X (a common layout); a file without X works with --layer."""
    ad = counts_adata.copy()
    ad.raw = ad.copy()
    x = ad.X.toarray()
    ad.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    path = tmp_path / "raw.h5ad"
    ad.write_h5ad(path)
    out = tmp_path / "o.h5ad"
    _one_error_line(capsys, main(["impute", str(path), str(out), "-q"]), "layer='raw'")
    assert main(["impute", str(path), str(out), "--layer", "raw", "--method", "knn", "-q"]) == 0
    ref = screpair.impute(counts_adata, "knn", copy=True).layers["knn"]
    np.testing.assert_allclose(anndata.read_h5ad(out).layers["knn"], ref, rtol=1e-6)

    nox = AnnData(obs=counts_adata.obs.copy(), var=counts_adata.var.copy(),
                  layers={"counts": counts_adata.X.copy()})
    path2 = tmp_path / "nox.h5ad"
    nox.write_h5ad(path2)
    _one_error_line(capsys, main(["impute", str(path2), str(tmp_path / "p.h5ad"), "-q"]),
                    "adata.X is empty", "'counts'")
    assert main(["impute", str(path2), str(tmp_path / "p.h5ad"), "--layer", "counts",
                 "--method", "knn", "-q"]) == 0

    sub = counts_adata[:, :30].copy()
    sub.raw = counts_adata.copy()  # raw with more genes than X: say what to do
    with pytest.raises(ValueError, match=r"raw.to_adata\(\)"):
        screpair.impute(sub, "knn", layer="raw")


def test_cli_starts_without_heavy_imports():
    """`screpair --help` must not import anndata / scikit-learn / torch (was 2.4-3.8 s)."""
    code = ("import sys; import screpair.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('anndata', 'sklearn', 'torch', 'scipy', 'pandas') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["impute"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("screpair: error: impute:")


# ----------------------------------------------------------------------------- fuzz


def _bad_inputs(folder: Path, n: int, seed: int = 0):
    """Yield ``(path, kind)``: generated damaged, mislabelled or invalid count files."""
    rng = np.random.default_rng(seed)
    kinds = ["ok", "negative", "nan", "fraction", "empty", "zeros", "huge", "transposed",
             "wrong_ext", "truncated", "garbage", "rounded", "one_cell", "text_junk"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        n_obs, n_vars = int(rng.integers(2, 40)), int(rng.integers(2, 30))
        x = rng.poisson(rng.gamma(1.0, 3.0, n_vars), (n_obs, n_vars)).astype(float)
        x[0, 0] += 1  # not all zero
        if kind == "negative":
            x[rng.integers(n_obs), rng.integers(n_vars)] = -rng.integers(1, 5)
        elif kind == "nan":
            x[rng.integers(n_obs), rng.integers(n_vars)] = np.nan
        elif kind == "fraction":
            x = x + 0.5
        elif kind == "empty":
            x = x[:0]
        elif kind == "zeros":
            x[:] = 0
        elif kind == "huge":
            x[0, 0] = 1e30
        elif kind == "rounded":
            x = np.round(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
        elif kind == "one_cell":
            x = x[:1]
        as_csv = kind in ("transposed", "text_junk") or rng.random() < 0.4
        obs = [f"c{j}" for j in range(x.shape[0])]
        var = [f"G{j}" for j in range(x.shape[1])]
        if as_csv:
            path = folder / f"in{i}.csv"
            df = pd.DataFrame(x.T, index=var, columns=obs)
            if kind == "transposed":
                df = df.T
            df.to_csv(path, index_label="gene" if rng.random() < 0.5 else "")
            if kind == "text_junk":
                text = path.read_text()
                path.write_text(text[: int(len(text) * rng.uniform(0.3, 0.9))] + "\n,zz,\n")
        else:
            path = folder / f"in{i}.h5ad"
            ad = AnnData(sp.csr_matrix(x) if rng.random() < 0.5 else x,
                         obs=pd.DataFrame({"g": [f"t{j % 2}" for j in range(x.shape[0])]},
                                          index=obs),
                         var=pd.DataFrame(index=var))
            ad.write_h5ad(path)
            if kind == "truncated":
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * rng.uniform(0.1, 0.9))])
            elif kind == "garbage":
                path.write_bytes(rng.bytes(int(rng.integers(0, 2000))))
            elif kind == "wrong_ext":
                path = path.rename(path.with_suffix(".csv"))
        yield path, kind


def test_fuzz_bad_inputs(tmp_path, capsys):
    """A few hundred generated bad inputs through read, info, impute and dropout: either success
    with a valid output, or exit 2 with one line on stderr, no output file, no temp file, and the
    input's bytes unchanged."""
    inputs = tmp_path / "inputs"
    outputs = tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    n_ok = n_err = 0
    for i, (path, kind) in enumerate(_bad_inputs(inputs, 280)):
        before = path.read_bytes()
        try:
            screpair.read(path, transpose=False if path.suffix == ".csv" else None)
        except (ValueError, FileNotFoundError) as e:  # the API: one clear exception type
            assert "\n" not in str(e)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{kind}: read raised {type(e).__name__}: {e}")
        command = ["info", "impute", "dropout"][i % 3]
        ext = ".csv" if i % 4 == 0 else ".h5ad"
        out = outputs / f"out{i}{ext}"
        argv = [command, str(path)] + ([] if command == "info" else [str(out)])
        if command == "impute":
            argv += ["--method", ["knn", "alra"][i % 2]]
        if command == "dropout" and path.suffix == ".h5ad":
            argv += ["--groupby", "g"]
        if path.suffix == ".csv":
            argv += ["--no-transpose"]
        code = main([*argv, "-q"])
        captured = capsys.readouterr()
        assert path.read_bytes() == before, kind
        _no_temp_files(outputs)
        if code == 0:
            n_ok += 1
            if command != "info":
                back = anndata.read_h5ad(out) if ext == ".h5ad" else screpair.read(out, transpose=False)
                assert back.n_obs >= 1
                out.unlink()
            continue
        n_err += 1
        lines = captured.err.strip().splitlines()
        assert code == 2, (kind, argv, captured.err)
        assert len(lines) == 1 and lines[0].startswith("screpair: error:"), (kind, captured.err)
        assert "Traceback" not in captured.err
        assert not out.exists(), kind
    assert n_ok > 20 and n_err > 100  # both paths exercised


def test_ctrl_c_during_model_save_keeps_old_model(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from screpair.methods import _torch

    path = tmp_path / "model"
    _torch.save_model(path, config={"a": 1}, state_dict={"w": torch.zeros(2)}, var_names=["g"])
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_save = torch.save

    def save_then_ctrl_c(obj, f):
        real_save(obj, f)
        os.kill(os.getpid(), signal.SIGINT)  # recorded by the guard, not raised here

    monkeypatch.setattr(torch, "save", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _torch.save_model(path, config={"a": 2}, state_dict={"w": torch.ones(2)}, var_names=["g"])
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left
