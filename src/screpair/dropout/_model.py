"""A fitted dropout model: fit on (a sample of) the cells, dropout probabilities of any rows.

:class:`DropoutModel` wraps the cnnImpute dropout step (:func:`cluster_cells`, then
:func:`fit_zinb_dropout` or :func:`fit_dropout` per cluster) in the fit-small / transform-by-rows
shape of the large-data path:

1. **fit** on at most ``n_fit_cells`` cells (a uniform random sample when there are more; all of
   them below, which gives exactly what the two functions give on all cells): the clustering
   (log2 normalized counts, PCA, 3-D t-SNE, density peaks, k-means) and the per-cluster x gene
   parameters are learned on the sample; every other fitted cell joins the cluster most of its
   ``n_neighbors`` nearest sampled cells belong to, in the sample's principal-component space
   (:class:`screpair.dropout._cluster.CellProjection`; exact neighbours, sklearn
   ``NearestNeighbors``). With cluster labels given (``groupby``) no clustering is done and the
   sample is drawn per cluster (each cluster keeps ``n_fit_cells / n`` of its cells, at least
   two).
2. **probabilities** of any block of rows from the fitted parameters, the block's library sizes
   (size factors ``L / mean(L)`` with the fitted cells' mean) and each cell's cluster: a cell of
   the fitted data (same row position and the same counts, checked by a 64-bit fingerprint of
   the row) keeps its fitted cluster, any other cell is assigned by nearest neighbours. A row's
   probabilities depend on that row and the fitted state only, so blocks stack to the
   whole-matrix result, and memory is one block (dense over the genes) plus the fitted state:
   ``n_clusters x n_genes`` parameters, the sample's principal components (``n_fit_cells x
   n_pcs``) and two numbers per fitted cell (cluster, fingerprint).

A caller that reads rows from a store can fit on the sample alone: :meth:`DropoutModel.draw`
names the sample ``fit`` draws for ``n`` cells (advancing a generator as ``fit`` does, the
clustering's draws included), and ``fit(x_sample, rows=sample, n_obs=n)`` is the same fit from
those rows only; the other cells are then assigned when their probabilities are asked for
(the same nearest-neighbour vote that ``fit`` on all cells makes at fit time).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _norm
from .._logging import get_logger, log_task
from .._utils import RNGLike, as_rng, check_sample_size
from ._cluster import ADP_MAX_CELLS, CellProjection, cluster_cells, cluster_draws
from ._em import _assemble_prob, fit_dropout
from ._zinb import _assemble, fit_zinb_dropout

logger = get_logger(__name__)

#: dropout models of :class:`DropoutModel` (and ``CNNImputer(dropout_model=...)``)
MODELS: tuple[str, ...] = ("zinb", "scimpute")

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def row_fingerprints(x) -> np.ndarray:
    """A 64-bit fingerprint of every row of ``x`` (CSR or ndarray): a hash of its non-zero
    (column, value) pairs, the same for a row whatever the matrix type or block it comes in."""
    x = sp.csr_matrix(x)
    nz = np.asarray(x.data != 0)
    vals = np.ascontiguousarray(x.data, dtype=np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(vals ^ _mix(x.indices.astype(np.uint64) + _GOLDEN))
        h[~nz] = 0
        zero = np.zeros(1, dtype=np.uint64)
        cs = np.concatenate([zero, np.cumsum(h, dtype=np.uint64)])
        cn = np.concatenate([[0], np.cumsum(nz)])
        out = cs[x.indptr[1:]] - cs[x.indptr[:-1]]
        length = (cn[x.indptr[1:]] - cn[x.indptr[:-1]]).astype(np.uint64)
        return out ^ _mix(length + _GOLDEN)


@dataclass
class NeighbourAssigner:
    """Assign cells to the clusters of sampled cells by a vote of their nearest sampled
    neighbours in the sample's principal-component space (ties: the nearer neighbour's)."""

    projection: CellProjection
    pcs: np.ndarray
    codes: np.ndarray
    n_neighbors: int = 10

    def __post_init__(self) -> None:
        from sklearn.neighbors import NearestNeighbors

        k = max(1, min(int(self.n_neighbors), self.pcs.shape[0]))
        self._index = NearestNeighbors(n_neighbors=k).fit(self.pcs)
        self._k = k

    def assign(self, x, block_size: int = 4096) -> np.ndarray:
        """Cluster codes of the cells (rows) of the raw counts ``x``, by blocks of cells."""
        n = x.shape[0]
        out = np.empty(n, dtype=np.int64)
        n_codes = int(self.codes.max()) + 1 if self.codes.size else 1
        # neighbour i (0 = nearest) votes 1 + a tie-breaking share that falls with its rank
        w = 1.0 + 1e-3 * (self._k - np.arange(self._k)) / self._k
        for a in range(0, n, block_size):
            b = min(a + block_size, n)
            idx = self._index.kneighbors(self.projection.transform(x[a:b]),
                                         return_distance=False)
            votes = np.zeros((b - a, n_codes))
            np.add.at(votes, (np.repeat(np.arange(b - a), self._k), self.codes[idx].ravel()),
                      np.tile(w, b - a))
            out[a:b] = votes.argmax(axis=1)
        return out


class DropoutModel:
    """Dropout probabilities fitted on at most ``n_fit_cells`` cells, for any block of rows.

    See :mod:`screpair.dropout._model` for the method.

    Parameters
    ----------
    model
        ``"zinb"`` (:func:`screpair.dropout.fit_zinb_dropout`) or ``"scimpute"``
        (:func:`screpair.dropout.fit_dropout`).
    n_fit_cells
        Largest number of cells clustered and used for the per-cluster fits (``None``: all).
        Up to it, every cell is used and the probabilities are exactly those of the two
        functions on all cells. Above it: 3-D t-SNE and k-means take time (and ADPclust memory,
        already capped at 4,000 cells) that grows with the cells; the parameters come from the
        sample. Measured: 200 of 600 cells of a well-separated Splat simulation give ARI >= 0.9
        against the whole-data clustering (tests); 1,000 of pbmc3k's 2,700 cells ARI 0.742,
        with 91.8 % of the all-cells' entries above 0.5 also above 0.5
        (``benchmarks/README.md``).
    n_neighbors
        Sampled cells voting on the cluster of another cell.
    cluster_kwargs
        Keyword arguments of :func:`screpair.dropout.cluster_cells`.
    fit_kwargs
        Keyword arguments of the model's fit function (e.g. ``inflation``, ``max_iter``,
        ``min_prob``).
    rng
        Seed or Generator (the sample, then the clustering).

    Attributes
    ----------
    clusters_
        Cluster labels (strings), in the row order of the per-cluster parameters.
    fit_cells_
        Sorted rows of the sampled cells (``None``: all cells).
    prob_
        Dropout probabilities of the fitted cells (CSR) when all of them were fitted; ``None``
        when a sample was (they would be held for every cell: get them by blocks of rows with
        :meth:`probabilities`, ``rows=`` their positions).
    labels_
        Cluster label of every fitted cell (strings).
    params_
        The fitted parameters: ``"zinb"``: ``mean`` (clusters x genes), ``dispersion``,
        ``curve``, ``inflation``, ``lib_mean`` (the mean library size of the cells with counts
        that size factors divide by); ``"scimpute"``: ``zero_prob`` (clusters x genes).
    assigner_
        :class:`NeighbourAssigner` of new cells (``None`` when labels were given).
    cell_codes_, cell_hash_
        Cluster code and :func:`row_fingerprints` of every fitted cell (``None`` when labels
        were given); of the sampled cells only when ``fit`` got only those (``rows=``).
    cell_rows_
        Rows of the cells of ``cell_codes_`` (sorted), ``None``: every row of the fitted data.

    Examples
    --------
    >>> from screpair import simulate
    >>> from screpair.dropout import DropoutModel
    >>> sim = simulate.splat(n_obs=60, n_vars=200, group_prob=(0.5, 0.5), rng=0)
    >>> dm = DropoutModel().fit(sim.X, labels=sim.obs["group"])
    >>> p, labels = dm.probabilities(sim.X[:10], labels=sim.obs["group"][:10])
    >>> p.shape
    (10, 200)
    """

    def __init__(
        self,
        *,
        model: str = "zinb",
        n_fit_cells: int | None = None,
        n_neighbors: int = 10,
        cluster_kwargs: dict | None = None,
        fit_kwargs: dict | None = None,
        rng: RNGLike = None,
    ):
        self.model = model
        self.n_fit_cells = n_fit_cells
        self.n_neighbors = n_neighbors
        self.cluster_kwargs = cluster_kwargs
        self.fit_kwargs = fit_kwargs
        self.rng = rng

    def _check_params(self) -> None:
        if self.model not in MODELS:
            msg = f"model must be one of {MODELS}, got {self.model!r}."
            raise ValueError(msg)
        check_sample_size("n_fit_cells", self.n_fit_cells)
        if int(self.n_neighbors) < 1:
            msg = f"n_neighbors must be a positive integer, got {self.n_neighbors!r}."
            raise ValueError(msg)

    # ------------------------------------------------------------------ fit
    def _draw_sample(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """The sorted rows of the sample of ``n`` cells (``None``: all), drawn from ``rng``."""
        cap = None if self.n_fit_cells is None else int(self.n_fit_cells)
        if cap is None or n <= cap:
            return None
        return np.sort(rng.choice(n, size=cap, replace=False))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray | None:
        """The sorted rows of the sample that :meth:`fit` (without labels) of ``n`` cells
        clusters and fits on (``None``: all ``n``), drawn from ``rng``, which is advanced as
        that fit advances it (the sample, then the clustering's draws,
        :func:`screpair.dropout._cluster.cluster_draws`): what the generator gives next is what
        it gives after the fit. Reads no data; ``fit(x[rows], rows=rows, n_obs=n)`` then fits
        on those rows alone."""
        self._check_params()
        sample = self._draw_sample(rng, n)
        kw = self.cluster_kwargs or {}
        cluster_draws(rng, n if sample is None else sample.size,
                      int(kw.get("adp_max_cells", ADP_MAX_CELLS)))
        return sample

    def fit(self, x, *, labels=None, rows: np.ndarray | None = None,
            n_obs: int | None = None) -> DropoutModel:
        """Fit on the raw counts ``x`` (cells x genes, validated CSR or ndarray), clustering
        them unless ``labels`` (one per cell) are given.

        ``rows`` and ``n_obs`` (no ``labels``): ``x`` holds only the rows ``rows`` of a data
        set of ``n_obs`` cells, the sample :meth:`draw` names for ``n_obs`` (read alone from a
        store): the clustering and parameters are those of the fit on all ``n_obs`` cells, the
        sample's draw is still made (``rng`` advances the same way), and the other cells are
        not assigned now but when :meth:`probabilities` gets them (``labels_``: the sampled
        cells' only). Rows other than the drawn ones are taken as given (e.g. a sample drawn
        from other entropy with ``rng=None``).

        ``rng`` is used as it is (a Generator is advanced: the sample, then the clustering).
        """
        self._check_params()
        rng = as_rng(self.rng)
        n = x.shape[0] if rows is None else int(n_obs)
        cap = None if self.n_fit_cells is None else int(self.n_fit_cells)
        sample = None
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
            if labels is not None or cap is None or n <= cap or rows.shape != (cap,) \
                    or x.shape[0] != cap:
                msg = (f"rows= needs no labels, more than n_fit_cells={cap} cells (n_obs={n}) "
                       f"and x holding exactly those rows; got {rows.shape[0]} rows, "
                       f"x with {x.shape[0]}.")
                raise ValueError(msg)
        if labels is None:
            sample = self._draw_sample(rng, n)
            if rows is not None:  # x holds the sample's rows only: the draw advances rng
                sample = rows
            xs = x if sample is None or rows is not None else x[sample]
            with log_task(f"clustering {xs.shape[0]} cells for the dropout model", logger):
                res = cluster_cells(xs, rng=rng, **(self.cluster_kwargs or {}))
            codes_s, uniques = pd.factorize(np.asarray(res.labels), sort=True)
            self.clusters_ = np.asarray(uniques).astype(str)
            self.assigner_ = NeighbourAssigner(res.projection, res.pcs, codes_s,
                                               int(self.n_neighbors))
            codes = codes_s
            self.cell_rows_ = None if rows is None else sample
            if sample is not None and rows is None:
                with log_task(f"assigning {n - cap} cells by nearest sampled neighbours",
                              logger):
                    rest = np.setdiff1d(np.arange(n), sample)
                    codes = np.empty(n, dtype=np.int64)
                    codes[sample] = codes_s
                    codes[rest] = self.assigner_.assign(x[rest])
            self.cell_codes_ = np.asarray(codes, dtype=np.int64)
            self.cell_hash_ = row_fingerprints(x)
        else:
            self.cell_rows_ = None
            labels = _label_array(labels, n)
            codes, uniques = pd.factorize(labels, sort=True)
            self.clusters_ = np.asarray(uniques).astype(str)
            if cap is not None and n > cap:
                sample = _stratified(codes, cap, rng)
            codes_s = codes if sample is None else codes[sample]
            self.assigner_ = self.cell_codes_ = self.cell_hash_ = None
        xs = x if sample is None or rows is not None else x[sample]
        fit_fn = fit_zinb_dropout if self.model == "zinb" else fit_dropout
        with log_task(f"fitting dropout probabilities ({self.model}) on {xs.shape[0]} cells",
                      logger):
            fit = fit_fn(xs, codes_s, **(self.fit_kwargs or {}))
        self.fit_cells_ = sample
        self._store(fit, xs)
        # all cells fitted: the fit's probabilities; a sample: none held (by blocks instead)
        self.prob_ = sp.csr_matrix(fit.prob) if sample is None else None
        self.labels_ = self.clusters_[codes]
        return self

    def _store(self, fit, xs) -> None:
        kw = self.fit_kwargs or {}
        if self.model == "zinb":
            lib = _norm.library_size(xs)
            self.params_ = {
                "mean": fit.mean, "dispersion": fit.dispersion,
                "curve": np.asarray(fit.curve, dtype=np.float64), "inflation": fit.inflation,
                "lib_mean": np.asarray([lib[lib > 0].mean() if np.any(lib > 0) else 1.0]),
            }
            self._prob_kw = {"min_prob": float(kw.get("min_prob", 1e-3)),
                             "dtype": np.dtype(kw.get("dtype", np.float32)).name,
                             "block_size": int(kw.get("block_size", 2**21))}
        else:
            self.params_ = {"zero_prob": fit.zero_prob}
            self._prob_kw = {"dtype": np.dtype(kw.get("dtype", np.float32)).name,
                             "batch_size": int(kw.get("batch_size", 1024))}

    # ------------------------------------------------------------------ probabilities
    def _prob(self, x, codes: np.ndarray) -> sp.csr_matrix:
        """Probabilities of the rows ``x`` whose clusters are ``codes`` (from the fitted
        parameters; cells without counts: 0)."""
        x = x if sp.issparse(x) else sp.csr_matrix(x)
        x = sp.csr_matrix(x)
        lib = _norm.library_size(x)
        ok = lib > 0
        c = np.where(ok, codes, -1)
        kw = self._prob_kw
        dtype = np.dtype(kw["dtype"])
        if self.model == "scimpute":
            return _assemble_prob(x, c, self.params_["zero_prob"], dtype=dtype,
                                  batch_size=kw["batch_size"])
        p = self.params_
        s = np.zeros(x.shape[0])
        s[ok] = lib[ok] / p["lib_mean"][0]
        n_cells, n_genes = x.shape
        step = max(1, kw["block_size"] // max(n_genes, 1))
        blocks = [(a, min(a + step, n_cells)) for a in range(0, n_cells, step)]
        return _assemble(x, c, s, p["mean"], p["dispersion"], tuple(p["curve"]),
                         p["inflation"], blocks, min_prob=kw["min_prob"], dtype=dtype)

    def codes(self, x, *, rows: slice | np.ndarray | None = None, labels=None) -> np.ndarray:
        """Cluster code (row of the per-cluster parameters) of every row of ``x``.

        ``labels`` (one per row; required when the model was fitted with labels) must be
        fitted clusters. Otherwise cells of the fitted data (``rows``: their positions in it,
        a slice or one integer per row of ``x``, and the same counts) keep their fitted
        cluster, the others are assigned by nearest neighbours.
        """
        n = x.shape[0]
        if labels is not None:
            lab = _label_array(labels, n).astype(str)
            lookup = pd.Index(self.clusters_)
            codes = lookup.get_indexer(lab)
            if (codes < 0).any():
                unknown = sorted(set(lab[codes < 0]))[:3]
                msg = (f"cluster label(s) {unknown} were not seen in fit (fitted clusters: "
                       f"{list(self.clusters_)[:10]}); give labels of the fitted clusters.")
                raise ValueError(msg)
            return codes.astype(np.int64)
        if self.assigner_ is None:
            msg = "this dropout model was fitted with cluster labels: pass labels= as well."
            raise ValueError(msg)
        codes = np.full(n, -1, dtype=np.int64)
        pos = self._fitted_positions(rows, n)
        if pos is not None:
            found = pos >= 0
            same = np.zeros(n, dtype=bool)
            same[found] = row_fingerprints(x[np.flatnonzero(found)] if not found.all()
                                           else x) == self.cell_hash_[pos[found]]
            codes[same] = self.cell_codes_[pos[same]]
        new = codes < 0
        if new.any():
            codes[new] = self.assigner_.assign(x[np.flatnonzero(new)] if not new.all() else x)
        return codes

    def _fitted_positions(self, rows, n: int) -> np.ndarray | None:
        """Per row of a block of ``n`` rows at ``rows`` (slice or positions) of the fitted
        data, its index into ``cell_codes_`` (``-1``: not a fitted cell), or ``None``: none."""
        if rows is None or self.cell_codes_ is None:
            return None
        cell_rows = getattr(self, "cell_rows_", None)  # absent: pickled before it existed
        if isinstance(rows, slice):
            if cell_rows is None:  # every fitted row: the slice within them
                start, stop, step = rows.indices(self.cell_codes_.shape[0])
            else:
                start, stop, step = rows.indices((rows.start or 0) + n * (rows.step or 1))
            at = np.arange(start, stop, step)
        else:
            at = np.asarray(rows, dtype=np.int64)
        if at.shape != (n,):
            return None
        if cell_rows is None:
            return np.where((at >= 0) & (at < self.cell_codes_.shape[0]), at, -1)
        idx = np.searchsorted(cell_rows, at)
        hit = idx < cell_rows.size
        hit[hit] = cell_rows[idx[hit]] == at[hit]
        return np.where(hit, idx, -1)

    def probabilities(self, x, *, rows: slice | np.ndarray | None = None,
                      labels=None) -> tuple[sp.csr_matrix, np.ndarray]:
        """Dropout probabilities (CSR, at zero counts only) and cluster labels of the rows of
        the raw counts ``x`` (see :meth:`codes` for ``rows`` and ``labels``)."""
        codes = self.codes(x, rows=rows, labels=labels)
        return self._prob(x, codes), self.clusters_[codes]

    # ------------------------------------------------------------------ persistence
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The fitted model as JSON-able metadata and named arrays (:meth:`from_state`)."""
        meta = {"model": self.model, "clusters": [str(c) for c in self.clusters_],
                "n_neighbors": int(self.n_neighbors), "prob_kw": dict(self._prob_kw),
                "fit_cells": None if self.fit_cells_ is None else int(self.fit_cells_.size)}
        arrays = {f"param.{k}": np.asarray(v) for k, v in self.params_.items()}
        if self.assigner_ is not None:
            a = self.assigner_
            arrays.update({f"proj.{k}": v for k, v in a.projection.arrays().items()})
            arrays["sample.pcs"], arrays["sample.codes"] = a.pcs, a.codes
        if self.cell_codes_ is not None:
            arrays["cell.codes"] = self.cell_codes_
            arrays["cell.hash"] = self.cell_hash_.view(np.int64)
            if getattr(self, "cell_rows_", None) is not None:
                arrays["cell.rows"] = self.cell_rows_
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> DropoutModel:
        """The fitted model saved by :meth:`state` (without ``prob_`` / ``labels_``)."""
        dm = cls(model=meta["model"], n_neighbors=int(meta["n_neighbors"]))
        dm._check_params()
        dm.clusters_ = np.asarray(meta["clusters"], dtype=str)
        dm._prob_kw = dict(meta["prob_kw"])
        dm.fit_cells_ = None
        dm.params_ = {k.removeprefix("param."): np.asarray(v) for k, v in arrays.items()
                      if k.startswith("param.")}
        proj = {k.removeprefix("proj."): np.asarray(v) for k, v in arrays.items()
                if k.startswith("proj.")}
        dm.assigner_ = None
        if proj:
            dm.assigner_ = NeighbourAssigner(CellProjection.from_arrays(proj),
                                             np.asarray(arrays["sample.pcs"]),
                                             np.asarray(arrays["sample.codes"]),
                                             dm.n_neighbors)
        dm.cell_codes_ = dm.cell_hash_ = dm.cell_rows_ = None
        if "cell.rows" in arrays:
            dm.cell_rows_ = np.asarray(arrays["cell.rows"], dtype=np.int64)
        if "cell.codes" in arrays:
            dm.cell_codes_ = np.asarray(arrays["cell.codes"], dtype=np.int64)
            dm.cell_hash_ = np.ascontiguousarray(arrays["cell.hash"], dtype=np.int64).view(
                np.uint64)
        dm.prob_ = dm.labels_ = None
        return dm


def _label_array(labels, n: int) -> np.ndarray:
    lab = labels.to_numpy() if isinstance(labels, (pd.Series, pd.Categorical)) else labels
    lab = np.asarray(lab)
    if lab.ndim != 1 or lab.shape[0] != n:
        msg = f"labels must be 1-D with one entry per cell ({n}), got shape {lab.shape}."
        raise ValueError(msg)
    return lab


def _stratified(codes: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted rows of about ``cap`` cells: each cluster keeps its share of them (at least two
    cells, or all it has)."""
    n = codes.size
    out = []
    for c in range(int(codes.max()) + 1):
        rows = np.flatnonzero(codes == c)
        m = min(rows.size, max(2, int(round(rows.size * cap / n))))
        out.append(rng.choice(rows, size=m, replace=False))
    return np.sort(np.concatenate(out))
