"""Cell clustering of cnnImpute: log2 normalized counts, PCA, 3-D t-SNE, ADPclust, k-means.

cnnImpute (Zhang et al. 2024) labels cells before estimating dropout probabilities::

    tsne_input <- log2(t(t(counts) / colSums(counts)) * 1e6 + 1)
    tsne <- Rtsne(t(tsne_input), dims = 3, perplexity = if (n <= 30) 5 else 30)
    adp <- adpclust(tsne$Y, htype = "amise", centroids = "auto")
    kmeans(tsne$Y, tsne$Y[adp$centers, ], ...)

This module does the same in Python, with one documented change to the preprocessing by default
(1e4 scaling, 2,000 highly-variable genes, unit-variance genes, 10 PCs; see
:func:`cluster_cells`, whose parameters restore cnnImpute's exact input):

- **input**: ``log2(x / L * target_sum + 1)`` (:func:`screpair._norm.log_normalize`) of the
  ``n_top_genes`` highly-variable genes, each scaled to unit variance (``scale=True``); cnnImpute
  takes ``log2(CPM + 1)`` of every gene, unscaled.
- **t-SNE**: Rtsne first reduces the data to 50 principal components (its default
  ``pca = TRUE, initial_dims = 50``, centred, not scaled); we keep ``n_pcs`` (10 by default,
  cnnImpute: 50) centred components (randomized PCA on a dense float32 copy up to 2.5e8 entries,
  ARPACK on the sparse matrix beyond, which only unscaled input can reach). The 3-D
  embedding is computed by openTSNE's Barnes-Hut solver (its FFT solver is 2-D only) from exact
  nearest neighbours (``3 * perplexity`` of them), with openTSNE's defaults otherwise (PCA
  initialisation, 250 early-exaggeration + 500 iterations; Rtsne runs 1000 in all).
- **ADPclust** (Wang & Xu, Stat Methods Med Res 2017, "Fast clustering using adaptive density peak
  detection"), written from the paper: each embedding dimension is divided by its standard
  deviation, so that one bandwidth ``h`` on the scaled data is the per-dimension bandwidth
  ``h_l = h * sd_l`` of the normal-reference (AMISE) rule
  ``h = (4 / (d + 2))^(1 / (d + 4)) * n^(-1 / (d + 4))``. The local density is the Gaussian kernel
  sum ``f(x_i) = sum_j exp(-|z_i - z_j|^2 / (2 h^2))``, and the isolation ``delta(x_i)`` is the
  distance to the nearest point of higher density (the densest point gets the largest other
  delta). For every bandwidth on a grid of 10 from ``h/3`` to ``3h``, every density cut (the 10th,
  20th, 30th percentile of ``f``) and every number of clusters ``k`` (2 to 10), the centres are the
  ``k`` points of largest ``delta`` among those with ``f`` above the cut; every point joins its
  nearest centre, and the candidate with the largest mean silhouette wins.
- **k-means** (scikit-learn, Lloyd) on the embedding, initialised at the winning centres.
  cnnImpute calls R's ``kmeans`` (Hartigan-Wong) and, by its positional arguments, lets it run at
  most ``k`` iterations; here it runs to convergence.

Density, delta and silhouettes take O(n^2) time and memory; above ``adp_max_cells`` cells ADPclust
runs on a random subsample of that size (the k-means step always uses every cell).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .. import _norm
from .._logging import get_logger, log_task
from .._utils import RNGLike, as_rng, get_counts

logger = get_logger(__name__)


@dataclass
class ClusterResult:
    """Result of :func:`cluster_cells`.

    Attributes
    ----------
    labels
        Cluster of every cell, ``0 … n_clusters - 1``.
    embedding
        The 3-D t-SNE embedding (n_cells x 3).
    centers
        Cell indices of the density-peak centres that initialised k-means (cluster ``j`` started at
        ``centers[j]``).
    n_clusters
        Number of clusters.
    silhouette
        Mean silhouette of the winning ADPclust candidate (on the scaled embedding).
    bandwidth
        The winning bandwidth ``h`` (on the scaled embedding).
    candidates
        Every tested candidate: ``(h, f_cut, k, silhouette)`` tuples, in the order tried.
    pcs
        The principal component scores t-SNE was computed from (n_cells x n_pcs).
    projection
        The fitted preprocessing and PCA (:class:`CellProjection`): the principal components
        of other cells, e.g. to assign them to these clusters by nearest neighbours.
    """

    labels: np.ndarray
    embedding: np.ndarray
    centers: np.ndarray
    n_clusters: int
    silhouette: float = float("nan")
    bandwidth: float = float("nan")
    candidates: list[tuple[float, float, int, float]] = field(default_factory=list)
    pcs: np.ndarray | None = None
    projection: CellProjection | None = None


@dataclass
class CellProjection:
    """The preprocessing and PCA of :func:`cluster_cells`, fitted on its cells, for any cells.

    :meth:`transform` maps raw counts of any cells (a block of rows) to the principal components
    of the fitted cells: ``log2(x / L * target_sum + 1)`` of the fitted highly-variable genes,
    centred and scaled by the fitted cells' means and standard deviations (clipped at 10), then
    projected on the fitted components (``(y - pca_mean) @ components.T``). Memory: one dense
    block of cells x ``genes``.

    Attributes
    ----------
    target_sum
        Library size every cell is scaled to (``target_sum=None`` of :func:`cluster_cells`:
        the median library size of the fitted cells).
    genes
        Column indices of the genes embedded (``None``: all).
    scale_mean, scale_sd
        Per-gene centring and scaling (``None`` without ``scale``).
    pca_mean, components
        PCA centre and components (n_pcs x genes); ``components=None``: the centred values
        themselves (too few cells or genes for a PCA).
    """

    target_sum: float
    genes: np.ndarray | None
    scale_mean: np.ndarray | None
    scale_sd: np.ndarray | None
    pca_mean: np.ndarray
    components: np.ndarray | None

    def transform(self, x) -> np.ndarray:
        """Principal components (n_cells x n_pcs, float64) of the raw counts ``x`` (cells x all
        fitted genes, CSR or ndarray)."""
        y = _norm.log_normalize(x, self.target_sum, base=2.0)
        if self.genes is not None:
            y = y[:, self.genes]
        if self.scale_mean is not None:
            y = y.toarray() if sp.issparse(y) else np.array(y, dtype=np.float64)
            y = np.clip((y - self.scale_mean) / self.scale_sd, -10, 10)
        if self.components is None:
            y = y.toarray() if sp.issparse(y) else np.asarray(y, dtype=np.float64)
            return y - self.pca_mean
        comp = self.components
        if sp.issparse(y):
            return np.asarray(y @ comp.T, dtype=np.float64) - self.pca_mean @ comp.T
        y = np.asarray(y, dtype=comp.dtype)
        return np.asarray((y - self.pca_mean) @ comp.T, dtype=np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted arrays by name (for saving; :meth:`from_arrays` reads them back)."""
        out = {"target_sum": np.asarray([self.target_sum], dtype=np.float64),
               "pca_mean": self.pca_mean}
        for name in ("genes", "scale_mean", "scale_sd", "components"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CellProjection:
        """The projection saved by :meth:`arrays`."""
        return cls(target_sum=float(arrays["target_sum"][0]),
                   genes=arrays.get("genes"), scale_mean=arrays.get("scale_mean"),
                   scale_sd=arrays.get("scale_sd"), pca_mean=arrays["pca_mean"],
                   components=arrays.get("components"))


# --------------------------------------------------------------------------- preprocessing


def log_cpm(
    x, *, base: float = 2.0, pseudocount: float = 1.0, target_sum: float | None = _norm.CPM
):
    """``log_base(x / L * target_sum + pseudocount)`` per cell: ``log2(CPM + 1)`` by default, the
    t-SNE input of cnnImpute.

    The scaling is :func:`screpair._norm.normalize` (``target_sum=None``: the median of the
    positive library sizes) and, for ``pseudocount == 1``, the log is
    :func:`screpair._norm.log1p` in ``base``, so this is
    ``_norm.log_normalize(x, target_sum, base=base)`` (sparse input stays CSR). Another
    pseudocount gives a dense ``log(x' + pseudocount) / log(base)``. Cells without counts stay all
    zero.
    """
    lib = _norm.library_size(x)
    if target_sum is None and not np.any(lib > 0):
        target_sum = 1.0  # no counts at all: nothing to scale, and no median to take
    y = _norm.normalize(x, target_sum, lib)
    if pseudocount == 1.0:
        return _norm.log1p(y, base)
    y = y.toarray() if sp.issparse(y) else y
    return np.log(y + pseudocount) / np.log(base)


def _pca(
    y, n_pcs: int, seed: int, *, max_dense: int = 250_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Centred PCA scores (Rtsne's ``initial_dims``), the centre and the components (``None``:
    the centred values are the scores).

    Randomized PCA on a dense float32 copy when it has at most ``max_dense`` entries (1 GB; much
    faster than ARPACK on a sparse matrix), else ARPACK with implicit centring on the sparse matrix.
    """
    from sklearn.decomposition import PCA

    n, g = y.shape
    if n_pcs >= min(n, g) - 1:
        dense = y.toarray() if sp.issparse(y) else np.asarray(y, dtype=np.float64)
        mean = dense.mean(axis=0)
        return dense - mean, mean, None
    if sp.issparse(y) and n * g > max_dense:
        pca = PCA(n_components=n_pcs, svd_solver="arpack", random_state=seed)
        return pca.fit_transform(y), pca.mean_, pca.components_
    dense = y.toarray() if sp.issparse(y) else np.asarray(y)
    dense = dense.astype(np.float32, copy=False)
    pca = PCA(n_components=n_pcs, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(dense).astype(np.float64), pca.mean_, pca.components_


def tsne_3d(
    pcs: np.ndarray, *, perplexity: float | None = None, seed: int = 0, n_jobs: int = 1
) -> np.ndarray:
    """3-D Barnes-Hut t-SNE (openTSNE) from exact nearest neighbours.

    Needs openTSNE (scikit-learn's 3-D Barnes-Hut t-SNE was ~20x slower in our tests).

    ``perplexity=None`` uses cnnImpute's rule: 30, or 5 for at most 30 cells. It is lowered to
    ``(n - 1) / 3`` when there are too few cells for ``3 * perplexity`` neighbours.
    """
    n = pcs.shape[0]
    if perplexity is None:
        perplexity = 5.0 if n <= 30 else 30.0
    if perplexity <= 0:
        msg = f"perplexity must be > 0, got {perplexity}."
        raise ValueError(msg)
    perplexity = min(float(perplexity), (n - 1) / 3.0)
    k = max(1, min(n - 1, int(3 * perplexity)))
    pcs = np.ascontiguousarray(pcs, dtype=np.float64)
    try:
        from openTSNE import TSNE, affinity
        from openTSNE.nearest_neighbors import PrecomputedNeighbors
    except ImportError as e:
        e.add_note("The cnnImpute clustering needs openTSNE: `pip install openTSNE`.")
        raise
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(pcs).kneighbors()
    aff = affinity.PerplexityBasedNN(
        perplexity=perplexity, knn_index=PrecomputedNeighbors(idx, dist), n_jobs=n_jobs
    )
    tsne = TSNE(n_components=3, negative_gradient_method="bh", random_state=seed, n_jobs=n_jobs)
    return np.asarray(tsne.fit(pcs, affinities=aff), dtype=np.float64)


# --------------------------------------------------------------------------- ADPclust


def amise_bandwidth(n: int, d: int) -> float:
    """Normal-reference (AMISE-optimal) bandwidth for standardised data: ``(4/(d+2))^(1/(d+4)) n^(-1/(d+4))``."""
    return (4.0 / (d + 2.0)) ** (1.0 / (d + 4.0)) * n ** (-1.0 / (d + 4.0))


def _sq_dist(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def density_delta(dist: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """ADPclust's Gaussian local density ``f`` and isolation ``delta`` from a distance matrix.

    ``f_i = sum_j exp(-(d_ij / h)^2 / 2)`` (the point itself included); ``delta_i`` is the distance to
    the nearest point earlier in the order of decreasing ``f`` (ties keep index order); the densest
    point gets the largest other ``delta``.
    """
    n = dist.shape[0]
    f = np.exp(-0.5 * (dist / h) ** 2).sum(axis=1)
    order = np.argsort(-f, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    delta = np.empty(n)
    for start in range(0, n, 512):
        rows = order[start : start + 512]
        block = dist[rows]
        block = np.where(rank[None, :] < rank[rows, None], block, np.inf)
        delta[rows] = block.min(axis=1)
    if n > 1:
        delta[order[0]] = np.max(delta[order[1:]])
    else:
        delta[order[0]] = 0.0
    return f, delta


def silhouette_from_dist(dist: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette width (singletons score 0, as in R's ``cluster::silhouette``)."""
    n = dist.shape[0]
    k = int(labels.max()) + 1
    onehot = np.zeros((n, k))
    onehot[np.arange(n), labels] = 1.0
    sums = dist @ onehot
    size = onehot.sum(axis=0)
    own = sums[np.arange(n), labels]
    own_size = size[labels]
    with np.errstate(invalid="ignore", divide="ignore"):
        a = own / (own_size - 1.0)
        other = sums / size
    other[np.arange(n), labels] = np.inf
    other[:, size == 0] = np.inf
    b = other.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (b - a) / np.maximum(a, b)
    s = np.where((own_size <= 1) | ~np.isfinite(s), 0.0, s)
    return float(s.mean())


def adpclust(
    y: np.ndarray,
    *,
    n_clusters: int | Sequence[int] = range(2, 11),
    f_cut: Sequence[float] = (0.1, 0.2, 0.3),
    n_bandwidths: int = 10,
) -> tuple[np.ndarray, np.ndarray, float, float, list]:
    """Adaptive density-peak clustering (Wang & Xu) with automatic centre selection.

    Parameters
    ----------
    y
        Points (n x d), e.g. a t-SNE embedding.
    n_clusters
        Candidate numbers of clusters.
    f_cut
        Density percentiles (0-1): only points with ``f`` at or above the percentile can be centres.
    n_bandwidths
        Size of the bandwidth grid from ``h/3`` to ``3h`` around the AMISE bandwidth ``h``.

    Returns
    -------
    ``(labels, centers, silhouette, h, candidates)``: nearest-centre labels of the winning candidate,
    its centre indices (ordered by decreasing ``delta``), its mean silhouette, its bandwidth, and
    every tested ``(h, f_cut, k, silhouette)``.
    """
    y = np.asarray(y, dtype=np.float64)
    n, d = y.shape
    ks = sorted({int(n_clusters)} if np.isscalar(n_clusters) else {int(k) for k in n_clusters})
    if not ks or ks[0] < 2:
        msg = f"n_clusters must be integers >= 2, got {n_clusters!r}."
        raise ValueError(msg)
    if any(not 0 <= c < 1 for c in f_cut):
        msg = f"f_cut values must be in [0, 1), got {f_cut!r}."
        raise ValueError(msg)
    sd = y.std(axis=0, ddof=1)
    z = y / np.where(sd > 0, sd, 1.0)
    dist = np.sqrt(_sq_dist(z))
    h0 = amise_bandwidth(n, d)
    h_grid = np.linspace(h0 / 3.0, 3.0 * h0, n_bandwidths) if n_bandwidths > 1 else np.array([h0])
    cache: dict[tuple[int, ...], tuple[float, np.ndarray]] = {}
    best = None
    candidates = []
    for h in h_grid:
        f, delta = density_delta(dist, h)
        for cut in f_cut:
            f0 = np.quantile(f, cut)
            eligible = f >= f0
            d1 = np.where(eligible, delta, -np.inf)
            top = np.argsort(-d1, kind="stable")
            for k in ks:
                if k > eligible.sum() or k > n - 1:
                    continue
                centers = top[:k]
                key = tuple(centers.tolist())
                if key not in cache:
                    labels = np.argmin(dist[:, centers], axis=1)
                    cache[key] = (silhouette_from_dist(dist, labels), labels)
                sil, labels = cache[key]
                candidates.append((float(h), float(cut), k, sil))
                if best is None or sil > best[0]:
                    best = (sil, labels, centers, float(h))
    if best is None:
        msg = f"no candidate number of clusters fits {n} points (n_clusters={ks})."
        raise ValueError(msg)
    sil, labels, centers, h = best
    return labels, np.asarray(centers), sil, h, candidates


# --------------------------------------------------------------------------- pipeline
#: default ``adp_max_cells`` of :func:`cluster_cells`
ADP_MAX_CELLS = 4000


def cluster_draws(gen: np.random.Generator, n: int,
                  adp_max_cells: int = ADP_MAX_CELLS) -> tuple[tuple[int, int, int], np.ndarray]:
    """Every draw :func:`cluster_cells` makes from its generator ``gen`` for ``n`` cells, in
    its order: the seeds of the PCA, t-SNE and k-means, then the sorted rows of ADPclust's
    subsample (all rows up to ``adp_max_cells``). ``gen`` is advanced as the clustering
    advances it, so a caller can tell what the generator gives after a clustering without
    running it (:meth:`screpair.dropout.DropoutModel.draw`)."""
    seeds = tuple(int(s) for s in gen.integers(0, 2**31 - 1, size=3))
    if n > adp_max_cells:
        sub = np.sort(gen.choice(n, size=adp_max_cells, replace=False))
    else:
        sub = np.arange(n)
    return seeds, sub



def cluster_cells(
    x,
    *,
    perplexity: float | None = None,
    rng: RNGLike = 0,
    n_clusters: int | Sequence[int] = range(2, 11),
    n_pcs: int = 10,
    f_cut: Sequence[float] = (0.1, 0.2, 0.3),
    n_bandwidths: int = 10,
    adp_max_cells: int = ADP_MAX_CELLS,
    target_sum: float | None = 1e4,
    n_top_genes: int | None = 2000,
    scale: bool = True,
    n_jobs: int = 1,
) -> ClusterResult:
    """Cluster cells as cnnImpute does: log2 normalized → PCA → 3-D t-SNE → ADPclust → k-means.

    Parameters
    ----------
    x
        Raw counts (cells x genes), CSR or ndarray.
    perplexity
        t-SNE perplexity; ``None``: 30, or 5 for at most 30 cells (cnnImpute).
    rng
        Seed or Generator for PCA, t-SNE, the ADPclust subsample and k-means.
    n_clusters
        Candidate numbers of clusters for ADPclust (ADPclust's default 2-10), or one number.
    n_pcs
        Principal components fed to t-SNE (Rtsne's ``initial_dims``; cnnImpute: 50).
    f_cut, n_bandwidths
        ADPclust's density cuts and bandwidth-grid size (see :func:`adpclust`).
    adp_max_cells
        ADPclust (O(n^2)) runs on a random subsample of this many cells when there are more.
    target_sum
        Library size every cell is scaled to before ``log2(. + 1)``; cnnImpute uses 1e6 (CPM),
        ``None`` uses the median library size. With deep libraries and many dropouts, CPM puts one
        count far from zero (``log2(1e6 / 60000 + 1) = 4.1``), so the zero/non-zero pattern
        dominates the embedding.
    n_top_genes
        Embed only this many highly-variable genes (:func:`screpair.pp.highly_variable_genes`'s
        dispersion ranking); ``None`` uses every gene, as cnnImpute does.
    scale
        Scale each gene to unit variance (clipped at 10 sd) before PCA, as scanpy/Seurat do;
        cnnImpute does not.
    n_jobs
        Threads for t-SNE (results do not depend on it).

    Returns
    -------
    :class:`ClusterResult`.

    Notes
    -----
    The defaults (1e4 scaling, 2,000 HVGs, scaling, 10 PCs) depart from cnnImpute's
    preprocessing (``target_sum=1e6, n_top_genes=None, scale=False, n_pcs=50``), which is one
    call away. On the cnnImpute Splatter preset (2,000 cells, 5 groups) the paper's preprocessing
    found 2 clusters (ARI 0.004 against the simulated groups); the defaults find 5 (ARI
    0.98-0.99 over seeds 0-2). On Baron mouse pancreas (13 types) the ARI is 0.75 with the
    defaults and 0.59 with cnnImpute's preprocessing.
    t-SNE, ADPclust and k-means are unchanged.
    """
    x = get_counts(x, warn_empty=False)
    n = x.shape[0]
    if n < 4:
        msg = f"clustering needs at least 4 cells, got {n}."
        raise ValueError(msg)
    (seed_pca, seed_tsne, seed_km), sub = cluster_draws(as_rng(rng), n, adp_max_cells)
    with log_task(f"clustering {n} cells (log2 normalized, PCA, 3-D t-SNE, ADPclust, k-means)",
                  logger):
        with log_task("log2 normalized + PCA", logger):
            y = _norm.log_normalize(x, target_sum, base=2.0)
            genes = scale_mean = scale_sd = None
            if n_top_genes is not None and n_top_genes < y.shape[1]:
                from ..pp import hvg_dispersion

                hv = hvg_dispersion(x, n_top_genes)["highly_variable"].to_numpy()
                genes = np.flatnonzero(hv)
                y = y[:, hv]
            if scale:
                y = y.toarray() if sp.issparse(y) else np.array(y, dtype=np.float64)
                sd = y.std(axis=0)
                scale_mean, scale_sd = y.mean(axis=0), np.where(sd > 0, sd, 1.0)
                y = np.clip((y - scale_mean) / scale_sd, -10, 10)
            pcs, pca_mean, components = _pca(y, min(n_pcs, y.shape[1]), seed_pca)
            del y
        with log_task("3-D t-SNE", logger):
            emb = tsne_3d(pcs, perplexity=perplexity, seed=seed_tsne, n_jobs=n_jobs)
        with log_task("ADPclust", logger):
            _, centers, sil, h, cands = adpclust(
                emb[sub], n_clusters=n_clusters, f_cut=f_cut, n_bandwidths=n_bandwidths
            )
        centers = sub[centers]
        labels = _kmeans(emb, centers, seed_km)
    logger.info("found %d clusters (silhouette %.3f)", centers.size, sil)
    return ClusterResult(
        labels=labels,
        embedding=emb,
        centers=centers,
        n_clusters=int(labels.max()) + 1,
        silhouette=sil,
        bandwidth=h,
        candidates=cands,
        pcs=pcs,
        projection=CellProjection(
            target_sum=_resolved_target(x, target_sum), genes=genes, scale_mean=scale_mean,
            scale_sd=scale_sd, pca_mean=pca_mean, components=components,
        ),
    )


def _resolved_target(x, target_sum: float | None) -> float:
    """``target_sum``, or the median positive library size that ``None`` stands for."""
    if target_sum is not None:
        return float(target_sum)
    lib = _norm.library_size(x)
    return float(np.median(lib[lib > 0])) if np.any(lib > 0) else 1.0


def _kmeans(emb: np.ndarray, centers: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=centers.size, init=emb[centers], n_init=1, random_state=seed)
    labels = km.fit_predict(emb)
    # clusters that k-means emptied are dropped; relabel 0..k-1 in order of first centre
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int64)
