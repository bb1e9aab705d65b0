"""Tests for screpair.read / screpair.write: every format round-trips, orientation, errors, atomicity."""

from __future__ import annotations

import gzip
import io
import logging
import os
import stat
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from anndata import AnnData

import screpair
from screpair import io as sio
from screpair.io import read, write

PBMC3K = Path("/work/shared/data/pbmc3k_10x/pbmc3k_2700cells_13714genes.h5ad")

SYMBOLS = ["CD3E", "MS4A1", "LYZ", "GNLY", "NKG7", "ACTB", "RP11-206L10.2", "MT-CO1", "HLA-DRA"]
BARCODES = [
    f"{bc}-1"
    for bc in [
        "AAACATACAACCAC",
        "AAACATTGAGCTAC",
        "AAACATTGATCAGC",
        "AAACCGTGCTTCCG",
        "AAACCGTGTATGCG",
        "AAACGCACTGGTAC",
        "AAACGCTGACCAGT",
        "AAACGCTGGTTCTT",
        "AAACGCTGTAGCCA",
        "AAACGCTGTTTCTG",
        "AAACTTGAAAAACG",
        "AAACTTGATCCAGA",
    ]
]
ENSEMBL = [f"ENSG{i:011d}" for i in range(1, len(SYMBOLS) + 1)]


def _counts(n_obs: int = len(BARCODES), n_vars: int = len(SYMBOLS), seed: int = 0) -> np.ndarray:
    """Integer counts with many zeros and some large values (cells x genes)."""
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(2, 0.3, size=(n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < 0.6)
    x[0, 0] = 12345  # a large count must survive every format exactly
    return x.astype(np.int64)


@pytest.fixture
def small() -> AnnData:
    x = _counts()
    ad = AnnData(
        X=sp.csr_matrix(x.astype(np.float32)),
        obs=pd.DataFrame({"batch": ["a", "b"] * (len(BARCODES) // 2)}, index=BARCODES),
        var=pd.DataFrame({"gene_ids": ENSEMBL}, index=SYMBOLS),
    )
    ad.layers["counts"] = ad.X.copy()
    ad.uns["note"] = "hello"
    return ad


# --- helpers building 10x files -------------------------------------------------------------


def _gz_write(path: Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def write_10x_mtx(
    folder: Path,
    x: np.ndarray,
    barcodes,
    ids,
    symbols,
    *,
    version: int = 3,
    gz: bool = True,
    prefix: str = "",
    types=None,
) -> Path:
    """Write cells x genes ``x`` as Cell Ranger writes it: genes x cells Matrix Market + tsv."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(np.asarray(x).T.astype(np.int64)))
    _gz_write(folder / f"{prefix}matrix.mtx{ext}", buf.getvalue(), gz)
    if version == 3:
        types = types if types is not None else ["Gene Expression"] * len(ids)
        rows = [f"{i}\t{s}\t{t}" for i, s, t in zip(ids, symbols, types, strict=True)]
        _gz_write(folder / f"{prefix}features.tsv{ext}", ("\n".join(rows) + "\n").encode(), gz)
    else:
        rows = [f"{i}\t{s}" for i, s in zip(ids, symbols, strict=True)]
        _gz_write(folder / f"{prefix}genes.tsv{ext}", ("\n".join(rows) + "\n").encode(), gz)
    _gz_write(folder / f"{prefix}barcodes.tsv{ext}", ("\n".join(barcodes) + "\n").encode(), gz)
    return folder


def _csc_group(g: h5py.Group, x: np.ndarray) -> None:
    m = sp.csc_matrix(np.asarray(x).T.astype(np.int32))  # genes x cells, indptr over cells
    g.create_dataset("data", data=m.data)
    g.create_dataset("indices", data=m.indices.astype(np.int64))
    g.create_dataset("indptr", data=m.indptr.astype(np.int64))
    g.create_dataset("shape", data=np.array(m.shape, dtype=np.int32))


def _bytes(values) -> np.ndarray:
    return np.array([v.encode() for v in values])


def write_10x_h5_v3(path: Path, x, barcodes, ids, symbols, types=None) -> Path:
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        _csc_group(g, x)
        g.create_dataset("barcodes", data=_bytes(barcodes))
        feats = g.create_group("features")
        feats.create_dataset("id", data=_bytes(ids))
        feats.create_dataset("name", data=_bytes(symbols))
        types = types if types is not None else ["Gene Expression"] * len(ids)
        feats.create_dataset("feature_type", data=_bytes(types))
        feats.create_dataset("genome", data=_bytes(["GRCh38"] * len(ids)))
    return path


def write_10x_h5_v2(path: Path, genomes: dict[str, tuple]) -> Path:
    """``genomes``: name -> (x cells x genes, barcodes, gene ids, gene names)."""
    with h5py.File(path, "w") as f:
        for name, (x, barcodes, ids, symbols) in genomes.items():
            g = f.create_group(name)
            _csc_group(g, x)
            g.create_dataset("barcodes", data=_bytes(barcodes))
            g.create_dataset("genes", data=_bytes(ids))
            g.create_dataset("gene_names", data=_bytes(symbols))
    return path


def write_table(path: Path, rows, cols, values, *, corner: str = "", sep: str = ",") -> Path:
    """Write a labelled table by hand (``values`` is len(rows) x len(cols))."""
    lines = [sep.join([corner, *cols])] if corner is not None else [sep.join(cols)]
    for name, vals in zip(rows, np.asarray(values), strict=True):
        lines.append(sep.join([name, *map(str, vals)]))
    text = "\n".join(lines) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def assert_counts_equal(adata: AnnData, expected: np.ndarray) -> None:
    assert isinstance(adata.X, sp.csr_matrix)
    assert adata.shape == expected.shape
    np.testing.assert_array_equal(adata.X.toarray(), expected)


# --- h5ad ---------------------------------------------------------------------------------


def test_h5ad_roundtrip_keeps_every_slot(small, tmp_path):
    path = tmp_path / "out.h5ad"
    write(small, path)
    back = read(path)
    assert_counts_equal(back, _counts())
    assert list(back.obs_names) == BARCODES
    assert list(back.var_names) == SYMBOLS
    assert list(back.var["gene_ids"]) == ENSEMBL
    assert list(back.obs["batch"]) == list(small.obs["batch"])
    np.testing.assert_array_equal(back.layers["counts"].toarray(), _counts())
    assert back.uns["note"] == "hello"
    with h5py.File(path, "r") as f:  # gzip-compressed
        assert f["X"]["data"].compression == "gzip"


def test_h5ad_dense_x_is_read_as_csr(small, tmp_path):
    dense = AnnData(X=_counts().astype(np.int32), obs=small.obs, var=small.var)
    write(dense, tmp_path / "d.h5ad")
    back = read(tmp_path / "d.h5ad")
    assert back.X.dtype == np.int32
    assert_counts_equal(back, _counts())


def test_h5ad_saved_as_h5_is_recognised(small, tmp_path):
    small.write_h5ad(tmp_path / "anndata.h5")
    assert_counts_equal(read(tmp_path / "anndata.h5"), _counts())


def test_write_does_not_modify_adata(small, tmp_path):
    before_x = small.X.copy()
    before_obs = small.obs.copy()
    assert small.obs["batch"].dtype == object
    write(small, tmp_path / "a.h5ad")
    write(small, tmp_path / "a.csv", layer="counts")
    # anndata's writer would turn string columns into categoricals in place; ours must not
    assert small.obs["batch"].dtype == object
    pd.testing.assert_frame_equal(small.obs, before_obs)
    assert (small.X != before_x).nnz == 0
    assert set(small.layers) == {"counts"} and small.uns == {"note": "hello"}


def test_write_a_view(small, tmp_path):
    view = small[2:7, 1:5]
    assert view.is_view
    write(view, tmp_path / "v.h5ad")
    write(view, tmp_path / "v.csv")
    assert view.is_view
    for name in ("v.h5ad", "v.csv"):
        back = read(tmp_path / name)
        assert_counts_equal(back, _counts()[2:7, 1:5])
        assert list(back.var_names) == SYMBOLS[1:5]


def test_write_backed_adata(small, tmp_path):
    small.write_h5ad(tmp_path / "src.h5ad")
    backed = anndata.read_h5ad(tmp_path / "src.h5ad", backed="r")
    try:
        write(backed, tmp_path / "copy.h5ad")
        write(backed, tmp_path / "copy.csv")
        assert backed.isbacked
    finally:
        backed.file.close()
    assert_counts_equal(read(tmp_path / "copy.h5ad"), _counts())
    assert_counts_equal(read(tmp_path / "copy.csv"), _counts())


# --- text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["csv", "csv.gz", "tsv", "tsv.gz", "txt", "txt.gz"])
def test_text_roundtrip(small, tmp_path, ext, array_type):
    small.X = array_type(_counts().astype(np.float32))
    path = tmp_path / f"m.{ext}"
    write(small, path)
    if ext.endswith(".gz"):
        with gzip.open(path, "rt") as fh:
            header, first = fh.readline(), fh.readline()
    else:
        header, first = path.read_text().splitlines()[:2]
    sep = "," if ext.startswith("csv") else "\t"
    # genes x cells, gene names first, integers written as integers
    assert header.rstrip("\n").split(sep) == ["gene", *BARCODES]
    assert first.rstrip("\n").split(sep) == ["CD3E", *map(str, _counts()[:, 0])]
    back = read(path)
    assert_counts_equal(back, _counts())
    assert back.X.dtype == np.float32
    assert list(back.obs_names) == BARCODES
    assert list(back.var_names) == SYMBOLS


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_text_roundtrip_non_integer_values_exactly(tmp_path, dtype):
    rng = np.random.default_rng(1)
    x = (rng.gamma(0.5, 3.0, size=(6, 5)) * (rng.random((6, 5)) < 0.7)).astype(dtype)
    ad = AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"cell_{i}" for i in range(6)]),
        var=pd.DataFrame(index=SYMBOLS[:5]),
    )
    write(ad, tmp_path / "f.csv")
    back = read(tmp_path / "f.csv")
    assert back.X.dtype == np.float64  # non-integer text keeps full precision
    np.testing.assert_array_equal(back.X.toarray().astype(dtype), x)


def test_text_write_layer(small, tmp_path):
    small.layers["imputed"] = np.full(small.shape, 0.25)
    write(small, tmp_path / "imp.csv", layer="imputed")
    back = read(tmp_path / "imp.csv")
    np.testing.assert_allclose(back.X.toarray(), 0.25, rtol=0, atol=0)


def test_text_cells_in_rows_and_r_style_header(tmp_path):
    x = _counts()
    # cells x genes, corner label omitted (R write.table): header is one field shorter
    lines = ["\t".join(SYMBOLS)] + [
        "\t".join([bc, *map(str, row)]) for bc, row in zip(BARCODES, x, strict=True)
    ]
    path = tmp_path / "cells_rows.txt"
    path.write_text("\n".join(lines) + "\n")
    back = read(path)
    assert_counts_equal(back, x)
    assert list(back.obs_names) == BARCODES and list(back.var_names) == SYMBOLS


def test_text_whitespace_separated_quoted_txt(tmp_path):
    x = _counts()[:4, :3]
    lines = [" ".join(f'"{c}"' for c in BARCODES[:4])] + [
        " ".join([f'"{g}"', *map(str, x[:, j])]) for j, g in enumerate(SYMBOLS[:3])
    ]
    path = tmp_path / "space.txt"
    path.write_text("\n".join(lines) + "\n")
    back = read(path)
    assert_counts_equal(back, x)
    assert list(back.var_names) == SYMBOLS[:3]


def test_text_excel_export_bom_semicolon_crlf(tmp_path):
    x = _counts(3, 4)
    lines = ["\ufeffgene;c1;c2;c3"] + [
        ";".join([g, *map(str, x[:, j])]) for j, g in enumerate(SYMBOLS[:4])
    ]
    path = tmp_path / "excel.csv"
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    back = read(path)
    assert_counts_equal(back, x)
    assert list(back.obs_names) == ["c1", "c2", "c3"] and list(back.var_names) == SYMBOLS[:4]


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_text_names_needing_quotes_roundtrip(tmp_path, ext):
    x = _counts(3, 3)
    genes = ["HLA-A,B", 'odd"name', "CD3E"]
    cells = ["c,1", "c\t2", " c3 "]
    ad = AnnData(
        X=x.astype(np.float32), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)
    )
    write(ad, tmp_path / f"q.{ext}")
    back = read(tmp_path / f"q.{ext}")
    assert list(back.var_names) == genes and list(back.obs_names) == cells
    assert_counts_equal(back, x)


# --- orientation auto-detection -------------------------------------------------------------

GENE_SETS = {
    "symbols": SYMBOLS,
    "ensembl": ENSEMBL,
    "gene_n": [f"gene_{i:05d}" for i in range(9)],
    "mouse": [
        "0610007P14Rik",
        "Actb",
        "mt-Co1",
        "Gapdh",
        "Sox2",
        "Pou5f1",
        "ERCC-00002",
        "Klf4",
        "Nanog",
    ],
}
CELL_SETS = {
    "barcodes": BARCODES[:7],
    "cell_n": [f"cell_{i}" for i in range(7)],
    "plate": ["D3T0_A.P2_A2", "D3T0_A.P2_A3", "ES_1", "MEF_44", "SC_2i_1", "SC_serum_7", "S1_x_9"],
    "accession": [f"SRR{1000 + i}" for i in range(7)],
    "r_default": [f"X{i}" for i in range(1, 8)],
}


@pytest.mark.parametrize("genes", sorted(GENE_SETS))
@pytest.mark.parametrize("cells", sorted(CELL_SETS))
@pytest.mark.parametrize("genes_in_rows", [True, False])
def test_orientation_auto_detect(tmp_path, caplog, genes, cells, genes_in_rows):
    g, c = GENE_SETS[genes], CELL_SETS[cells]
    x = _counts(len(c), len(g))  # cells x genes
    if genes_in_rows:
        path = write_table(tmp_path / "t.csv", g, c, x.T)
    else:
        path = write_table(tmp_path / "t.csv", c, g, x)
    with caplog.at_level(logging.INFO, logger="screpair"):
        back = read(path)
    assert_counts_equal(back, x)
    assert list(back.var_names) == g and list(back.obs_names) == c
    records = [r for r in caplog.records if r.name == "screpair.io" and r.levelno == logging.INFO]
    assert len(records) == 1
    message = records[0].getMessage()
    assert ("genes in rows" if genes_in_rows else "cells in rows") in message
    assert "gene-like" in message and "cell-like" in message  # the reason is given


def test_orientation_numeric_cell_names(tmp_path):
    x = _counts(5, 9)
    cells = [str(i) for i in range(1, 6)]
    back = read(write_table(tmp_path / "a.csv", cells, SYMBOLS, x))  # cells in rows
    assert_counts_equal(back, x)
    back = read(write_table(tmp_path / "b.csv", SYMBOLS, cells, x.T))  # genes in rows
    assert_counts_equal(back, x)


@pytest.mark.parametrize(
    ("corner", "genes_in_rows"),
    [("gene", True), ("Gene_ID", True), ("symbol", True), ("cell", False), ("barcode", False)],
)
def test_orientation_corner_label_decides(tmp_path, caplog, corner, genes_in_rows):
    # names that say nothing either way: the corner label decides
    rows, cols = [f"r{i}x" for i in range(4)], [f"q{i}y" for i in range(3)]
    values = np.arange(12).reshape(4, 3)
    with caplog.at_level(logging.INFO, logger="screpair"):
        back = read(write_table(tmp_path / "c.csv", rows, cols, values, corner=corner))
    if genes_in_rows:
        assert list(back.var_names) == rows
        assert_counts_equal(back, values.T)
    else:
        assert list(back.obs_names) == rows
        assert_counts_equal(back, values)
    assert f"headed {corner!r}" in caplog.text


def test_orientation_unsure_defaults_to_genes_in_rows(tmp_path, caplog):
    rows, cols = [f"r{i}x" for i in range(4)], [f"q{i}y" for i in range(3)]
    values = np.arange(12).reshape(4, 3)
    with (
        caplog.at_level(logging.INFO, logger="screpair"),
        pytest.warns(UserWarning, match="do not tell .*transpose=False") as rec,
    ):
        back = read(write_table(tmp_path / "u.csv", rows, cols, values))
    assert list(back.var_names) == rows and list(back.obs_names) == cols
    assert "do not tell" in caplog.text and "transpose=" in caplog.text
    assert len(rec) == 1  # one warning, also in the Python API (not only a CLI log line)


@pytest.mark.parametrize("transpose", [False, True])
def test_transpose_overrides_detection(tmp_path, caplog, transpose):
    x = _counts()
    path = write_table(tmp_path / "t.csv", SYMBOLS, BARCODES, x.T)  # genes in rows
    with caplog.at_level(logging.INFO, logger="screpair"):
        back = read(path, transpose=transpose)
    assert f"transpose={transpose}" in caplog.text
    if transpose:  # told that rows are cells: genes become cells
        assert list(back.obs_names) == SYMBOLS
        assert_counts_equal(back, x.T)
    else:
        assert list(back.obs_names) == BARCODES
        assert_counts_equal(back, x)


def test_label_kind_examples():
    kinds = {
        "CD3E": "gene",
        "RP11-206L10.2": "gene",
        "ENSMUSG00000051951": "gene",
        "ENSG00000141510.17": "gene",
        "gene_00012": "gene",
        "ERCC-00002": "gene",
        "AAACATACAACCAC-1": "cell",
        "pbmc1_AAACATACAACCAC": "cell",
        "cell_12": "cell",
        "Cell12": "cell",
        "SRR1234567": "cell",
        "X12": "cell",
        "A01": "cell",
        "ES_1": "cell",
        "12": None,
        "a b c": None,
    }
    assert {k: sio._label_kind(k) for k in kinds} == kinds


# --- duplicate names ------------------------------------------------------------------------


def test_duplicate_gene_names_text(tmp_path):
    genes = ["CD3E", "LYZ", "CD3E", "ACTB", "CD3E"]
    x = _counts(4, 5)
    path = write_table(tmp_path / "d.csv", genes, BARCODES[:4], x.T)
    with pytest.warns(UserWarning, match=r"1 duplicate gene name\(s\) \(e.g. 'CD3E'\)"):
        back = read(path)
    assert list(back.var_names) == ["CD3E", "LYZ", "CD3E-1", "ACTB", "CD3E-2"]
    assert_counts_equal(back, x)


def test_duplicate_gene_names_10x(tmp_path):
    symbols = ["CD3E", "LYZ", "LYZ"]
    folder = write_10x_mtx(tmp_path / "tenx", _counts(4, 3), BARCODES[:4], ENSEMBL[:3], symbols)
    with pytest.warns(UserWarning, match="duplicate gene name"):
        back = read(folder)
    assert list(back.var_names) == ["CD3E", "LYZ", "LYZ-1"]
    assert list(back.var["gene_ids"]) == ENSEMBL[:3]  # IDs stay unique and untouched


def test_duplicate_gene_names_h5ad(small, tmp_path):
    small.var_names = ["A", "B", "A", "C", "D", "E", "F", "G", "H"]  # no warning on assignment
    small.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.warns(UserWarning, match="duplicate gene name") as record:
        back = read(tmp_path / "dup.h5ad")
    assert len(record) == 1  # ours only; anndata's own warning is not passed through
    assert list(back.var_names[:3]) == ["A", "B", "A-1"]


# --- 10x matrix directory -------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("version", [2, 3])
def test_10x_mtx_roundtrip(tmp_path, gz, version):
    x = _counts()
    folder = write_10x_mtx(tmp_path / "tenx", x, BARCODES, ENSEMBL, SYMBOLS, version=version, gz=gz)
    back = read(folder)
    assert_counts_equal(back, x)
    assert back.X.dtype == np.float32
    assert list(back.obs_names) == BARCODES
    assert list(back.var_names) == SYMBOLS
    assert list(back.var["gene_ids"]) == ENSEMBL
    if version == 3:
        assert set(back.var["feature_types"]) == {"Gene Expression"}
    else:
        assert "feature_types" not in back.var
    # the matrix file itself is accepted as the path too
    mtx = folder / ("matrix.mtx.gz" if gz else "matrix.mtx")
    assert_counts_equal(read(mtx), x)


def test_10x_mtx_geo_prefixed_names(tmp_path):
    x = _counts()
    folder = write_10x_mtx(tmp_path / "geo", x, BARCODES, ENSEMBL, SYMBOLS, prefix="GSM123_")
    assert_counts_equal(read(folder), x)
    assert_counts_equal(read(folder / "GSM123_matrix.mtx.gz"), x)
    write_10x_mtx(folder, x[:3], BARCODES[:3], ENSEMBL, SYMBOLS, prefix="GSM456_")
    with pytest.raises(ValueError, match="several matrices"):
        read(folder)
    assert_counts_equal(read(folder / "GSM456_matrix.mtx.gz"), x[:3])


def test_10x_mtx_keeps_gene_expression_only(tmp_path, caplog):
    x = _counts()
    types = ["Gene Expression"] * 7 + ["Antibody Capture"] * 2
    folder = write_10x_mtx(tmp_path / "cite", x, BARCODES, ENSEMBL, SYMBOLS, types=types)
    with caplog.at_level(logging.INFO, logger="screpair"):
        back = read(folder)
    assert_counts_equal(back, x[:, :7])
    assert list(back.var_names) == SYMBOLS[:7]
    assert "dropped 2 others (Antibody Capture)" in caplog.text


def test_10x_mtx_real_pbmc3k_layout(tmp_path):
    """A real 10x v3 layout: pbmc3k barcodes, gene symbols and UMI counts, gzipped."""
    # the shared copy of the full data set where it exists, else the bundled pbmc3k subset
    pbmc = read(PBMC3K) if PBMC3K.exists() else screpair.datasets.demo()
    sub = pbmc[:300, :2000].copy()
    sub = sub[:, np.asarray(sub.X.sum(0)).ravel() > 0].copy()  # genes detected in the slice
    counts = sub.X.toarray()
    barcodes = [f"{b}-1" for b in sub.obs_names]  # Cell Ranger's barcode suffix
    ids = [f"ENSG{i:011d}" for i in range(sub.n_vars)]  # pbmc3k ships without Ensembl IDs
    folder = write_10x_mtx(
        tmp_path / "filtered_feature_bc_matrix", counts, barcodes, ids, list(sub.var_names)
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "barcodes.tsv.gz",
        "features.tsv.gz",
        "matrix.mtx.gz",
    ]
    back = read(folder)
    assert back.shape == (300, sub.n_vars) and sub.n_vars > 1000
    np.testing.assert_array_equal(back.X.toarray(), counts)
    assert list(back.obs_names) == barcodes
    assert list(back.var_names) == list(sub.var_names)
    # and through a genes x cells CSV of the same cells, the layout SAVER/scImpute users have
    write(back, tmp_path / "pbmc.csv.gz")
    again = read(tmp_path / "pbmc.csv.gz")
    np.testing.assert_array_equal(again.X.toarray(), counts)
    assert list(again.obs_names) == barcodes


# --- 10x .h5 --------------------------------------------------------------------------------


def test_10x_h5_v3(tmp_path):
    x = _counts()
    path = write_10x_h5_v3(
        tmp_path / "filtered_feature_bc_matrix.h5", x, BARCODES, ENSEMBL, SYMBOLS
    )
    back = read(path)
    assert_counts_equal(back, x)
    assert back.X.dtype == np.float32
    assert list(back.obs_names) == BARCODES and list(back.var_names) == SYMBOLS
    assert list(back.var["gene_ids"]) == ENSEMBL
    assert set(back.var["feature_types"]) == {"Gene Expression"}
    assert set(back.var["genome"]) == {"GRCh38"}


def test_10x_h5_v3_gene_expression_only(tmp_path):
    x = _counts()
    types = ["Antibody Capture"] + ["Gene Expression"] * 8
    path = write_10x_h5_v3(tmp_path / "cite.h5", x, BARCODES, ENSEMBL, SYMBOLS, types)
    back = read(path)
    assert_counts_equal(back, x[:, 1:])
    assert list(back.var_names) == SYMBOLS[1:]


def test_10x_h5_v2_single_genome(tmp_path):
    x = _counts()
    path = write_10x_h5_v2(tmp_path / "v2.h5", {"hg19": (x, BARCODES, ENSEMBL, SYMBOLS)})
    back = read(path)
    assert_counts_equal(back, x)
    assert list(back.obs_names) == BARCODES and list(back.var_names) == SYMBOLS
    assert list(back.var["gene_ids"]) == ENSEMBL
    assert "genome" not in back.var


def test_10x_h5_v2_two_genomes_are_concatenated(tmp_path):
    x = _counts()
    mm = ["Actb", "Gapdh", "Sox2"]
    xm = _counts(len(BARCODES), 3, seed=5)
    path = write_10x_h5_v2(
        tmp_path / "barnyard.h5",
        {
            "hg19": (x, BARCODES, ENSEMBL, SYMBOLS),
            "mm10": (xm, BARCODES, [f"ENSMUSG{i:011d}" for i in range(3)], mm),
        },
    )
    back = read(path)
    assert_counts_equal(back, np.hstack([x, xm]))
    assert list(back.var_names) == SYMBOLS + mm
    assert list(back.var["genome"]) == ["hg19"] * 9 + ["mm10"] * 3


# --- read errors: one clear line each -------------------------------------------------------


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory") as e:
        read(tmp_path / "nope.h5ad")
    assert "nope.h5ad" in _one_line(e)


def test_read_unknown_extension(tmp_path):
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"cannot tell the format .* supported: \.h5ad") as e:
        read(tmp_path / "data.xlsx")
    _one_line(e)


def test_read_directory_without_matrix(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a 10x matrix directory") as e:
        read(tmp_path)
    _one_line(e)


@pytest.mark.parametrize("missing", ["barcodes.tsv.gz", "features.tsv.gz"])
def test_read_10x_dir_missing_file(tmp_path, missing):
    folder = write_10x_mtx(tmp_path / "tenx", _counts(), BARCODES, ENSEMBL, SYMBOLS)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"has matrix.mtx.gz but no {missing[:8]}") as e:
        read(folder)
    _one_line(e)


def test_read_10x_dir_inconsistent(tmp_path):
    folder = write_10x_mtx(tmp_path / "tenx", _counts(), BARCODES, ENSEMBL, SYMBOLS)
    _gz_write(folder / "barcodes.tsv.gz", "\n".join(BARCODES[:-1]).encode(), True)
    with pytest.raises(
        ValueError, match=r"inconsistent: .* 9 genes x 12 cells .* 11 barcodes"
    ) as e:
        read(folder)
    _one_line(e)


@pytest.mark.parametrize("name", ["bad.h5ad", "bad.h5"])
def test_read_corrupt_hdf5(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not HDF5\n" * 10)
    with pytest.raises(ValueError, match="could not") as e:
        read(tmp_path / name)
    _one_line(e)


def test_read_h5_not_10x(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("X", data=np.ones((2, 2)))
        f.create_dataset("Y", data=np.ones(2))
    with pytest.raises(ValueError, match="neither an AnnData file nor a 10x Cell Ranger") as e:
        read(tmp_path / "other.h5")
    assert "'X', 'Y'" in _one_line(e)


def test_read_10x_h5_named_h5ad(tmp_path):
    path = write_10x_h5_v3(tmp_path / "wrong_name.h5ad", _counts(), BARCODES, ENSEMBL, SYMBOLS)
    assert_counts_equal(read(path), _counts())


@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
def test_read_h5ad_malformed(tmp_path):
    with h5py.File(tmp_path / "empty.h5ad", "w"):
        pass
    with pytest.raises(ValueError, match="neither an AnnData file") as e:
        read(tmp_path / "empty.h5ad")
    _one_line(e)
    with h5py.File(tmp_path / "half.h5ad", "w") as f:  # looks like AnnData, but is not
        f.create_group("obs")
        f.create_group("var")
    with pytest.raises(ValueError, match="has no count matrix") as e:
        read(tmp_path / "half.h5ad")
    _one_line(e)


def test_read_truncated_h5ad(small, tmp_path):
    write(small, tmp_path / "full.h5ad")
    data = (tmp_path / "full.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="could not open .*cut.h5ad.* as HDF5") as e:
        read(tmp_path / "cut.h5ad")
    _one_line(e)


def test_read_text_non_numeric_value(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("gene,c1,c2,c3\nCD3E,1,2,3\nLYZ,4,oops,6\nACTB,7,8,x\n")
    with pytest.raises(
        ValueError, match=r"non-numeric value 'oops' at line 3 \(row 'LYZ', column 'c2'\)"
    ) as e:
        read(path)
    _one_line(e)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("LYZ,4,,6", "an empty or missing value"),
        ("LYZ,4,NA,6", "non-numeric value 'NA'"),
        ("LYZ,4,inf,6", "non-finite value inf"),
    ],
)
def test_read_text_missing_or_non_finite(tmp_path, body, what):
    path = tmp_path / "bad.csv"
    path.write_text(f"gene,c1,c2,c3\nCD3E,1,2,3\n{body}\n")
    with pytest.raises(ValueError, match=rf"{what} at line 3 \(row 'LYZ', column 'c[23]'\)") as e:
        read(path)
    _one_line(e)


def test_read_text_non_numeric_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(sio, "_CHUNK_VALUES", 6)  # 2 rows per chunk
    rows = [f"G{i}" for i in range(7)]
    values = np.arange(21).reshape(7, 3).astype(object)
    values[5, 1] = "bad"
    path = write_table(tmp_path / "late.csv", rows, ["c1", "c2", "c3"], values, corner="gene")
    with pytest.raises(ValueError, match=r"'bad' at line 7 \(row 'G5', column 'c2'\)"):
        read(path)


def test_read_text_chunked_equals_whole(tmp_path, monkeypatch):
    x = _counts(40, 9)
    path = write_table(tmp_path / "big.csv", SYMBOLS, [f"cell_{i}" for i in range(40)], x.T)
    monkeypatch.setattr(sio, "_CHUNK_VALUES", 50)  # 1 gene per chunk
    assert_counts_equal(read(path), x)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ("gene,c1,c2\n", "no data rows"),
        ("1,2,3\n4,5,6\n", "has no header: its first line is all numbers"),
        ("gene,c1,c2,c3,c4\nCD3E,1,2\n", "header has 5 fields but the first data row has 3"),
        ("gene\nCD3E\nLYZ\n", r"line 2 \(row 'CD3E'\) has a name but no values"),
        (
            "gene,c1,c2\nCD3E,1,2\nLYZ,1,2,3,4\n",
            r"4 values at line 3 \(row 'LYZ'\) but the header names 2",
        ),
        (
            "gene,c1,c2\nCD3E,1,2\n\nLYZ,1\n",
            r"1 values at line 4 \(row 'LYZ'\) but the header names 2",
        ),
        ("gene,c1,c2\nCD3E,1,2\nLYZ\n", r"line 3 \(row 'LYZ'\) has a name but no values"),
    ],
)
def test_read_text_malformed(tmp_path, content, match):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        read(path)
    _one_line(e)


def test_read_not_gzip(tmp_path):
    (tmp_path / "fake.csv.gz").write_text("gene,c1\nA,1\n")
    with pytest.raises(ValueError, match="could not read") as e:
        read(tmp_path / "fake.csv.gz")
    _one_line(e)


def test_transpose_rejected_for_fixed_layouts(small, tmp_path):
    write(small, tmp_path / "a.h5ad")
    with pytest.raises(ValueError, match="transpose= applies to text tables only"):
        read(tmp_path / "a.h5ad", transpose=True)


# --- write errors and atomicity -------------------------------------------------------------


def test_write_refuses_directory(small, tmp_path):
    (tmp_path / "out.h5ad").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        write(small, tmp_path / "out.h5ad")
    with pytest.raises(IsADirectoryError):
        write(small, tmp_path)
    assert (tmp_path / "out.h5ad").is_dir()


def test_write_errors(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write(small, tmp_path / "missing" / "a.h5ad")
    with pytest.raises(ValueError, match="unknown extension"):
        write(small, tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="layer= applies to text output only"):
        write(small, tmp_path / "a.h5ad", layer="counts")
    with pytest.raises(KeyError, match="layer 'nope' not found"):
        write(small, tmp_path / "a.csv", layer="nope")
    with pytest.raises(TypeError, match="needs an AnnData"):
        write(small.X, tmp_path / "a.csv")
    assert list(tmp_path.iterdir()) == []


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("name", ["out.csv", "out.csv.gz", "out.h5ad"])
def test_write_is_atomic(small, tmp_path, monkeypatch, name, exc):
    target = tmp_path / name
    old = b"previous complete file\n"
    target.write_bytes(old)
    calls = {"n": 0}
    if name.endswith(".h5ad"):
        real = AnnData.write_h5ad

        def failing(self, filename, **kwargs):
            real(self, filename, **kwargs)  # the temp file is complete…
            assert Path(filename).parent == tmp_path and Path(filename).stat().st_size > 0
            msg = "disk full"
            raise exc(msg)  # …but the write still fails before the rename

        monkeypatch.setattr(AnnData, "write_h5ad", failing)
    else:
        monkeypatch.setattr(sio, "_CHUNK_VALUES", len(BARCODES))  # one gene per chunk
        real = sio._write_rows

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # three genes written, then the failure
                msg = "disk full"
                raise exc(msg)
            return real(*args, **kwargs)

        monkeypatch.setattr(sio, "_write_rows", failing)
    with pytest.raises(exc, match="disk full"):
        write(small, target)
    assert target.read_bytes() == old  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left
    if not name.endswith(".h5ad"):
        assert calls["n"] == 4


def test_write_failure_leaves_no_new_file(small, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        msg = "no"
        raise Boom(msg)

    monkeypatch.setattr(sio, "_write_text", failing)
    with pytest.raises(Boom):
        write(small, tmp_path / "new.csv")
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_and_sets_normal_mode(small, tmp_path):
    target = tmp_path / "m.csv"
    target.write_text("old")
    os.chmod(target, 0o640)
    write(small, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # an existing file keeps its mode
    assert_counts_equal(read(target), _counts())
    umask = os.umask(0)
    os.umask(umask)
    write(small, tmp_path / "fresh.h5ad")
    assert stat.S_IMODE((tmp_path / "fresh.h5ad").stat().st_mode) == 0o666 & ~umask


def test_read_write_exported_from_package():
    assert screpair.read is read and screpair.write is write
