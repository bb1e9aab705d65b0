"""screpair._norm: the one set of normalizers, against hand-computed values (dense and CSR)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from screpair import _norm

#: three cells: library sizes 4, 0 (no counts) and 10
X = np.array([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0], [2.0, 8.0, 0.0]])
LIB = np.array([4.0, 0.0, 10.0])


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


def test_scales_named_once():
    assert _norm.CP10K == 1e4 and _norm.CPM == 1e6


def test_library_size_and_size_factors(array_type):
    np.testing.assert_array_equal(_norm.library_size(array_type(X)), LIB)
    # mean library 14 / 3; the empty cell's factor is 0
    np.testing.assert_allclose(_norm.size_factors(LIB), [4 * 3 / 14, 0.0, 10 * 3 / 14], rtol=1e-15)


def test_scale_factors_zero_library_and_median():
    np.testing.assert_allclose(_norm.scale_factors(LIB, 100.0), [25.0, 0.0, 10.0], rtol=1e-15)
    # target None: median of the positive library sizes, (4 + 10) / 2 = 7
    np.testing.assert_allclose(_norm.scale_factors(LIB, None), [7 / 4, 0.0, 0.7], rtol=1e-15)


def test_normalize(array_type):
    out = _norm.normalize(array_type(X), 100.0)
    assert sp.issparse(out) == sp.issparse(array_type(X)) and out.dtype == np.float64
    want = [[25.0, 0.0, 75.0], [0.0, 0.0, 0.0], [20.0, 80.0, 0.0]]
    np.testing.assert_allclose(_dense(out), want, rtol=1e-15)
    # library sizes given (e.g. over all genes while x holds some): the first two genes only
    sub = _norm.normalize(array_type(X[:, :2]), 100.0, LIB)
    np.testing.assert_allclose(_dense(sub), [[25.0, 0.0], [0.0, 0.0], [20.0, 80.0]], rtol=1e-15)


@pytest.mark.parametrize(("base", "div"), [(None, 1.0), (2, np.log(2)), (10, np.log(10))])
def test_log1p_bases(array_type, base, div):
    out = _norm.log1p(array_type(X), base)
    assert sp.issparse(out) == sp.issparse(array_type(X))
    want = np.log1p(X) / div
    np.testing.assert_allclose(_dense(out), want, rtol=1e-15)
    if base == 2:
        np.testing.assert_allclose(_dense(out)[0, 2], 2.0, rtol=1e-15)  # log2(3 + 1)
    if base == 10:
        np.testing.assert_allclose(_dense(out)[2, 0], np.log10(3.0), rtol=1e-15)


def test_log_normalize_cpm_and_cp10k(array_type):
    out = _dense(_norm.log_normalize(array_type(X), _norm.CPM))
    np.testing.assert_allclose(out[0], np.log1p([250_000.0, 0.0, 750_000.0]), rtol=1e-15)
    np.testing.assert_array_equal(out[1], 0.0)  # no counts: stays zero
    np.testing.assert_allclose(out[2], np.log1p([200_000.0, 800_000.0, 0.0]), rtol=1e-15)
    log2 = _dense(_norm.log_normalize(array_type(X), 4.0, base=2))  # log2(x / L * 4 + 1)
    np.testing.assert_allclose(log2[0], [1.0, 0.0, 2.0], rtol=1e-15)


@pytest.mark.parametrize("base", [None, 2])
def test_log_in_float32(array_type, base):
    """``dtype=np.float32``: scaled in float64, cast, then the log taken in float32 (the order
    a float32 network's input needs; cnnImpute's ``(x * 1e6 / L).astype(float32)``, then log1p)."""
    out = _norm.log_normalize(array_type(X), _norm.CPM, base=base, dtype=np.float32)
    assert sp.issparse(out) == sp.issparse(array_type(X)) and out.dtype == np.float32
    scaled = (X * _norm.scale_factors(LIB, _norm.CPM)[:, None]).astype(np.float32)
    want = np.log1p(scaled)
    if base is not None:
        want /= np.log(base)
    np.testing.assert_array_equal(_dense(out), want)  # bit for bit
    # float64 (the default) is unchanged by the keyword
    np.testing.assert_array_equal(
        _dense(_norm.log1p(array_type(X), base, dtype=np.float64)), _dense(_norm.log1p(X, base))
    )


def test_back_to_counts(array_type):
    lg = _norm.log_normalize(array_type(X), _norm.CP10K)
    back = _norm.to_counts(lg, LIB)
    assert isinstance(back, np.ndarray)
    np.testing.assert_allclose(back, X, rtol=1e-12, atol=1e-12)
    # negative log values (a model's output) clip at zero; a cell with L = 0 gets zeros
    v = np.array([[-0.5, np.log(2.0)], [1.0, 1.0]])
    np.testing.assert_allclose(_norm.to_counts(v, np.array([2e4, 0.0])),
                               [[0.0, 2.0], [0.0, 0.0]], rtol=1e-15)
    np.testing.assert_allclose(_norm.unnormalize(array_type(np.array([[5e3, 1e4]])),
                                                 np.array([3.0])), [[1.5, 3.0]], rtol=1e-15)


def test_input_not_modified(array_type):
    m = array_type(X.copy())
    _norm.log_normalize(m, _norm.CPM)
    _norm.normalize(m)
    np.testing.assert_array_equal(_dense(m), X)


def test_public_wrappers_share_the_arithmetic():
    """pp's matrix helpers are _norm's; simulate.log_normalize and evaluate.log1p_norm wrap it."""
    from screpair import evaluate, pp, simulate

    assert pp.normalize_rows is _norm.normalize and pp.log1p_matrix is _norm.log1p
    csr = sp.csr_matrix(X)
    np.testing.assert_array_equal(simulate.log_normalize(csr),
                                  _norm.log_normalize(csr).toarray())
    np.testing.assert_array_equal(evaluate.log1p_norm(X), _norm.log_normalize(X, _norm.CPM))


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_library_size_of_narrow_counts_by_blocks(dtype, monkeypatch):
    """Counts held compactly are summed by blocks of rows as float64: the float64 matrix's
    sums bit for bit; so are the genes' detection counts, bincounted by pieces."""
    from screpair import _utils

    monkeypatch.setattr(_norm, "_SUM_ROWS", 7)
    monkeypatch.setattr(_utils, "NNZ_PIECE", 50)
    rng = np.random.default_rng(0)
    x = sp.random(60, 9, density=0.6, format="csr", random_state=2,
                  data_rvs=lambda n: rng.integers(1, 3000, n)).astype(np.float64)
    small = x.astype(dtype)
    lib = _norm.library_size(small)
    assert lib.dtype == np.float64
    np.testing.assert_array_equal(lib, np.asarray(x.toarray().sum(1)))
    np.testing.assert_array_equal(_utils._col_nnz(small), (x.toarray() != 0).sum(0))
