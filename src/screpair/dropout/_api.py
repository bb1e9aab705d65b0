"""AnnData functions: :func:`cluster` and :func:`dropout_probability` (scanpy contract)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._logging import get_logger
from .._utils import RNGLike, check_output_keys, get_counts, prepare_adata
from ._cluster import cluster_cells
from ._em import fit_dropout
from ._zinb import fit_zinb_dropout

logger = get_logger(__name__)

#: Dropout models of :func:`dropout_probability` and ``CNNImputer(dropout_model=...)``.
DROPOUT_MODELS: tuple[str, ...] = ("zinb", "scimpute")

_PARAMS = ("eta", "alpha", "beta", "mu", "sigma", "zero_prob")


def cluster(
    adata: AnnData,
    *,
    layer: str | None = None,
    key_added: str = "screpair_cluster",
    copy: bool = False,
    overwrite: bool = False,
    rng: RNGLike = 0,
    perplexity: float | None = None,
    n_clusters: int | Sequence[int] = range(2, 11),
    n_pcs: int = 10,
    target_sum: float | None = 1e4,
    n_top_genes: int | None = 2000,
    scale: bool = True,
    n_jobs: int = 1,
) -> AnnData | None:
    """Cluster cells as cnnImpute does (log2 normalized counts, PCA, 3-D t-SNE, ADPclust, k-means).

    See :func:`screpair.dropout.cluster_cells` for the method.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` or ``layers[layer]``.
    layer
        Layer holding the raw counts; ``None`` uses ``X``.
    key_added
        Name of the ``obs`` column (and ``uns`` entry) written.
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Allow the outputs to replace an existing ``obs[key_added]``, ``obsm["X_tsne"]`` (e.g.
        scanpy's 2-D t-SNE) or ``uns[key_added]``; without it they are an error, raised before
        any work.
    rng
        Seed or Generator.
    perplexity
        t-SNE perplexity; ``None``: 30, or 5 for at most 30 cells.
    n_clusters
        Candidate numbers of clusters (ADPclust picks one by silhouette), or one number.
    n_pcs
        Principal components fed to t-SNE (cnnImpute: 50).
    target_sum
        Library size cells are scaled to before ``log2(. + 1)`` (cnnImpute: 1e6, CPM; ``None``:
        the median library size).
    n_top_genes
        Highly-variable genes embedded (``None``: all, as cnnImpute).
    scale
        Scale genes to unit variance before PCA (cnnImpute: no). The defaults depart from
        cnnImpute's preprocessing to separate groups better; see
        :func:`screpair.dropout.cluster_cells`.
    n_jobs
        t-SNE threads.

    Returns
    -------
    ``None``, or a copy when ``copy=True``. Writes

    - ``.obs[key_added]``: cluster labels (categorical ``"0"``, ``"1"``, …);
    - ``.obsm["X_tsne"]``: the 3-D t-SNE embedding;
    - ``.uns[key_added]``: ``{"params", "layer", "version", "centers", "n_clusters", "silhouette",
      "bandwidth", "seconds"}``.

    Examples
    --------
    >>> from screpair import dropout, pp, simulate
    >>> sim = simulate.splat(n_obs=60, n_vars=200, group_prob=(0.5, 0.5), de_prob=0.3, rng=0)
    >>> pp.filter_genes(sim, min_cells=1)  # drop genes without counts (else a warning)
    >>> dropout.cluster(sim, rng=0)
    >>> sim.obsm["X_tsne"].shape
    (60, 3)
    """
    adata = prepare_adata(adata, copy, "cluster")
    _check_cluster_outputs(adata, key_added, overwrite=overwrite, what="key_added")
    x = get_counts(adata, layer)
    params = {
        "perplexity": perplexity,
        "n_clusters": n_clusters,
        "n_pcs": n_pcs,
        "target_sum": target_sum,
        "n_top_genes": n_top_genes,
        "scale": scale,
        "n_jobs": n_jobs,
    }
    _cluster_into(adata, x, layer=layer, key_added=key_added, rng=rng, **params)
    return adata if copy else None


def _check_cluster_outputs(adata: AnnData, key: str, *, overwrite: bool, what: str) -> None:
    """Refuse to replace what :func:`cluster` writes (``obs[key]``, ``obsm["X_tsne"]``,
    ``uns[key]``) without ``overwrite``."""
    check_output_keys(adata, [], layer=None, overwrite=overwrite, what=what, uns=(key,),
                      obs=(key,), obsm=("X_tsne",),
                      hint=f"pass groupby={key!r} to reuse earlier clusters (dropout models)")


def _cluster_into(adata: AnnData, x, *, layer, key_added: str, rng: RNGLike, **params) -> None:
    """Run :func:`cluster_cells` on ``x`` and write its result into ``adata``."""
    from .. import __version__
    from .._utils import jsonable

    start = time.perf_counter()
    res = cluster_cells(x, rng=rng, **params)
    seconds = time.perf_counter() - start
    cats = [str(i) for i in range(res.n_clusters)]
    adata.obs[key_added] = pd.Categorical.from_codes(res.labels, categories=cats)
    adata.obsm["X_tsne"] = res.embedding
    params = {"rng": rng, **params}
    adata.uns[key_added] = {
        "params": jsonable({k: list(v) if isinstance(v, range) else v for k, v in params.items()}),
        "layer": jsonable(layer),
        "version": __version__,
        "centers": np.asarray(res.centers, dtype=np.int64),
        "n_clusters": int(res.n_clusters),
        "silhouette": float(res.silhouette),
        "bandwidth": float(res.bandwidth),
        "seconds": float(seconds),
    }


def dropout_probability(
    adata: AnnData,
    *,
    layer: str | None = None,
    groupby: str | None = None,
    threshold: float = 0.5,
    key_added: str = "dropout_prob",
    copy: bool = False,
    rng: RNGLike = 0,
    cluster_key: str = "screpair_cluster",
    model: str = "zinb",
    invalid_fill: float = 0.0,
    max_iter: int | None = None,
    inflation: str = "none",
    overwrite: bool = False,
    **cluster_kwargs,
) -> AnnData | None:
    """Dropout probability of every zero count, per cell cluster.

    Clusters the cells with :func:`cluster` unless ``groupby`` names an ``obs`` column of labels,
    then fits one of two models (``model``):

    - ``"zinb"`` (default): a zero-inflated negative binomial per gene and cluster with size
      factors and one logistic dropout curve on the log expected count (Splatter's / DCA's
      model, see :func:`screpair.dropout.fit_zinb_dropout`); a zero's probability is
      ``P(true count > 0 | observed 0)``, so zeros of one gene and cluster are ranked by the
      cell's depth, and the probabilities are calibrated on simulations;
    - ``"scimpute"``: scImpute's gamma-normal mixture for every gene in every cluster on
      ``log10(CPM + 1.01)``, as cnnImpute (see :func:`screpair.dropout.fit_dropout`); all zeros
      of a gene in a cluster share one probability, usually near 1.

    An entry is *missing* (a likely dropout) when its probability exceeds ``threshold``. Observed
    non-zero counts are never missing.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` or ``layers[layer]``.
    layer
        Layer holding the raw counts; ``None`` uses ``X``.
    groupby
        ``obs`` column of cell labels to use instead of clustering.
    threshold
        Probability above which a zero counts as missing (recorded, and used for the summary).
    key_added
        Name of the layer written, and prefix of the ``varm``/``uns`` entries.
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Allow ``layers[key_added]`` and ``uns[key_added]`` to replace existing entries (the
        layer is never the input ``layer``), and, without ``groupby``, the clustering's outputs
        (see :func:`cluster`).
    rng
        Seed or Generator for the clustering.
    cluster_key
        ``obs`` column written by the clustering (when ``groupby`` is ``None``).
    model
        ``"zinb"`` or ``"scimpute"`` (see above).
    invalid_fill
        ``model="scimpute"`` only: probability for zeros of genes without a usable fit in a
        cluster (0.0: not missing, as in scImpute and cnnImpute; 1.0: all missing).
    max_iter
        EM iteration limit (``None``: 15 for ``"zinb"``, 100 for ``"scimpute"``, as scImpute).
    inflation
        ``model="zinb"`` only: the gene term of the dropout probability (``"none"``: the curve
        alone; ``"gene"`` / ``"cluster"``: the curve noisy-OR a zero inflation per gene / per
        gene and cluster; see :func:`screpair.dropout.fit_zinb_dropout`).
    **cluster_kwargs
        Passed to :func:`cluster` (``perplexity``, ``n_clusters``, ``n_pcs``, ``target_sum``,
        ``n_top_genes``, ``scale``, ``n_jobs``).

    Returns
    -------
    ``None``, or a copy when ``copy=True``. Writes

    - ``.layers[key_added]``: dropout probabilities (CSR float32; stored only at zero counts;
      ``"zinb"`` leaves out probabilities below 1e-3);
    - ``"zinb"``: ``.varm[f"{key_added}_mean"]`` (NB mean of each gene in each cluster at size
      factor 1; DataFrame, one column per cluster), ``.var[f"{key_added}_dispersion"]``, and with
      a gene term ``.varm[f"{key_added}_inflation"]`` (column ``"all"`` or one per cluster);
    - ``"scimpute"``: ``.varm[f"{key_added}_{name}"]`` for ``name`` in eta, alpha, beta, mu, sigma,
      zero_prob: per-gene, per-cluster parameters (DataFrame, one column per cluster; NaN where no
      fit);
    - ``.uns[key_added]``: ``{"params", "layer", "version", "model", "groupby", "threshold",
      "clusters", "n_missing", "missing_fraction_of_zeros", "seconds"}``, plus ``"curve"`` (the
      logistic curve's intercept and slope) and ``"n_iter"`` for ``"zinb"``, ``"valid_fraction"``
      and ``"status_counts"`` for ``"scimpute"``;
    - when ``groupby`` is ``None``: what :func:`cluster` writes (``obs[cluster_key]``,
      ``obsm["X_tsne"]``, ``uns[cluster_key]``).

    Examples
    --------
    >>> from screpair import dropout, pp, simulate
    >>> sim = simulate.splat(n_obs=60, n_vars=200, group_prob=(0.5, 0.5), rng=0)
    >>> pp.filter_genes(sim, min_cells=1)  # drop genes without counts (else a warning)
    >>> dropout.dropout_probability(sim, groupby="group")
    >>> sim.layers["dropout_prob"].shape
    (60, 199)
    >>> dropout.dropout_probability(sim, groupby="group", model="scimpute", key_added="dp_sci")
    >>> sim.uns["dp_sci"]["model"]
    'scimpute'
    """
    from .. import __version__
    from .._utils import jsonable

    adata = prepare_adata(adata, copy, "dropout_probability")
    check_output_keys(adata, [key_added], layer=layer, overwrite=overwrite, uns=(key_added,))
    if groupby is None:
        _check_cluster_outputs(adata, cluster_key, overwrite=overwrite, what="cluster_key")
    if not 0.0 <= threshold <= 1.0:
        msg = f"threshold must be in [0, 1], got {threshold}."
        raise ValueError(msg)
    if model not in DROPOUT_MODELS:
        msg = f"model must be one of {DROPOUT_MODELS}, got {model!r}."
        raise ValueError(msg)
    if model != "zinb" and inflation != "none":
        msg = f"inflation={inflation!r} applies to model='zinb' only."
        raise ValueError(msg)
    x = get_counts(adata, layer)
    start = time.perf_counter()
    if groupby is None:
        _cluster_into(adata, x, layer=layer, key_added=cluster_key, rng=rng, **cluster_kwargs)
        labels_key = cluster_key
    else:
        if cluster_kwargs:
            msg = (
                f"clustering parameters {sorted(cluster_kwargs)} are unused when groupby is given."
            )
            raise TypeError(msg)
        if groupby not in adata.obs:
            msg = f"groupby={groupby!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})."
            raise KeyError(msg)
        labels_key = groupby
    if model == "zinb":
        fit = fit_zinb_dropout(x, adata.obs[labels_key], max_iter=max_iter or 15,
                               inflation=inflation)
    else:
        fit = fit_dropout(
            x, adata.obs[labels_key], max_iter=max_iter or 100, invalid_fill=invalid_fill
        )
    seconds = time.perf_counter() - start

    adata.layers[key_added] = fit.prob
    cols = [str(c) for c in fit.clusters]
    extra: dict = {}
    if model == "zinb":
        adata.varm[f"{key_added}_mean"] = pd.DataFrame(
            fit.mean.T, index=adata.var_names, columns=cols
        )
        adata.var[f"{key_added}_dispersion"] = fit.dispersion
        extra = {"curve": np.asarray(fit.curve, dtype=np.float64), "n_iter": int(fit.n_iter)}
        if fit.inflation.shape[0]:
            adata.varm[f"{key_added}_inflation"] = pd.DataFrame(
                fit.inflation.T, index=adata.var_names,
                columns=["all"] if fit.inflation.shape[0] == 1 else cols,
            )
    else:
        for name in _PARAMS:
            adata.varm[f"{key_added}_{name}"] = pd.DataFrame(
                getattr(fit, name).T, index=adata.var_names, columns=cols
            )
        extra = {"valid_fraction": fit.valid.mean(axis=1), "status_counts": fit.status_counts()}
    n_zero = x.shape[0] * x.shape[1] - (x.nnz if hasattr(x, "nnz") else np.count_nonzero(x))
    n_missing = int((fit.prob.data > threshold).sum())
    params = {
        "groupby": groupby,
        "threshold": threshold,
        "rng": rng,
        "cluster_key": cluster_key,
        "model": model,
        "invalid_fill": invalid_fill,
        "max_iter": max_iter,
        "inflation": inflation,
        **cluster_kwargs,
    }
    adata.uns[key_added] = {
        "params": jsonable({k: list(v) if isinstance(v, range) else v for k, v in params.items()}),
        "layer": jsonable(layer),
        "version": __version__,
        "model": model,
        "groupby": labels_key,
        "threshold": float(threshold),
        "clusters": np.asarray(cols, dtype=object),
        **extra,
        "n_missing": n_missing,
        "missing_fraction_of_zeros": float(n_missing / n_zero) if n_zero else 0.0,
        "seconds": float(seconds),
    }
    logger.info("%d of %d zeros are likely dropouts (p > %.2f)", n_missing, n_zero, threshold)
    return adata if copy else None
