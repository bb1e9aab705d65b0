"""Row-block sources and streaming passes (issue 16): the same numbers as the in-memory path."""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from screpair import _chunks, pp
from screpair._utils import get_counts


def _write(ad: AnnData, path, fmt: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's zarr v2 notice
        (ad.write_h5ad if fmt == "h5ad" else ad.write_zarr)(path)
    return path


@pytest.fixture(params=["memory", "dense", "backed", "h5ad", "zarr", "h5ad_layer"])
def source(request, counts_adata, tmp_path):
    ad = counts_adata.copy()
    x = ad.X.tolil()
    x[:3] = 0  # a run of empty cells: a block without counts is valid
    ad.X = sp.csr_matrix(x)
    ad.layers["counts"] = ad.X.copy()
    kind = request.param
    if kind == "memory":
        src = _chunks.open_rows(ad)
    elif kind == "dense":
        src = _chunks.open_rows(ad.X.toarray())
    elif kind == "backed":
        path = _write(ad, tmp_path / "a.h5ad", "h5ad")
        src = _chunks.open_rows(anndata.read_h5ad(path, backed="r"))
    elif kind == "h5ad_layer":
        ad.X = None
        src = _chunks.open_rows(_write(ad, tmp_path / "a.h5ad", "h5ad"), layer="counts")
    else:
        src = _chunks.open_rows(_write(ad, tmp_path / f"a.{kind}", kind))
    with src:
        yield src, get_counts(sp.csr_matrix(ad.layers["counts"]), warn_empty=False)


def test_blocks_equal_in_memory(source):
    src, x = source
    got = [b for _, _, b in src.blocks(3)]
    assert all(sp.isspmatrix_csr(b) and b.dtype == np.float64 and b.has_sorted_indices for b in got)
    stacked = sp.vstack(got, format="csr")
    assert (stacked != x).nnz == 0
    assert got[0].nnz == 0  # the three empty cells, as an empty block
    assert (_chunks.read_all(src, 9) != x).nnz == 0


def test_read_all_compact_holds_the_same_integers(source):
    src, x = source
    got = _chunks.read_all(src, 9, compact=True)
    assert got.dtype == np.uint16 and got.has_sorted_indices
    assert (got.astype(np.float64) != x).nnz == 0
    rows = np.arange(2, x.shape[0], 3)
    part = _chunks.read_all(src, 9, rows=rows, cols=np.arange(4), compact=True)
    assert part.dtype == np.uint16 and (part.astype(np.float64) != x[rows][:, :4]).nnz == 0


@pytest.mark.parametrize(("top", "dtype"), [(65535, np.uint16), (65536, np.float32),
                                             (2**24, np.float32), (2**24 + 1, np.float64)])
@pytest.mark.parametrize("subset", [False, True])
def test_read_all_compact_widens_for_large_counts(top, dtype, subset):
    """A block whose largest count the type cannot hold exactly widens the whole matrix (the
    blocks before it included), to the narrowest type that holds it."""
    rng = np.random.default_rng(0)
    x = sp.random(40, 6, density=0.5, format="csr", random_state=1,
                  data_rvs=lambda n: rng.integers(1, 100, n)).astype(np.float64)
    x[30, 2] = top  # in the 4th block of 9 rows: blocks before it were read as uint16
    x.sort_indices()
    kw = {"rows": np.arange(40)} if subset else {}
    got = _chunks.read_all(_chunks.open_rows(x), 9, compact=True, **kw)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.toarray().astype(np.float64), x.toarray())


def test_counts_file_reads_back_the_blocks(source, tmp_path):
    """The counts written block by block into a CountsFile read back as the validated float64
    CSR (consecutive rows, any sorted rows, restricted to the cells and genes with counts), with
    uint16 values and indices; closing it removes the file and reading then says why."""
    src, x = source
    f = _chunks.CountsFile(tmp_path, *x.shape)
    for start, _, block in src.blocks(9):
        f.add(start, block)
    f.finish()
    assert f.dtype == np.uint16 and f.index_dtype == np.uint16 and f.nnz == x.nnz
    for got, want in ((f[0:x.shape[0]], x), (f[4:17], x[4:17]), (f[5:5], x[5:5]),
                      (f.take_rows(np.array([0, 3, 10, x.shape[0] - 1])),
                       x[[0, 3, 10, x.shape[0] - 1]])):
        assert got.dtype == np.float64 and got.has_sorted_indices
        assert got.shape == want.shape and (got != want).nnz == 0
        np.testing.assert_array_equal(got.indices, sp.csr_matrix(want).indices)
    cells = np.diff(x.indptr) > 0
    genes = np.bincount(x.indices, minlength=x.shape[1]) > 0
    genes[1] = False  # a gene with counts left out: its entries are dropped, columns renumbered
    kept = f.take(cells, genes)
    want = x[np.flatnonzero(cells)][:, np.flatnonzero(genes)]
    assert kept.shape == want.shape and not cells.all()
    assert (kept[0:want.shape[0]] != want).nnz == 0
    assert (kept.take_rows(np.array([1, 4])) != want[[1, 4]]).nnz == 0
    f.close()
    assert not any(tmp_path.glob(".screpair-counts-*"))
    with pytest.raises(RuntimeError, match="removed when the run that wrote it ended"):
        kept[0:2]


@pytest.mark.parametrize(("top", "dtype"), [(65536, np.float32), (2**24 + 1, np.float64)])
def test_counts_file_widens_for_large_counts(top, dtype, tmp_path):
    """A block with a count uint16 cannot hold rewrites the values written so far, once, in
    the narrowest type that holds it; more genes than uint16 indices take int32 indices."""
    rng = np.random.default_rng(0)
    x = sp.random(40, 70_000, density=0.001, format="csr", random_state=1,
                  data_rvs=lambda n: rng.integers(1, 100, n)).astype(np.float64).tolil()
    x[30, 69_999] = top
    x = sp.csr_matrix(x)
    f = _chunks.CountsFile(tmp_path, *x.shape)
    for start in range(0, 40, 9):
        f.add(start, x[start:start + 9])
    f.finish()
    assert f.dtype == dtype and f.index_dtype == np.int32
    assert (f[0:40] != x).nnz == 0
    with pytest.raises(ValueError, match="expected row 40"):
        f.add(3, x[3:4])


def test_row_totals_by_blocks_equal_one_pass(monkeypatch):
    """row_totals of a matrix in memory, taken by views of a few stored values each, equals
    the pass over the matrix as one block, bit for bit (dense input too)."""
    x = sp.random(57, 30, density=0.3, format="csr", random_state=1)
    x.data = np.ceil(x.data * 50)
    acc = _chunks.TotalsPass(*x.shape)
    acc.add(0, x)
    monkeypatch.setattr(_chunks, "_TOTALS_NNZ", 7)
    for m in (x, x.toarray(), x[:0]):
        got = _chunks.row_totals(m)
        want = acc.result() if m.shape[0] else _chunks.RowTotals(np.zeros(0), np.zeros(30))
        np.testing.assert_array_equal(got.library_size, want.library_size)
        np.testing.assert_array_equal(got.norm_sum, want.norm_sum)


def test_gene_stats_match_hvg_dispersion(source):
    src, x = source
    stats = _chunks.gene_stats(src, 13)
    ref = pp.hvg_dispersion(x, 10)
    np.testing.assert_array_equal(stats.mean, ref["mean"].to_numpy())  # same order: same bits
    np.testing.assert_array_equal(stats.library_size, np.asarray(x.sum(1)).ravel())
    np.testing.assert_array_equal(stats.n_cells, np.diff(x.tocsc().indptr))
    np.testing.assert_allclose(stats.counts, np.asarray(x.sum(0)).ravel(), rtol=1e-12)
    got = pp.hvg_from_moments(stats.mean, stats.mean_sq, stats.n_obs, 10)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)


def test_hvg_matches_highly_variable_genes(counts_adata):
    ad = counts_adata.copy()
    pp.highly_variable_genes(ad, n_top_genes=12)
    stats = _chunks.gene_stats(_chunks.open_rows(ad), 11)
    got = pp.hvg_from_moments(stats.mean, stats.mean_sq, stats.n_obs, 12)
    np.testing.assert_array_equal(got["highly_variable"].to_numpy(), ad.var["highly_variable"])


def test_block_checks(tmp_path):
    x = sp.csr_matrix(np.array([[1.0, 0.5], [0, 2]] * 15))
    with pytest.raises(ValueError, match="non-integer"):
        list(_chunks.open_rows(x).blocks(4))
    ad = AnnData(X=sp.csr_matrix(np.array([[1.0, -2.0]] * 3)))
    ad.layers["c"] = ad.X.copy()
    with pytest.raises(ValueError, match="layer 'c' contains negative"):
        list(_chunks.open_rows(ad, layer="c").blocks(2))
    with pytest.raises(ValueError, match="all zeros"):
        _chunks.gene_stats(_chunks.open_rows(sp.csr_matrix((5, 3))), 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        list(_chunks.open_rows(x).blocks(0))


def test_open_errors(tmp_path, counts_adata):
    path = _write(counts_adata, tmp_path / "a.h5ad", "h5ad")
    with pytest.raises(KeyError, match="layer 'nope' not found"):
        _chunks.open_rows(path, layer="nope")
    with pytest.raises(FileNotFoundError):
        _chunks.open_rows(tmp_path / "missing.h5ad")
    ad = counts_adata.copy()
    ad.X = ad.X.tocsc()
    with pytest.raises(ValueError, match="CSC"):
        _chunks.open_rows(_write(ad, tmp_path / "c.h5ad", "h5ad"))


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_stream_store_round_trip(tmp_path, counts_adata, fmt):
    x = counts_adata.X.toarray()
    path = tmp_path / f"o.{fmt}"
    with _chunks.stream_store(path, obs=counts_adata.obs, var=counts_adata.var, chunk_rows=30) as w:
        w.matrix("X", x.shape[1])
        w.matrix("layers/dense", x.shape[1])
        for s in range(0, x.shape[0], 30):
            block = x[s:s + 30] * (s > 0)  # the first block stores nothing
            w.append("X", sp.csr_matrix(block))
            w.append("layers/dense", block / 3)
        w.uns["run"] = {"chunk_rows": 30}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = anndata.read_h5ad(path) if fmt == "h5ad" else anndata.read_zarr(path)
    ref = x * (np.arange(x.shape[0]) >= 30)[:, None]
    np.testing.assert_array_equal(back.X.toarray(), ref)
    np.testing.assert_allclose(back.layers["dense"], ref / 3, rtol=1e-7)
    assert back.layers["dense"].dtype == np.float32
    pd.testing.assert_frame_equal(back.obs, counts_adata.obs)
    assert back.uns["run"]["chunk_rows"] == 30
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_stream_store_incomplete_or_failing_leaves_old(tmp_path, counts_adata, fmt):
    path = tmp_path / f"o.{fmt}"
    import screpair

    screpair.write(counts_adata, path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match="incomplete"):
        with _chunks.stream_store(path, obs=counts_adata.obs, var=counts_adata.var) as w:
            w.matrix("X", counts_adata.n_vars)
            w.append("X", counts_adata.X[:10])
    with pytest.raises(KeyboardInterrupt):
        with _chunks.stream_store(path, obs=counts_adata.obs, var=counts_adata.var) as w:
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    back = screpair.read(path)
    np.testing.assert_array_equal(back.X.toarray(), counts_adata.X.toarray())


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_read_backed(tmp_path, counts_adata, fmt):
    import screpair

    path = tmp_path / f"a.{fmt}"
    screpair.write(counts_adata, path)
    ad = screpair.read(path, backed=True)
    assert not sp.issparse(ad.X) and ad.X.shape == counts_adata.shape  # still on disk
    np.testing.assert_array_equal(ad.X[5:9].toarray(), counts_adata.X[5:9].toarray())
    with pytest.raises(ValueError, match="backed=True needs"):
        screpair.read(_write_csv(tmp_path, counts_adata), backed=True)


def _write_csv(tmp_path, ad):
    import screpair

    path = tmp_path / "a.csv"
    screpair.write(ad, path)
    return path


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_copy_other_elements_streams_the_layers(tmp_path, fmt, traced_peak, caplog):
    """A 32 MB dense layer is copied by blocks of 200 cells (h5ad: traced peak < 1/4 of it;
    zarr decodes the stored chunks a block touches, which anndata sizes itself); a CSC layer,
    which cannot be read by rows, is read whole (logged); values and dtypes kept."""
    rng = np.random.default_rng(0)
    n, g = (8000 if fmt == "h5ad" else 1000), 500  # zarr is slow to write small blocks
    ad = AnnData(X=sp.random(n, g, density=0.01, format="csr", random_state=0),
                 layers={"big": rng.normal(size=(n, g)),
                         "csc": sp.random(n, g, density=0.01, format="csc", random_state=1)})
    src = _write(ad, tmp_path / f"in.{fmt}", fmt)
    out = tmp_path / f"out.{fmt}"

    dense = AnnData(X=ad.X, layers={"big": ad.layers["big"]})  # the peak: the dense layer's
    dense_src = _write(dense, tmp_path / f"d.{fmt}", fmt)
    _, peak = traced_peak(lambda: _copy_into(dense_src, out, ad, 200))
    if fmt == "h5ad":
        assert peak < n * g * 8 / 4, f"peak {peak / 1e6:.1f} MB"
    with caplog.at_level("WARNING", logger="screpair"):
        _copy_into(src, out, ad, 200)
    assert "stored by columns (CSC)" in caplog.text
    back = anndata.read_h5ad(out) if fmt == "h5ad" else anndata.read_zarr(out)
    np.testing.assert_array_equal(back.layers["big"], ad.layers["big"])
    assert sp.issparse(back.layers["csc"]) and back.layers["big"].dtype == np.float64
    want = anndata.read_h5ad(src) if fmt == "h5ad" else anndata.read_zarr(src)
    np.testing.assert_array_equal(back.layers["csc"].toarray(), want.layers["csc"].toarray())


def _copy_into(src, out, ad, rows):
    with _chunks.stream_store(out, obs=ad.obs, var=ad.var, chunk_rows=rows) as w:
        _chunks.copy_other_elements(src, w, chunk_rows=rows)
