"""The `impute` wrapper: AnnData contract, layer isolation, copy semantics, set-aside cells/genes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData
from sklearn.exceptions import NotFittedError

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
    values = out.toarray() if sp.issparse(out) else out
    assert np.all(np.isfinite(values)) and values.min() >= 0
    meta = ad.uns["imp"]
    assert meta["method"] == method and meta["version"] == screpair.__version__
    assert meta["layer"] == (layer or "None")


@pytest.mark.parametrize("layer", [None, "counts"])
def test_sparse_output_changes_only_its_layer(tmp_path, layer):
    """alra's thresholded output of sparse counts is a CSR layer (float32, the values of the
    dense output); the input and every other slot stay as they were, and h5ad keeps it."""
    import anndata

    rng = np.random.default_rng(0)
    group, own = np.arange(150) % 3, np.arange(60) % 3
    lam = np.where(group[:, None] == own[None, :], 4.0, 0.0) * rng.lognormal(0, 0.3, (150, 1))
    x = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    ad = AnnData(X=x, layers={"counts": x.copy()})
    before = _snapshot(ad)
    screpair.impute(ad, "alra", layer=layer, key_added="imp")
    assert _same(ad.X, before["X"]) and set(ad.layers) == {"counts", "imp"}
    assert _same(ad.layers["counts"], before["layers"]["counts"])
    out = ad.layers["imp"]
    assert sp.isspmatrix_csr(out) and out.dtype == np.float32 and out.shape == ad.shape
    assert 0.2 < out.nnz / (150 * 60) < 0.5 and np.all(np.isfinite(out.data))
    assert out.data.min() > 0 and not np.shares_memory(out.data, ad.X.data)
    dense = screpair.impute(AnnData(X=x.toarray()), "alra", copy=True).layers["alra"]
    np.testing.assert_allclose(out.toarray(), dense, rtol=1e-5, atol=1e-6)
    ad.write_h5ad(tmp_path / "out.h5ad")
    assert _same(anndata.read_h5ad(tmp_path / "out.h5ad").layers["imp"], out)


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


# ---- the BaseImputer template: counts validated once -------------------------------------------
def _count_get_counts(monkeypatch) -> list[int]:
    """Replace ``get_counts`` in every loaded screpair module with a counting wrapper."""
    import sys

    from screpair import _utils

    orig, calls = _utils.get_counts, [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return orig(*args, **kwargs)

    for name, mod in list(sys.modules.items()):
        if name.startswith("screpair") and getattr(mod, "get_counts", None) is orig:
            monkeypatch.setattr(mod, "get_counts", counting)
    return calls


@pytest.mark.parametrize("method", ["alra", "knn", "saver", "raw", "gene_mean", "cqn"])
def test_impute_validates_counts_once(counts_adata, monkeypatch, method):
    """``impute`` hands its validated counts to the estimator (before the template: 3 calls)."""
    import screpair.methods.saver  # noqa: F401 - loaded before patching
    from screpair.evaluate._peers import PEERS

    est = PEERS[method]() if method in PEERS else method
    calls = _count_get_counts(monkeypatch)
    screpair.impute(counts_adata, est, key_added="imp")
    assert calls[0] == 1
    assert "imp" in counts_adata.layers


class _Template(BaseImputer):
    """Test double on the template: records the validated matrix and its context."""

    name = "template"
    transductive = True

    def __init__(self, *, shift: float = 1.0):
        self.shift = shift

    def _check_params(self):
        if self.shift < 0:
            msg = "shift must be >= 0"
            raise ValueError(msg)

    def _fit(self, x, ctx):
        self.fit_x_, self.fit_ctx_ = x, ctx

    def _posterior(self, x, ctx):
        self.post_ctx_ = ctx
        dense = x.toarray() if sp.issparse(x) else x
        return Posterior(mean=dense + self.shift)


def test_template_context_after_setting_aside(counts_adata):
    ad = counts_adata.copy()
    ad.var["gene_length"] = np.arange(ad.n_vars, dtype=float) + 100
    x = ad.X.toarray()
    x[3] = 0
    x[:, 7] = 0
    ad.X = sp.csr_matrix(x)
    est = _Template()
    with pytest.warns(UserWarning, match="1 cell.*1 gene"):
        screpair.impute(ad, est, key_added="t")
    ctx = est.fit_ctx_
    assert est.post_ctx_ is ctx and est.fit_x_.shape == (ad.n_obs - 1, ad.n_vars - 1)
    assert sp.isspmatrix_csr(est.fit_x_) and est.fit_x_.has_canonical_format
    assert est.fit_x_.dtype == np.float64
    assert ctx.n_obs == ad.n_obs - 1 and ctx.rows == slice(0, ad.n_obs - 1) and ctx.named
    assert "GENE7" not in ctx.var_names and list(ctx.var.index) == list(ctx.var_names)
    np.testing.assert_array_equal(ctx.var["gene_length"], np.delete(ad.var["gene_length"], 7))
    assert len(ctx.obs) == ad.n_obs - 1 and "cell3" not in ctx.obs.index
    assert list(est.var_names_) == list(ctx.var_names) and est.n_obs_ == ad.n_obs - 1
    keep_r, keep_c = np.arange(ad.n_obs) != 3, np.arange(ad.n_vars) != 7
    np.testing.assert_allclose(ad.layers["t"][np.ix_(keep_r, keep_c)],
                               x[np.ix_(keep_r, keep_c)] + 1, rtol=1e-6)


def test_template_public_methods_validate(counts_adata, array_type):
    ad = counts_adata
    est = _Template()
    with pytest.raises(NotFittedError):
        est.posterior(ad)
    with pytest.raises(ValueError, match="shift"):
        _Template(shift=-1).fit(ad)
    bad = ad.copy()
    bad.X = bad.X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        est.fit(bad)
    est.fit(ad, layer="counts")
    assert list(est.var_names_) == list(ad.var_names) and set(est.fit_ctx_.layers) == {"counts"}
    other = ad.copy()
    other.var_names = [f"OTHER{i}" for i in range(ad.n_vars)]
    with pytest.raises(ValueError, match="genes differ"):
        est.posterior(other)
    with pytest.raises(ValueError, match="transductive"):
        est.posterior(ad[:10].copy())
    # bare matrices: made-up gene names, checked by number only
    m = array_type(ad.X.toarray())
    out = est.fit_transform(m)
    np.testing.assert_allclose(out, ad.X.toarray() + 1, rtol=1e-12)
    assert not est.fit_ctx_.named and est.fit_ctx_.var.shape == (ad.n_vars, 0)
    with pytest.raises(ValueError, match="genes but the model was fitted on"):
        est.posterior(array_type(ad.X.toarray()[:, :-1]))


def test_subclass_overriding_public_methods_keeps_working(counts_adata):
    """A subclass with its own ``fit`` / ``posterior`` bypasses the template: ``impute`` and
    ``fit_transform`` call its public methods."""
    est = _Double()
    assert not est._is_template() and _Template._is_template()
    out = est.fit_transform(counts_adata)
    np.testing.assert_allclose(out, counts_adata.X.toarray() + 1, rtol=1e-12)
    assert est.seen_shape_ == counts_adata.shape
    screpair.impute(counts_adata, est, key_added="d")
    assert "d" in counts_adata.layers
