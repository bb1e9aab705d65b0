"""Cell clustering and dropout probabilities (cnnImpute steps 1-2).

- :func:`cluster_cells` / :func:`cluster`: log2 normalized counts (:func:`log_cpm`; by default
  1e4 per cell, 2,000 HVGs scaled to unit variance), PCA (10 PCs), 3-D t-SNE, ADPclust centres,
  k-means;
- :func:`fit_zinb_dropout` (the default of :func:`dropout_probability`): a zero-inflated negative
  binomial per gene and cluster with size factors and a logistic dropout curve on the log expected
  count (optionally noisy-OR a per-gene zero inflation, ``inflation="gene"``), fitted by a
  vectorised EM; a zero's probability is P(true count > 0 | observed 0);
- :func:`fit_dropout` (``model="scimpute"``): scImpute's gamma-normal mixture per gene and
  cluster on log10(CPM+1.01), fitted by a vectorised EM; the posterior weight of the gamma
  component is the probability that a zero is a technical dropout;
- :class:`DropoutModel`: either model fitted on (a sample of) the cells, with the dropout
  probabilities of any block of rows (the large-data path; cnn's dropout step).

An entry is *missing* (a likely dropout) when its probability exceeds the threshold (0.5).
"""

from ._api import DROPOUT_MODELS, cluster, dropout_probability
from ._cluster import ClusterResult, adpclust, cluster_cells, log_cpm
from ._em import POINT, STATUS, DropoutFit, dropout_weight, fit_dropout, fit_mixture, solve_alpha
from ._model import DropoutModel
from ._zinb import ZINBDropoutFit, fit_zinb_dropout, nb_zero_logprob, zero_dropout_prob

__all__ = [
    "DROPOUT_MODELS",
    "POINT",
    "STATUS",
    "ClusterResult",
    "DropoutModel",
    "ZINBDropoutFit",
    "DropoutFit",
    "adpclust",
    "cluster",
    "cluster_cells",
    "dropout_probability",
    "dropout_weight",
    "fit_dropout",
    "fit_mixture",
    "fit_zinb_dropout",
    "log_cpm",
    "nb_zero_logprob",
    "solve_alpha",
    "zero_dropout_prob",
]
