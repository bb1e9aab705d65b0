"""k-nearest-neighbour smoothing baseline (knn-smoothing style)."""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from sklearn.neighbors import NearestNeighbors

from .. import _norm
from .._chunks import as_float64
from .._logging import get_logger
from .._utils import RNGLike, as_rng, check_sample_size
from ._base import (
    BaseImputer,
    DataContext,
    Posterior,
    draw_sample,
    sample_rows,
    take_rows,
)

logger = get_logger(__name__)

#: cells up to which the neighbours are exact (scanpy's dense-distance limit for euclidean kNN)
EXACT_MAX_CELLS = 8192


def pca_components(x, n_components: int, *, seed: int, n_iter: int = 5,
                   n_oversamples: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The column means ``(genes,)`` of ``x`` (cells x genes, dense or CSR) and the
    ``(n_components, genes)`` principal axes of ``x`` centred by them, without forming the
    centred (dense) matrix; the fit behind :func:`centred_pca`, whose scores are
    :func:`pca_scores` of ``x`` on them."""
    n, g = x.shape
    mean = np.asarray(x.mean(axis=0), dtype=np.float64).ravel()

    def c_dot(q):  # C @ q, q: (g, r)
        return np.asarray(x @ q) - mean @ q

    def ct_dot(q):  # C.T @ q, q: (n, r)
        return np.asarray(x.T @ q) - np.outer(mean, q.sum(axis=0))

    size = n_components + n_oversamples
    transpose = n < g
    a_dot, at_dot = (ct_dot, c_dot) if transpose else (c_dot, ct_dot)  # A = C.T or C
    rs = np.random.RandomState(seed)
    q = rs.normal(size=(n if transpose else g, size))
    lu = (lambda m: sla.lu(m, permute_l=True, check_finite=False)[0]) if n_iter > 2 else (
        lambda m: m)
    for _ in range(n_iter):
        q = lu(a_dot(q))
        q = lu(at_dot(q))
    q, _ = sla.qr(a_dot(q), mode="economic", check_finite=False)
    b = at_dot(q).T  # Q.T @ A
    uhat, _, vt = sla.svd(b, full_matrices=False, lapack_driver="gesdd")
    u = q @ uhat
    components = u[:, :n_components].T if transpose else vt[:n_components]
    # svd_flip(u_based_decision=False): the largest |loading| of each component is positive
    signs = np.sign(components[np.arange(components.shape[0]),
                               np.argmax(np.abs(components), axis=1)])
    return mean, components * signs[:, None]


def pca_scores(x, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """The scores ``(x - 1 mean^T) @ components.T`` of the rows of ``x`` (dense or CSR),
    computed as ``x @ components.T - mean @ components.T`` (implicit centring). A row's scores
    depend on that row alone, so blocks of rows stack to the scores of all of them (bit for
    bit for CSR, whose product is taken row by row; up to BLAS rounding for dense rows)."""
    q = components.T
    return np.asarray(x @ q) - mean @ q


def centred_pca(x, n_components: int, *, seed: int, n_iter: int = 5,
                n_oversamples: int = 10) -> np.ndarray:
    """Principal component scores of ``x`` (cells x genes, dense or CSR) centred by its column
    means, without forming the centred (dense) matrix.

    Every product with the centred matrix ``C = x - 1 m^T`` is taken as ``x @ q - 1 (m^T q)``
    (implicit centring, as scanpy's sparse PCA and sklearn's ``PCA(svd_solver="arpack")`` do
    with a ``LinearOperator``), so memory is ``x`` plus a few ``cells x (n_components + 10)``
    blocks. The algorithm is the one of ``sklearn.decomposition.TruncatedSVD`` (randomized
    range finder with LU-normalized power iterations, Halko et al. 2011; the transposed problem
    when cells < genes; signs by ``svd_flip(u_based_decision=False)``; scores ``C @ V``) with
    the same random draws for a given ``seed``, so it reproduces ``TruncatedSVD(n_components,
    random_state=seed).fit_transform(C)`` up to rounding. The axes and means are
    :func:`pca_components`, the scores :func:`pca_scores`.
    """
    mean, components = pca_components(x, n_components, seed=seed, n_iter=n_iter,
                                      n_oversamples=n_oversamples)
    return pca_scores(x, mean, components)


def nearest_neighbors(pcs: np.ndarray, k: int, *, exact_max_cells: int = EXACT_MAX_CELLS,
                      seed: int = 0) -> np.ndarray:
    """Indices ``(n, k)`` of each point's ``k`` nearest points (itself included, first unless
    duplicates tie) in euclidean distance: exact (sklearn ``NearestNeighbors``) up to
    ``exact_max_cells`` points, approximate above (pynndescent's ``NNDescent`` with umap's /
    scanpy's settings: ``n_trees = min(64, 5 + round(sqrt(n) / 20))``,
    ``n_iters = max(5, round(log2(n)))``)."""
    n = pcs.shape[0]
    if n <= exact_max_cells or k >= n:
        _, idx = NearestNeighbors(n_neighbors=k).fit(pcs).kneighbors(pcs)
    else:
        from pynndescent import NNDescent

        logger.info("kNN: approximate neighbours (pynndescent) for %d cells > %d", n,
                    exact_max_cells)
        index = NNDescent(
            pcs, n_neighbors=k, random_state=seed,
            n_trees=min(64, 5 + int(round(n**0.5 / 20.0))),
            n_iters=max(5, int(round(np.log2(n)))), low_memory=True,
        )
        idx = index.neighbor_graph[0].astype(np.int64)
    # make sure each cell is in its own neighbourhood even with duplicate points
    self_missing = ~(idx == np.arange(n)[:, None]).any(1)
    idx[self_missing, -1] = np.flatnonzero(self_missing)
    return idx


#: the neighbourhood sizes ``KNNImputer(k="mcv")`` chooses from
MCV_K_GRID = (5, 10, 15, 30, 50, 100)
#: what ``KNNImputer`` averages: CP10k profiles (``"counts"``) or log1p(CPM) (``"log"``, MAGIC's)
SPACES = ("counts", "log")
MCV_LOSSES = ("mse", "poisson")
_BLOCK = 1024  # rows per block of the calibration's dense predictions
#: default ``n_fit_cells``: most cells the PCA axes are fitted on (above: a sample of them)
N_FIT_CELLS = 50_000
#: rows per block of the log-normalized rows projected on the sample's PCA axes (a block's
#: log-normalizing holds a few CSR copies of it: about 8 MB each at 2,000 genes, 17 % non-zero)
_PROJECT_ROWS = 2048
#: rows of ``W^steps`` smoothed at a time: their neighbours' counts are taken as float64
_SMOOTH_ROWS = 1024


def neighbor_matrix(idx: np.ndarray, k: int | None = None, *,
                    n_cols: int | None = None) -> sp.csr_matrix:
    """Row-stochastic ``(rows, n)`` matrix ``W`` averaging each row's first ``k`` neighbours of
    ``idx`` (``(rows, >= k)`` indices into ``n`` points; ``n`` is ``n_cols``, default
    ``max(rows, idx.max() + 1)``: all rows given). ``k=None``: all columns of ``idx``."""
    idx = idx if k is None else idx[:, :k]
    n, k = idx.shape
    cols = max(n, int(idx.max()) + 1) if n_cols is None else int(n_cols)
    return sp.csr_matrix((np.full(n * k, 1.0 / k), idx.ravel(), np.arange(0, n * k + 1, k)),
                         shape=(n, cols))


def _local(p: sp.csr_matrix) -> tuple[np.ndarray, sp.csr_matrix]:
    """The columns ``support`` that ``p`` uses (sorted) and ``p`` restricted to them (its
    entries in the same order, column ``j`` renumbered to its place in ``support``), so
    ``p @ m == p_local @ m[support]`` with the same arithmetic."""
    support, local = np.unique(p.indices, return_inverse=True)
    return support, sp.csr_matrix((p.data, local.astype(p.indices.dtype), p.indptr),
                                  shape=(p.shape[0], support.size))


def walk_rows(idx: np.ndarray, rows, steps: int = 1) -> sp.csr_matrix:
    """The rows ``rows`` (a slice or indices) of ``W^steps`` as sparse ``(rows, n)``, ``W`` the
    row-stochastic neighbour matrix of ``idx`` (``(n, k)``, :func:`neighbor_matrix`).

    Computed as ``W[rows] @ W @ ... @ W`` where each product takes only the rows of ``W`` that
    the previous factor uses (its non-zero columns), so neither ``W`` nor ``W^steps`` is
    formed; the entries and their order are those of the product with the whole ``W``, so the
    result is the same bit for bit. Memory: the sparse rows of ``W^steps`` (at most
    ``rows x min(n, k^steps)``)."""
    n = idx.shape[0]
    p = neighbor_matrix(idx[rows], n_cols=n)
    for _ in range(int(steps) - 1):
        support, p = _local(p)
        p = p @ neighbor_matrix(idx[support], n_cols=n)
    return p


def smooth_rows(counts, lib: np.ndarray, idx: np.ndarray, rows, *, steps: int = 1,
                space: str = "counts") -> np.ndarray:
    """The averaged profiles ``(W^steps)[rows] @ V`` (dense ``(rows, genes)``) of the cells
    whose validated counts are ``counts`` (all ``n`` of them, library sizes ``lib``) and whose
    neighbours are ``idx`` (``(n, k)``), ``V`` their CP10k profiles (``space="counts"``) or
    log1p(CPM) values (``"log"``); ``V`` is never formed for all cells.

    - ``"counts"``: the per-cell scaling is folded into the weights: ``P' = P diag(1e4 / L)``
      (``P`` the rows of ``W^steps``, :func:`walk_rows`; 0 for ``L = 0``) and the result is
      ``P' @ counts``, a product with the counts themselves (no copy). Each term is
      ``(w * (1e4 / L_j)) * x_jg`` where averaging the CP10k values takes
      ``w * (x_jg * (1e4 / L_j))``: the same sum, rounded differently (relative differences of
      a few ulp, measured in :class:`KNNImputer`).
    - ``"log"``: the log is not linear, so the rows the block averages (the non-zero columns of
      ``P``) are taken from ``counts`` and log-normalized, then averaged: the same arithmetic
      as averaging all cells' log1p(CPM) values, bit for bit.
    """
    p = walk_rows(idx, rows, steps)
    out = np.empty((p.shape[0], counts.shape[1]))
    for r in _row_blocks(p.shape[0], _SMOOTH_ROWS):
        out[r] = _smooth(p[r], counts, lib, space)
    return out


def _smooth(p: sp.csr_matrix, counts, lib: np.ndarray, space: str) -> np.ndarray:
    """``p @ V`` (see :func:`smooth_rows`) from the rows of ``counts`` that ``p`` uses, taken as
    float64 (``counts`` may hold its values compactly): the product with all of ``counts`` would
    convert all of them to ``p``'s type; ``p_local @ counts[support]`` is the same arithmetic."""
    if space == "counts":
        p.data *= _norm.scale_factors(lib[p.indices], _norm.CP10K)
    support, p = _local(p)
    v = as_float64(take_rows(counts, support))
    out = p @ (v if space == "counts" else _norm.log_normalize(v, _norm.CPM, lib=lib[support]))
    return out.toarray() if sp.issparse(out) else np.asarray(out)


def _to_counts(smooth: np.ndarray, lib: np.ndarray, space: str) -> np.ndarray:
    """Averaged values back on the count scale of library sizes ``lib`` (in place for
    ``"counts"``)."""
    if space == "counts":
        smooth *= (lib / _norm.CP10K)[:, None]  # _norm.unnormalize, in place
        return smooth
    return _norm.to_counts(smooth, lib, _norm.CPM)


def _row_blocks(n: int, size: int):
    for lo in range(0, n, size):
        yield slice(lo, min(lo + size, n))


def _stack(blocks: list):
    return sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.vstack(blocks)


def _neighbors_of(x, k: int, n_pcs: int, *, seed: int, exact_max_cells: int,
                  sample: np.ndarray | None = None, sample_counts=None) -> np.ndarray:
    """Each cell's ``k`` nearest cells in the centred PCA of log1p(CP10k) of ``x``.

    ``sample`` (sorted rows of ``x``): the PCA axes and centring mean are fitted on those rows
    only (their counts ``sample_counts`` when given, else taken from ``x``) and every cell's
    scores are the projection of its log1p(CP10k) row on them, computed by blocks of
    :data:`_PROJECT_ROWS` rows (``x`` may be a :class:`screpair._chunks.CountsFile`); memory
    is the sample's log values, one block's and the ``cells x n_pcs`` scores, never a log copy
    of all cells."""
    if sample is None or x.shape[1] < 2:
        lg = _norm.log_normalize(as_float64(x), _norm.CP10K)
        n_pcs = max(1, min(int(n_pcs), min(x.shape) - 1))
        if min(x.shape) > 1:
            pcs = centred_pca(lg, n_pcs, seed=seed)
        else:  # a single cell or gene: the centred values themselves
            lg = lg.toarray() if sp.issparse(lg) else lg
            pcs = lg - lg.mean(axis=0)
    else:
        n_pcs = max(1, min(int(n_pcs), min(sample.size, x.shape[1]) - 1))
        def rows(r):
            return take_rows(x, sample[r]) if sample_counts is None else sample_counts[r]

        lg = _stack([_norm.log_normalize(as_float64(rows(r)), _norm.CP10K)
                     for r in _row_blocks(sample.size, _PROJECT_ROWS)])
        mean, components = pca_components(lg, n_pcs, seed=seed)
        del lg
        pcs = np.empty((x.shape[0], components.shape[0]))
        for r in _row_blocks(x.shape[0], _PROJECT_ROWS):
            pcs[r] = pca_scores(_norm.log_normalize(as_float64(x[r]), _norm.CP10K), mean,
                                components)
    return nearest_neighbors(pcs, k, exact_max_cells=exact_max_cells, seed=seed)


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m, dtype=np.float64)


def mcv_losses(train, test, idx: np.ndarray, ks, *, space: str = "counts", steps: int = 1,
               loss: str = "mse") -> dict[int, float]:
    """Molecular cross-validation loss of kNN smoothing of ``train`` with each ``k`` of ``ks``.

    ``train`` / ``test``: a binomial split of the same counts (cells x genes); ``idx``: the
    cells' neighbours in ``train`` (``(n, >= max(ks))``, nearest first). For each ``k`` the
    smoothed ``train`` (as :class:`KNNImputer` computes it, count scale at ``train``'s library
    sizes) is scored against ``test`` by

    - ``loss="mse"``: Open Problems' denoising MSE (both normalised per cell to 1e4 total,
      log1p, squared difference averaged over all entries; cells without counts stay 0), the
      value of :func:`screpair.evaluate.mcv_mse`;
    - ``loss="poisson"``: the Poisson negative log-likelihood of ``test`` under the smoothed
      means rescaled by ``test.sum() / train.sum()``, ``mean(d - test * log(d + 1e-6))``, the
      value of :func:`screpair.evaluate.mcv_poisson` with ``order="mcv"``.

    Computed over blocks of rows (:func:`smooth_rows`), so no ``cells x genes`` array is formed
    beyond one block and no normalized copy of ``train``.
    """
    n, g = train.shape
    lib = _norm.library_size(train)
    scale = float(test.sum()) / float(train.sum())
    test = sp.csr_matrix(test) if sp.issparse(test) else np.asarray(test, dtype=np.float64)
    out = {}
    for k in ks:
        nb = np.ascontiguousarray(idx[:, :k])
        total = 0.0
        for rows in _row_blocks(n, _BLOCK):
            pred = _to_counts(smooth_rows(train, lib, nb, rows, steps=steps, space=space),
                              lib[rows], space)
            t = _dense(test[rows])
            if loss == "mse":
                d = _norm.log_normalize(pred, _norm.CP10K) - _norm.log_normalize(t, _norm.CP10K)
                total += float(np.sum(d**2))
            else:
                pred *= scale
                total += float(np.sum(pred - t * np.log(pred + 1e-6)))
        out[int(k)] = total / (n * g)
    return out


class KNNImputer(BaseImputer):
    """Average each cell's normalized profile with its ``k`` nearest neighbours.

    Cells are compared in the principal components of log1p(counts / L * 1e4) (centred PCA by a
    randomized SVD with implicit centring, :func:`centred_pca`: the centred matrix is never
    formed, sparse input stays sparse); each cell's library-normalized profile is replaced by
    the mean over itself and its ``k - 1`` nearest neighbours, then scaled back to the cell's
    own library size (count scale). This is the smoothing idea of knn-smoothing (Wagner et al.
    2018) in a single step; ``steps > 1`` repeats the averaging (``W^steps``, ``W`` the
    row-stochastic neighbour matrix), as MAGIC's diffusion does.

    Parameters
    ----------
    k
        Neighbourhood size, the cell itself included (``k=1`` returns the input), or ``"mcv"``:
        chosen from ``k_grid`` by molecular cross-validation of the counts given to ``fit``
        (Batson, Royer & Webber 2019): they are split binomially (``mcv_train_frac`` of the
        molecules to a training half, seeded by ``rng``), the training half is smoothed with
        every ``k`` (its own neighbours) and scored against the held-out half by ``mcv_loss``
        (:func:`mcv_losses`); the ``k`` with the lowest loss is then used on all the counts.
    n_pcs
        Number of principal components used for the distances.
    steps
        Number of averaging steps (``1``: one average over the neighbours).
    space
        What is averaged: ``"counts"`` (default) the CP10k profiles, an arithmetic mean of the
        neighbours' expression; ``"log"`` their log1p(CPM) values, mapped back with
        ``expm1(v) * L / 1e6`` (MAGIC's space: close to a geometric mean, which shrinks genes
        that few neighbours express towards 0).
    k_grid
        Candidate neighbourhood sizes for ``k="mcv"`` (those above the number of cells are
        capped to it).
    mcv_loss
        ``"mse"``: Open Problems' denoising MSE of log1p(CP10k) values; ``"poisson"``: the
        Poisson NLL of the held-out counts (see :func:`mcv_losses`).
    mcv_train_frac
        The share of molecules in the calibration's training half.
    exact_max_cells
        Up to this many cells the neighbours are exact; above it they come from pynndescent's
        approximate ``NNDescent`` (:func:`nearest_neighbors`; ``0``: always approximate).
    n_fit_cells
        Up to this many cells the PCA is fitted on all of them; above it its axes and centring
        mean are fitted on a uniform sample of ``n_fit_cells`` cells (drawn first from ``rng``)
        and every cell is projected on them (see *Large data*); ``None``: always all cells.
    rng
        Seed for the PCA sample, the randomized SVD, the approximate neighbour search and the
        calibration split.

    Attributes
    ----------
    k_
        The neighbourhood size used (``k``, capped to the number of cells, or the calibrated one).
    mcv_losses_
        With ``k="mcv"``: ``{k: loss}`` of every candidate (lower is better); else ``None``.
    neighbors_
        ``(n_cells, k_)`` each fitted cell's neighbours (row indices).
    fit_cells_
        The sorted rows the PCA axes were fitted on (above ``n_fit_cells`` cells), else
        ``None`` (all cells).
    counts_
        The validated counts the fit worked on (the matrix that :func:`screpair.impute` and
        :func:`screpair.impute_file` hold anyway: float64 CSR or ndarray, or from
        ``impute_file`` CSR with uint16 / float32 values, see ``compact_counts``): a
        reference, not a copy; the posterior averages the neighbours' rows of it, taken as
        float64 by blocks of :data:`_SMOOTH_ROWS` rows.
    library_size_
        ``(n_cells,)`` the fitted cells' library sizes (row sums of ``counts_``).

    Notes
    -----
    Transductive: ``transform`` needs the cells given to ``fit``; it averages the fitted cells'
    normalized profiles and uses the given counts only for their library sizes. The posterior
    of a block of rows (``ctx.rows``) is :func:`smooth_rows`: with ``space="counts"``
    ``P' @ counts_ * L_i / 1e4``, ``P'`` the block's rows of ``W^steps`` (:func:`walk_rows`)
    with each column ``j`` scaled by ``1e4 / L_j``, so no normalized copy of the counts is
    held; with ``space="log"`` the rows the block averages are log-normalized for that block
    only. Blocks stack to the all-rows result; memory is the counts (held by the caller
    anyway), the ``cells x (n_pcs + 10)`` PCA blocks (above ``n_fit_cells``: the sample's log
    values and ``cells x n_pcs`` scores), the neighbours, the sparse rows of ``W^steps`` and the
    dense output block. ``k="mcv"`` costs one more PCA and neighbour search (on the training
    half, the same PCA sample) and one smoothing per candidate.

    *Folded weights.* Averaging CP10k profiles rounds each term as ``w * (x * (1e4 / L))``,
    the folded weights as ``(w * (1e4 / L)) * x``: the output differs from averaging a
    normalized copy (this class before issue 16) by a few ulp (measured under *Large data*);
    ``space="log"`` is unchanged bit for bit.

    *Molecular cross-validation* (issue 19, ``benchmarks/mcv_smoothing.py``, rng 0, scored on the
    benchmark's MCV test split, which the method never sees; a 2-core machine shared with a
    running benchmark). Open Problems' MSE (lower is better) on pbmc3k / baron: the input 0.280 /
    0.349; averaging counts, k = 5, 15, 30, 50, 100, 200 in one step 0.265, 0.247, 0.241, 0.238,
    0.236, 0.234 / 0.337, 0.319, 0.313, 0.310, 0.309, 0.312, with 3 steps at best 0.232 / 0.305;
    ``k="mcv"`` picks k = 100 on both (0.236 / 0.309; with ``steps=2``: 0.233 / 0.306). Averaging
    log1p(CPM) (``space="log"``), k = 5 to 100: 0.168 to 0.158 / 0.226 to 0.210 (k = 200 on
    baron 0.209), ``k="mcv"``
    0.158 (k = 100) / 0.210 (k = 100), against MAGIC's 0.155 / 0.207 (MAGIC with t = 1: baron
    0.207; its lead is its kernel, not its diffusion time). No choice of k or steps lets count
    averages near MAGIC: the MSE of log1p values at a tenth of the depth rewards shrinking
    sparse genes (the true means score worse than the raw counts on a simulation,
    ``tests/test_knn_mcv.py``), which log averages do. On the MCV paper's Poisson NLL the order
    reverses: counts k = 15 0.0463 / 0.0555, ``k="mcv"`` 0.0392 / 0.0507, ``space="log"`` 0.056
    / 0.086 (MAGIC 0.056 / 0.086). ``k="mcv"`` is not the default because it makes the masked
    protocol (rng 0, 1) worse: MSE 0.620 -> 2.26 (pbmc3k), 1.07 -> 3.41 (baron; Poisson-loss
    calibration 1.39, ``space="log"`` 11.8): the MCV split of a masked input cannot see the
    masked entries, and the MSE loss then prefers small k.

    *Approximate neighbours* (above ``exact_max_cells``; measured by forcing them with
    ``exact_max_cells=0``, rng 0, ``benchmarks/bench_methods_scale.py --accuracy``): on pbmc3k
    (2,700 cells) they recall 99.3 % of the exact neighbour sets, the smoothed log1p(CP10k)
    values differ from the exact version's by an MSE of 4.2e-4 (0.18 % of their variance) and
    the masked-protocol RMSE is unchanged (1.2515 both); on baron mouse 1 (822 cells): recall
    99.9 %, MSE 1.0e-4 (0.05 %), masked RMSE 1.1361 exact, 1.1360 approximate. pynndescent
    compiles its numba kernels on first use (about 30 s per process on a 2-core machine). Below
    ``exact_max_cells`` the output is the same as before the implicit-centring PCA (bit for bit
    on pbmc3k, baron and the parity cases).

    *Large data* (issue 16; ``benchmarks/bench_knn_memory.py``, rng 0, a 2-core machine shared
    with a running benchmark). *No normalized copy*: against the previous implementation, which
    averaged a normalized copy of the counts, on pbmc3k / baron (k = 15 with 1 and 2 steps,
    k = 50 with 3) the folded weights change 0.4-2.7 % of the output's entries in their last
    bits, by at most 7.8e-16 / 7.3e-16 relative (about 3 ulp), zeros unchanged;
    ``space="log"`` is the same bit for bit. *PCA on a sample* (above ``n_fit_cells``): the
    axes and centring mean come from the sample, not all cells, and every cell (the sample's
    own rows included, whose scores are then its PCA scores) is projected on them; the
    neighbours are searched as before. On a Splat simulation of 20,000 cells x 1,000 genes (5
    groups, 16 % non-zero, k = 15, exact neighbours), ``n_fit_cells=5000`` against all cells:
    with distinct groups (``de_fac_loc=1``) 97.8 % of the neighbours are in the cell's group
    (all cells 97.7 %) and the MSE of the output's log1p(CP10k) against the true means is
    0.56704 (all cells 0.56692, +0.02 %); with Splat's default groups, which barely separate
    (36 % of neighbours in the group), 0.58704 against 0.58657 (+0.08 %). The neighbour sets
    themselves change: recall 15.8 % / 11.4 % of the all-cells sets, MSE between the two
    outputs' log1p(CP10k) 0.309 / 0.337, but so they do when only the PCA's seed changes
    (all cells, rng 1: recall 21.8 % / 15.9 %, MSE 0.287 / 0.319): within a group the
    nearest cells are decided by noise, which any change of the axes reshuffles. With the
    default (pynndescent) neighbours: recall 11.1 % (rng 1: 15.1 %), against the truth
    0.58717 (all cells 0.58669). *Memory* (tracemalloc peak, exact neighbours, blocks of 2,000
    rows; the old implementation loaded from git beside this one): the fit plus the posterior
    by blocks, on counts held by the caller, at 20,000 x 1,000 (38 MB of float64 CSR counts)
    77 MB before, 75 MB now (the peak is the PCA's log copy, 2 x the counts; the normalized
    copy the old fit then kept, 38 MB, is gone), 38 MB with ``n_fit_cells=10000``; at
    50,000 x 2,000 (205 MB) 410 MB before and now, 82 MB with ``n_fit_cells=10000``;
    ``screpair.impute_file(path, out, KNNImputer(), chunk_rows=2000)`` as a whole (reading
    the counts included): 211 -> 170 MB at 20,000 x 1,000, 957 -> 827 MB at 50,000 x 2,000
    (peak RSS 1,291 -> 1,113 MB). Above ``n_fit_cells`` the fit holds the sample's log values
    (12 bytes per stored count of the sample, twice while its blocks are stacked), one projection
    block (:data:`_PROJECT_ROWS` rows), the ``cells x n_pcs`` scores and the neighbours
    (``cells x k`` int64); a block's posterior holds its rows of ``W^steps`` and its output
    (sparse, then dense). The counts themselves stay the caller's: on the all-counts path of
    :func:`screpair.impute_file` they are CSR with uint16 values (``compact_counts``; float32
    if a count exceeds 65,535), 6 bytes per stored count, against 12 for float64: about 2.1 GB
    at 10^6 cells x 2,000 genes, 17 % non-zero. Each block of :data:`_SMOOTH_ROWS` rows of
    ``W^steps`` takes its neighbours' rows of them as float64 (a product with the whole
    compact matrix would convert all of it): the same arithmetic as the product with all
    float64 counts, bit for bit.
    """

    name = "knn"
    transductive = True
    compact_counts = True
    reads_all_counts = True

    def __init__(self, *, k: int | str = 15, n_pcs: int = 30, steps: int = 1,
                 space: str = "counts", k_grid=MCV_K_GRID, mcv_loss: str = "mse",
                 mcv_train_frac: float = 0.9, exact_max_cells: int = EXACT_MAX_CELLS,
                 n_fit_cells: int | None = N_FIT_CELLS, rng: RNGLike = 0):
        self.k, self.n_pcs, self.steps, self.space = k, n_pcs, steps, space
        self.k_grid, self.mcv_loss, self.mcv_train_frac = k_grid, mcv_loss, mcv_train_frac
        self.exact_max_cells, self.n_fit_cells, self.rng = exact_max_cells, n_fit_cells, rng

    def _check_params(self) -> None:
        if isinstance(self.k, str):
            if self.k != "mcv":
                msg = f"k must be an integer >= 1 or 'mcv', got {self.k!r}."
                raise ValueError(msg)
            grid = list(self.k_grid)
            if not grid or any(int(k) < 1 for k in grid):
                msg = f"k_grid must be non-empty integers >= 1, got {self.k_grid!r}."
                raise ValueError(msg)
        elif int(self.k) < 1:
            msg = f"k must be >= 1 or 'mcv', got {self.k}."
            raise ValueError(msg)
        if int(self.steps) < 1:
            msg = f"steps must be >= 1, got {self.steps}."
            raise ValueError(msg)
        for name, value, allowed in (("space", self.space, SPACES),
                                     ("mcv_loss", self.mcv_loss, MCV_LOSSES)):
            if value not in allowed:
                msg = f"{name} must be one of {allowed}, got {value!r}."
                raise ValueError(msg)
        if not 0.0 < float(self.mcv_train_frac) < 1.0:
            msg = f"mcv_train_frac must be in (0, 1), got {self.mcv_train_frac!r}."
            raise ValueError(msg)
        if int(self.exact_max_cells) < 0:
            msg = f"exact_max_cells must be >= 0, got {self.exact_max_cells}."
            raise ValueError(msg)
        check_sample_size("n_fit_cells", self.n_fit_cells)

    def _calibrate(self, x, rng: np.random.Generator, seed: int) -> dict[int, float]:
        from anndata import AnnData

        from ..simulate import mcv_split

        n = x.shape[0]
        ks = sorted({min(int(k), n) for k in self.k_grid})
        whole = x[0:n] if hasattr(x, "take_rows") else sp.csr_matrix(x)  # a CountsFile: read
        train, test = (sp.csr_matrix(half.X, dtype=np.float64) for half in mcv_split(
            AnnData(X=as_float64(whole)), train_frac=float(self.mcv_train_frac), rng=rng))
        idx = _neighbors_of(train, max(ks), self.n_pcs, seed=seed,
                            exact_max_cells=int(self.exact_max_cells), sample=self.fit_cells_)
        losses = mcv_losses(train, test, idx, ks, space=self.space, steps=int(self.steps),
                            loss=self.mcv_loss)
        logger.info("kNN k='mcv' (%s loss): %s", self.mcv_loss,
                    ", ".join(f"k={k}: {v:.4g}" for k, v in losses.items()))
        return losses

    def _fit_rows(self, n: int) -> np.ndarray | None:
        """The ``n_fit_cells`` sample of ``n`` cells (drawn first from ``rng``) the PCA axes
        are fitted on, or ``None``; every cell's counts still come as ``ctx.counts``."""
        return sample_rows(self.rng, n, self.n_fit_cells)

    def _fit(self, x, ctx: DataContext) -> None:
        rng = as_rng(self.rng)
        n = ctx.n_obs
        # drawn first, and only above n_fit_cells: below it rng and the output are as before
        self.fit_cells_ = draw_sample(rng, n, self.n_fit_cells, ctx)
        counts, sample_counts = x, None
        if ctx.sample is not None:  # x: the sample's rows; every cell's: ctx.counts
            if ctx.counts is None:
                msg = "KNNImputer: a fit on a sample of rows needs every cell's ctx.counts."
                raise ValueError(msg)
            counts, sample_counts = ctx.counts, x
        if self.fit_cells_ is not None:
            logger.info("kNN: PCA axes fitted on %d of %d cells (n_fit_cells); every cell "
                        "projected on them", self.fit_cells_.size, n)
        seed = int(rng.integers(2**31))
        if self.k == "mcv":
            self.mcv_losses_ = self._calibrate(counts, rng, seed)
            self.k_ = min(self.mcv_losses_, key=self.mcv_losses_.get)
        else:
            self.mcv_losses_ = None
            self.k_ = min(int(self.k), n)
        self.neighbors_ = _neighbors_of(counts, self.k_, self.n_pcs, seed=seed,
                                        exact_max_cells=int(self.exact_max_cells),
                                        sample=self.fit_cells_, sample_counts=sample_counts)
        self.counts_ = counts  # a reference: the posterior averages rows of it
        self.library_size_ = (_norm.library_size(x) if ctx.sample is None
                              else ctx.totals.library_size)

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        # the block's rows of W^steps only: never W, a cells x k x genes array or a normalized
        # copy of the counts
        smooth = smooth_rows(self.counts_, self.library_size_, self.neighbors_, ctx.rows,
                             steps=int(self.steps), space=self.space)  # a new array
        return Posterior(mean=_to_counts(smooth, _norm.library_size(x), self.space))
