"""The `impute` wrapper: AnnData contract, layer isolation, copy semantics, set-aside cells/genes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import screpair
from screpair.methods import BaseImputer, Posterior


def _snapshot(ad: AnnData) -> dict:
    return {
        "X": ad.X.copy(),
        "layers": {k: v.copy() for k, v in ad.layers.items()},
        "obs": ad.obs.copy(),
        "var": ad.var.copy(),
        "uns": set(ad.uns),
    }


def _same(a, b) -> bool:
    if sp.issparse(a):
        return sp.issparse(b) and (a != b).nnz == 0
    return np.array_equal(a, b)


@pytest.mark.parametrize("method", ["knn", "alra"])
@pytest.mark.parametrize("layer", [None, "counts"])
def test_only_target_layer_changes(counts_adata, method, layer):
    ad = counts_adata
    before = _snapshot(ad)
    assert screpair.impute(ad, method, layer=layer, key_added="imp") is None
    assert _same(ad.X, before["X"])
    assert set(ad.layers) == set(before["layers"]) | {"imp"}
    for k, v in before["layers"].items():
        assert _same(ad.layers[k], v)
    assert ad.obs.equals(before["obs"]) and ad.var.equals(before["var"])
    assert set(ad.uns) == before["uns"] | {"imp"}
    out = ad.layers["imp"]
    assert out.shape == ad.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0
    meta = ad.uns["imp"]
    assert meta["method"] == method and meta["version"] == screpair.__version__
    assert meta["layer"] == (layer or "None")


def test_copy_semantics(counts_adata):
    before = _snapshot(counts_adata)
    out = screpair.impute(counts_adata, "knn", copy=True)
    assert isinstance(out, AnnData) and "knn" in out.layers
    assert "knn" not in counts_adata.layers and set(counts_adata.uns) == before["uns"]


def test_view_rejected_unless_copy(counts_adata):
    view = counts_adata[:50]
    with pytest.raises(ValueError, match="view"):
        screpair.impute(view, "knn")
    assert screpair.impute(view, "knn", copy=True).n_obs == 50


def test_unknown_method_lists_available(counts_adata):
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available methods: .*alra.*knn"):
        screpair.impute(counts_adata, "nope")


def test_unknown_param(counts_adata):
    with pytest.raises(TypeError, match="unknown parameter"):
        screpair.impute(counts_adata, "knn", kk=3)


def test_not_anndata():
    with pytest.raises(TypeError, match="AnnData"):
        screpair.impute(np.ones((3, 3)), "knn")


class _Double(BaseImputer):
    """Test double: returns counts + 1 and records what it was given."""

    name = "double"

    def fit(self, data, *, layer=None):
        self.seen_shape_ = data.shape
        self.var_names_ = list(data.var_names)
        return self

    def posterior(self, data, *, layer=None):
        x = data.X.toarray() if sp.issparse(data.X) else data.X
        return Posterior(mean=x + 1, var=np.full(x.shape, 2.0), dropout_prob=np.zeros(x.shape))


def test_empty_cells_and_genes_set_aside(counts_adata):
    ad = counts_adata.copy()
    x = ad.X.toarray()
    x[3] = 0
    x[:, 7] = 0
    ad.X = sp.csr_matrix(x)
    est = _Double()
    with pytest.warns(UserWarning, match="1 cell.*1 gene"):
        screpair.impute(ad, est, key_added="d")
    assert est.seen_shape_ == (ad.n_obs - 1, ad.n_vars - 1)
    assert "GENE7" not in est.var_names_
    out = ad.layers["d"]
    np.testing.assert_array_equal(out[3], 0)
    np.testing.assert_array_equal(out[:, 7], 0)
    keep_r, keep_c = np.arange(ad.n_obs) != 3, np.arange(ad.n_vars) != 7
    np.testing.assert_allclose(out[np.ix_(keep_r, keep_c)], x[np.ix_(keep_r, keep_c)] + 1)
    np.testing.assert_allclose(ad.layers["d_var"][0, 0], 2.0)
    assert "dropout_prob" in ad.layers
    assert ad.uns["d"]["n_cells_set_aside"] == 1 and ad.uns["d"]["n_genes_set_aside"] == 1


def test_result_written_to_h5ad(tmp_path, counts_adata):
    import anndata

    screpair.impute(counts_adata, "alra", rng=1)
    path = tmp_path / "out.h5ad"
    counts_adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    np.testing.assert_array_equal(back.layers["alra"], counts_adata.layers["alra"])
    assert back.uns["alra"]["params"]["k"] == "None"


def test_seeded_runs_reproducible(counts_adata):
    a = screpair.impute(counts_adata, "alra", rng=3, copy=True).layers["alra"]
    b = screpair.impute(counts_adata, "alra", rng=3, copy=True).layers["alra"]
    np.testing.assert_array_equal(a, b)


def test_import_is_light():
    import subprocess
    import sys

    code = "import screpair, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
