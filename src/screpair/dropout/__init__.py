"""Cell clustering and dropout probabilities (cnnImpute steps 1-2).

- :func:`cluster_cells` / :func:`cluster`: log2(CPM+1), 3-D t-SNE, ADPclust centres, k-means;
- :func:`fit_dropout` / :func:`dropout_probability`: scImpute's gamma-normal mixture per gene and
  cluster on log10(CPM+1.01), fitted by a vectorised EM; the posterior weight of the gamma
  component is the probability that a zero is a technical dropout.

An entry is *missing* (a likely dropout) when its probability exceeds the threshold (0.5).
"""

from ._api import cluster, dropout_probability
from ._cluster import ClusterResult, adpclust, cluster_cells, log_cpm
from ._em import POINT, STATUS, DropoutFit, dropout_weight, fit_dropout, fit_mixture, solve_alpha

__all__ = [
    "POINT",
    "STATUS",
    "ClusterResult",
    "DropoutFit",
    "adpclust",
    "cluster",
    "cluster_cells",
    "dropout_probability",
    "dropout_weight",
    "fit_dropout",
    "fit_mixture",
    "log_cpm",
    "solve_alpha",
]
