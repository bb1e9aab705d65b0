"""dae / vae / diffusion on large data (issue 16): training on at most ``n_train_cells`` cells
and the posterior by blocks of rows, equal bit for bit to the in-memory output for any block
size and order (the repair noise laid out by fixed batches and seed blocks of cells)."""

from __future__ import annotations

import json
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import screpair
from screpair import pp
from screpair._utils import torch_seed
from screpair.methods import _pairs
from screpair.methods._pairs import PairImputer, _log_profiles, _Noise
from screpair.methods.autoencoder import DAEImputer, VAEImputer
from screpair.methods.diffusion import DiffusionImputer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = {"n_epochs": 1, "batch_size": 64, "patience": 0, "progress": False, "device": "cpu"}
PAIRS = {"n_top_genes": 60, "n_views": 2}
AE = {"hidden": 16, "latent": 4}
DIFF = {"patch_size": 10, "d_model": 16, "n_layers": 1, "n_heads": 2, "dim_feedforward": 16,
        "cond_hidden": 16, "cond_dim": 8}
#: per method: tiny settings (a random repair for diffusion: eta > 0, several samples)
PARAMS = {
    "dae": {"module": AE},
    "vae": {"module": AE},
    "diffusion": {"module": DIFF, "n_samples": 2, "n_inference_steps": 3, "eta": 0.5},
}
CLASSES = {"dae": DAEImputer, "vae": VAEImputer, "diffusion": DiffusionImputer}


def _params(method, **kw):
    return {"train": TRAIN, "pairs": PAIRS, **PARAMS[method], **kw}


def _est(method, **kw):
    return CLASSES[method](**{"rng": 0, **_params(method, **kw)})


@pytest.fixture
def small_blocks(monkeypatch):
    """Prediction batches of 32 cells and seed blocks of 64: the 200 cells of ``sim`` span four
    seed blocks, and blocks of rows that are no multiple of 32 cut batches."""
    monkeypatch.setattr(PairImputer, "_predict_batch", 32)
    monkeypatch.setattr(_pairs, "SEED_BLOCK", 64)


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(path)


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_impute_file_by_blocks_equals_impute(sim, tmp_path, small_blocks, method, caplog):
    """impute_file with blocks of 50 and of 64 rows writes impute's layers exactly (both store
    float32 of the same float32 values; every cell meets the same arithmetic); blocks of 50
    split the batches of 32 cells, which the log says, with the work it costs."""
    ad = sim.copy()
    path = tmp_path / "in.h5ad"
    screpair.write(ad, path)
    ref = screpair.impute(ad, method, copy=True, **_params(method))
    keys = [method] + ([f"{method}_var"] if method == "diffusion" else [])
    assert set(keys) <= set(ref.layers)
    for rows in (50, 64):
        out = tmp_path / f"o{rows}.h5ad"
        caplog.clear()
        with caplog.at_level("WARNING", logger="screpair"):
            rec = screpair.impute_file(path, out, method, chunk_rows=rows, progress=False,
                                       **_params(method))
        split = [r.getMessage() for r in caplog.records if "prediction batch" in r.getMessage()]
        assert split == ([] if rows == 64 else [
            f"chunk_rows=50 is not a multiple of {method}'s prediction batch of 32 cells: a "
            "batch split by two blocks is computed whole by both (up to 1.92x the prediction "
            "work); a multiple of 32 avoids it"])
        assert rec["posterior_by_rows"] and rec["chunk_rows"] == rows
        back = _read(out)
        for key in keys:
            np.testing.assert_array_equal(back.layers[key], ref.layers[key])
    assert np.isfinite(ref.layers[method]).all() and (ref.layers[method] >= 0).all()


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_posterior_blocks_any_size_and_order(sim, small_blocks, posterior_rows, method):
    """The posterior of row blocks of 1, 45 and 200 rows, asked for in any order (here
    reversed: every block replays its seed block's earlier noise), stacks to the whole."""
    est = _est(method).fit(sim, layer="counts")
    x = sp.csr_matrix(sim.layers["counts"], dtype=np.float64)
    whole = est.posterior(x)
    n = x.shape[0]
    for size in (45, 1, n):
        mean = np.full(whole.mean.shape, np.nan, dtype=np.float32)
        var = np.full(whole.mean.shape, np.nan, dtype=np.float32)
        for start in reversed(range(0, n, size)):
            rows = slice(start, min(start + size, n))
            part = posterior_rows(est, x, rows)
            mean[rows] = part.mean
            if part.var is not None:
                var[rows] = part.var
        np.testing.assert_array_equal(mean, whole.mean)
        if whole.var is not None:
            np.testing.assert_array_equal(var, whole.var)
    again = est.posterior(x)  # after the block calls (which leave a noise cursor): unchanged
    np.testing.assert_array_equal(again.mean, whole.mean)


def test_noise_layout_first_block_is_the_old_stream(small_blocks):
    """Seed block 0 draws one generator seeded as before seed blocks existed
    (``torch_seed(default_rng(posterior_seed_))``), batch after batch; block 1 has its own
    generator; a batch's draws do not depend on which batches were asked for before."""
    seed, shape = 7, (2, 3, 5)  # 2 draws per batch, 3 samples, 5 genes
    old = torch.Generator().manual_seed(torch_seed(np.random.default_rng(seed)))
    want = [[torch.randn((3 * 32, 5), generator=old) for _ in range(2)] for _ in range(2)]
    noise = _Noise(seed, torch.device("cpu"), shape, 32)
    got = [noise.draws(0, 32), noise.draws(32, 64)]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert torch.equal(a, b)
    block1 = noise.draws(64, 96)
    cont = torch.randn((3 * 32, 5), generator=old)  # what one stream would draw next
    assert not torch.equal(block1[0], cont)
    fresh = _Noise(seed, torch.device("cpu"), shape, 32)
    late = fresh.draws(96, 100)  # a clipped last batch, without asking for 64:96 first
    ref = _Noise(seed, torch.device("cpu"), shape, 32)
    ref.draws(64, 96)
    for a, b in zip(late, ref.draws(96, 100), strict=True):
        assert a.shape == (3 * 4, 5) and torch.equal(a, b)
    resumed = _Noise(seed, torch.device("cpu"), shape, 32, marks=fresh.marks)
    for a, b in zip(resumed.draws(96, 100), late, strict=True):  # from the marks: no replay
        assert torch.equal(a, b)
    assert _Noise(seed, torch.device("cpu"), (0, 3, 5), 32).draws(0, 32) == []


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_n_train_cells_sample(sim, method):
    """Above n_train_cells the fit is the fit on a sample drawn first from rng (the same
    numbers as fitting that sample with the rest of the generator); HVGs and standardization
    come from it; at or above the number of cells every cell is used, as with None."""
    x = sp.csr_matrix(sim.layers["counts"], dtype=np.float64)
    n = x.shape[0]
    est = _est(method, n_train_cells=120, rng=np.random.default_rng(3)).fit(x)
    cells = est.train_cells_
    assert cells.size == 120 and np.all(np.diff(cells) > 0) and cells.max() < n
    rng = np.random.default_rng(3)
    want = np.sort(rng.choice(n, size=120, replace=False))
    np.testing.assert_array_equal(cells, want)
    with warnings.catch_warnings():  # genes without counts in the sample: set aside there
        warnings.simplefilter("ignore", UserWarning)
        direct = _est(method, n_train_cells=None, rng=rng).fit(x[want])
    assert direct.train_cells_ is None
    np.testing.assert_array_equal(est.hvg_, direct.hvg_)
    np.testing.assert_array_equal(est.gene_mean_, direct.gene_mean_)
    np.testing.assert_array_equal(est.history_["train_loss"], direct.history_["train_loss"])
    np.testing.assert_array_equal(est.transform(x), direct.transform(x))
    # HVGs and gene means are the training cells' (60 of the 99 genes)
    hvg = pp.hvg_dispersion(x[cells], 60)["highly_variable"].to_numpy()
    np.testing.assert_array_equal(est.hvg_, hvg)
    clean = _log_profiles(x[cells], np.flatnonzero(hvg))
    np.testing.assert_allclose(est.gene_mean_, clean.mean(0), rtol=1e-6, atol=0)
    # reproducible: the same rng, the same sample and output; another rng, another sample
    again = _est(method, n_train_cells=120, rng=np.random.default_rng(3)).fit(x)
    np.testing.assert_array_equal(again.train_cells_, cells)
    np.testing.assert_array_equal(again.transform(x), est.transform(x))
    other = _est(method, n_train_cells=120, rng=np.random.default_rng(4)).fit(x)
    assert not np.array_equal(other.train_cells_, cells)
    # a cap at or above the cells: every cell, exactly as without a cap
    full = _est(method, n_train_cells=n).fit(x)
    uncapped = _est(method, n_train_cells=None).fit(x)
    assert full.train_cells_ is None
    np.testing.assert_array_equal(full.transform(x), uncapped.transform(x))


@pytest.mark.parametrize("bad", [5, True, 1.5, "100"])
def test_n_train_cells_checked(sim, bad):
    with pytest.raises(ValueError, match="n_train_cells must be None or an integer >= 10"):
        _est("dae", n_train_cells=bad).fit(sim, layer="counts")


@pytest.mark.parametrize("method", sorted(CLASSES))
def test_save_load_same_output_by_rows(sim, tmp_path, small_blocks, posterior_blocks, method):
    """A model fitted on a sample, saved and loaded: the same output in one piece and by
    blocks; a config.json saved before n_train_cells existed still loads."""
    x = sp.csr_matrix(sim.layers["counts"], dtype=np.float64)
    est = _est(method, n_train_cells=150).fit(x)
    want = est.transform(x)
    est.save(tmp_path / "m")
    loaded = CLASSES[method].load(tmp_path / "m")
    assert loaded.n_train_cells == 150 and loaded.posterior_by_rows
    np.testing.assert_array_equal(loaded.transform(x), want)
    parts = posterior_blocks(loaded, x, 70)
    np.testing.assert_array_equal(np.vstack([p.mean for p in parts]), want)
    cfg = tmp_path / "m" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["config"].pop("n_train_cells")
    cfg.write_text(json.dumps(meta))
    old = CLASSES[method].load(tmp_path / "m")
    assert old.n_train_cells == _pairs.TRAIN_CELLS
    np.testing.assert_array_equal(old.transform(x), want)


def test_noise_marks_of_other_data(sim, monkeypatch, posterior_rows):
    """Where a call on other data stopped (a last batch clipped at its 50 cells) never shifts
    the noise of a later call: the same output as a fresh copy of the model."""
    monkeypatch.setattr(PairImputer, "_predict_batch", 32)
    monkeypatch.setattr(_pairs, "SEED_BLOCK", 256)
    x = sp.csr_matrix(sim.layers["counts"], dtype=np.float64)
    est = _est("diffusion").fit(x)
    want = est.posterior(x).mean[96:]
    est.posterior(x[:50])  # leaves marks at cells 32 and 50 (clipped)
    np.testing.assert_array_equal(posterior_rows(est, x, slice(96, x.shape[0])).mean, want)
