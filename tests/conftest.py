"""Shared fixtures: small in-memory simulations with ground truth (no files, no network)."""

from __future__ import annotations

import dataclasses
import importlib.util
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires(*modules): skip unless every module (an optional extra) can be imported",
    )


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package of a dotted name is missing
        return True


def pytest_collection_modifyitems(config, items):
    """Skip ``slow`` tests unless ``--runslow``; skip ``requires(...)`` tests whose optional
    packages are not installed (scanpy's ``needs`` marks, instead of ``importorskip`` in bodies)."""
    runslow = config.getoption("--runslow")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords and not runslow:
            item.add_marker(skip_slow)
        for mark in item.iter_markers("requires"):
            missing = [m for m in mark.args if _missing(m)]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}"))


@pytest.fixture
def sparse_counts():
    """``f(rng, n, g, density=0.2) -> csr_matrix``: ``n x g`` random counts (1-19 at a fraction
    ``density`` of the entries), every cell with at least one count, indices sorted."""

    def make(rng, n, g, density=0.2):
        x = sp.random(n, g, density=density, format="lil", random_state=rng,
                      data_rvs=lambda m: rng.integers(1, 20, m)).astype(np.float64)
        x[np.arange(n), rng.integers(0, g, n)] = 1.0
        x = sp.csr_matrix(x)
        x.sort_indices()
        return x

    return make


@pytest.fixture
def posterior_rows():
    """``f(est, x, rows) -> Posterior``: a fitted estimator's posterior of the row block ``rows``
    (a slice) of the matrix ``x``, as the chunked pipeline asks for it (``DataContext.rows``)."""
    from screpair.methods._base import data_context

    def run(est, x, rows: slice):
        ctx = dataclasses.replace(data_context(x, x), rows=rows)
        return est._posterior_validated(x[rows], ctx)

    return run


@pytest.fixture
def posterior_blocks(posterior_rows):
    """``f(est, x, size) -> list[Posterior]``: the posterior of ``x`` by blocks of ``size`` rows."""

    def run(est, x, size: int):
        n = x.shape[0]
        return [posterior_rows(est, x, slice(i, min(i + size, n))) for i in range(0, n, size)]

    return run


@pytest.fixture
def traced_peak():
    """``f(fn) -> (fn(), peak bytes)``: the peak of Python-tracked allocations (tracemalloc:
    numpy and scipy buffers included) while ``fn`` runs."""

    def run(fn):
        tracemalloc.start()
        try:
            out = fn()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return run


@pytest.fixture(params=["dense", "csr"])
def array_type(request):
    """Parametrise a test over dense and CSR inputs (scanpy's ARRAY_TYPES idea)."""
    return np.asarray if request.param == "dense" else sp.csr_matrix


@pytest.fixture
def counts_adata():
    """A small Poisson-gamma count matrix with two cell groups (100 cells x 40 genes)."""
    rng = np.random.default_rng(0)
    n_obs, n_vars = 100, 40
    group = np.repeat([0, 1], n_obs // 2)
    base = rng.gamma(2.0, 2.0, size=n_vars)
    fold = np.where(rng.random(n_vars) < 0.3, 4.0, 1.0)
    mean = np.where(group[:, None] == 1, base * fold, base) * rng.lognormal(0, 0.3, (n_obs, 1))
    x = rng.poisson(rng.gamma(5.0, mean / 5.0)).astype(np.float32)
    ad = AnnData(
        X=sp.csr_matrix(x),
        obs={"group": [f"g{g}" for g in group]},
        var={"gene_ids": [f"ENSG{i:05d}" for i in range(n_vars)]},
    )
    ad.obs_names = [f"cell{i}" for i in range(n_obs)]
    ad.var_names = [f"GENE{i}" for i in range(n_vars)]
    ad.layers["counts"] = ad.X.copy()
    return ad


@pytest.fixture(scope="session")
def sim():
    """Splat simulation with ground truth (issue 3), shared by the whole session: do not modify it,
    take ``sim.copy()`` first.

    200 cells x 100 genes in three groups (``obs['group']``), about 60% zeros, about 40% of the
    non-zero true counts dropped. Layers ``counts`` (observed, also ``X``), ``true_counts`` and
    ``dropout_mask``; genes or cells left with no observed counts are removed, so no input
    warning is raised (≈ 99 genes remain).
    """
    from screpair import simulate

    ad = simulate.splat(
        n_obs=200,
        n_vars=100,
        group_prob=(0.3, 0.3, 0.4),
        de_prob=0.3,
        de_fac_loc=0.5,
        lib_loc=7.0,
        dropout_mid=1.0,
        rng=0,
    )
    x = ad.layers["counts"]
    keep_genes = np.bincount(x.indices, minlength=ad.n_vars) > 0
    keep_cells = np.diff(x.indptr) > 0
    return ad[keep_cells, keep_genes].copy()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks run faster on one torch thread, and much faster on a loaded shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ref_and_degraded():
    """Clean Splat counts (150 x 60, ``layers['true_counts']``) and their moderately degraded copy
    (``layers['counts']``), for the profile-repair methods. Shared: do not modify."""
    from screpair import simulate

    ref = simulate.splat(n_obs=150, n_vars=60, lib_loc=8, dropout_type="none", rng=0)
    deg = simulate.degrade(
        ref, layer="true_counts", bias_3p=0.5, dropout_rate=0.3, noise_sd=0.2, rng=1
    )
    return ref, deg
