"""Estimator base class shared by every imputation method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from .._utils import Data


@dataclass
class Posterior:
    """What a method returns for a set of cells, on the count scale.

    Attributes
    ----------
    mean
        Imputed / repaired counts (cells x genes, non-negative floats, same units as the input
        counts at each cell's observed library size). Dense ndarray or CSR.
    var
        Posterior (or sample) variance on the same scale, where the method has one.
    dropout_prob
        Probability that each entry is a technical dropout, where the method computes it.
    """

    mean: np.ndarray | sp.csr_matrix
    var: np.ndarray | None = None
    dropout_prob: np.ndarray | sp.csr_matrix | None = None


class BaseImputer(BaseEstimator):
    """sklearn-style base: ``__init__`` only stores parameters, ``fit`` returns ``self``.

    Subclasses implement :meth:`fit` and :meth:`posterior`; :meth:`transform` returns the
    posterior mean so estimators compose with sklearn. Transductive methods (those whose
    ``transform`` only works on the fitted cells) set ``transductive = True``.
    """

    name: ClassVar[str] = "base"
    transductive: ClassVar[bool] = False
    #: trained on clean profiles: a benchmark with a clean reference fits on it (degrade protocol)
    uses_reference: ClassVar[bool] = False
    #: the posterior may carry ``var`` / ``dropout_prob`` (``impute`` checks those output slots)
    has_var: ClassVar[bool] = False
    has_dropout_prob: ClassVar[bool] = False

    def fit(self, data: Data, *, layer: str | None = None) -> Self:  # pragma: no cover - abstract
        raise NotImplementedError

    def posterior(self, data: Data, *, layer: str | None = None) -> Posterior:  # pragma: no cover
        raise NotImplementedError

    def transform(self, data: Data, *, layer: str | None = None) -> np.ndarray:
        """Imputed counts as a dense ndarray (cells x genes)."""
        mean = self.posterior(data, layer=layer).mean
        return mean.toarray() if sp.issparse(mean) else np.asarray(mean)

    def fit_transform(self, data: Data, *, layer: str | None = None) -> np.ndarray:
        return self.fit(data, layer=layer).transform(data, layer=layer)

    def _check_fitted(self, attr: str = "var_names_") -> None:
        if not hasattr(self, attr):
            msg = f"This {type(self).__name__} is not fitted yet; call `fit` first."
            raise NotFittedError(msg)

    def _check_same_cells(self, n_obs: int) -> None:
        """Transductive methods: ``transform`` must see the cells given to ``fit``."""
        if n_obs != self.n_obs_:
            msg = (
                f"{type(self).__name__} is transductive: transform needs the {self.n_obs_} cells "
                f"it was fitted on, got {n_obs}. Call `fit` on the new data instead."
            )
            raise ValueError(msg)
