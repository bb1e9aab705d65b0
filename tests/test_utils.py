"""Input validation: one place (`_utils.get_counts`), clear errors, data never modified."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from screpair._utils import check_var_names, get_counts, nonempty, var_names


def test_returns_copy_and_csr(counts_adata):
    x = get_counts(counts_adata)
    assert sp.isspmatrix_csr(x) and x.dtype == np.float64
    x.data[:] = -1
    assert counts_adata.X.min() >= 0  # caller's data untouched


def test_dense_input(array_type):
    x = array_type(np.array([[0, 1, 2], [3, 0, 1]]))
    out = get_counts(x)
    np.testing.assert_array_equal(out.toarray() if sp.issparse(out) else out, [[0, 1, 2], [3, 0, 1]])


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ([[1, -1], [2, 3]], "negative"),
        ([[1, np.nan], [2, 3]], "NaN or infinite"),
        ([[1, np.inf], [2, 3]], "NaN or infinite"),
        ([[0.5, 1.2], [2, 3]], "normalized or log-transformed"),
        ([[0, 0], [0, 0]], "all zeros"),
    ],
)
def test_bad_values(array_type, values, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_counts(array_type(np.array(values, dtype=float)))


def test_log_normalized_anndata_hint(counts_adata):
    ad = counts_adata.copy()
    ad.X = sp.csr_matrix(np.log1p(ad.X.toarray() / ad.X.sum(1).A * 1e4))
    with pytest.raises(ValueError, match=r"layer='counts'"):
        get_counts(ad)
    assert get_counts(ad, "counts").shape == ad.shape


def test_empty_and_shape_errors():
    with pytest.raises(ValueError, match="empty"):
        get_counts(np.zeros((0, 5)))
    with pytest.raises(ValueError, match="empty"):
        get_counts(sp.csr_matrix((3, 0)))
    with pytest.raises(ValueError, match="2-D"):
        get_counts(np.ones(4))
    with pytest.raises(ValueError, match="numeric"):
        get_counts(np.array([["a", "1"]], dtype=object))


def test_missing_layer(counts_adata):
    with pytest.raises(KeyError, match="available: 'counts'"):
        get_counts(counts_adata, "nope")
    with pytest.raises(TypeError, match="AnnData"):
        get_counts(np.ones((2, 2)), "counts")


def test_empty_cells_genes_warn():
    x = np.array([[0, 0, 0], [1, 0, 2], [3, 0, 1]])
    with pytest.warns(UserWarning, match="1 cell.*1 gene"):
        get_counts(x)
    cells, genes = nonempty(sp.csr_matrix(x))
    np.testing.assert_array_equal(cells, [False, True, True])
    np.testing.assert_array_equal(genes, [True, False, True])


def test_duplicate_var_names_made_unique():
    with pytest.warns(UserWarning, match="not unique"):
        ad = AnnData(np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["A", "B", "A"]))
    with pytest.warns(UserWarning, match="duplicate gene name"):
        names = var_names(ad)
    assert list(names) == ["A", "B", "A-1"]
    assert list(ad.var_names) == ["A", "B", "A"]  # not modified


def test_check_var_names():
    ad = AnnData(np.ones((2, 3), dtype=np.float32), var=pd.DataFrame(index=["a", "b", "c"]))
    check_var_names(pd.Index(["a", "b", "c"]), ad)
    with pytest.raises(ValueError, match="1 missing.*1 unexpected"):
        check_var_names(pd.Index(["a", "b", "d"]), ad)
    with pytest.raises(ValueError, match="different order"):
        check_var_names(pd.Index(["b", "a", "c"]), ad)
    with pytest.raises(ValueError, match="4"):
        check_var_names(pd.Index(list("abcd")), np.ones((2, 3)))
