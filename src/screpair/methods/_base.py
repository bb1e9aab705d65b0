"""Estimator base class shared by every imputation method."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from .._utils import Data, as_rng, compare_var_names, get_counts, var_names


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


@dataclass(frozen=True, kw_only=True)
class DataContext:
    """What a method may know about validated counts besides the matrix itself.

    Built once per public call (:func:`data_context`) or by :func:`screpair.impute`, which
    hands over what it validated; passed to :meth:`BaseImputer._fit` and
    :meth:`BaseImputer._posterior`. Treat the frames and layers as read-only.

    Attributes
    ----------
    var_names
        Gene names, one per column (``gene_0 …`` for a bare matrix), unique.
    obs, var
        Cell and gene annotations (``var`` indexed by ``var_names``), e.g. ``var["gene_length"]``;
        empty frames for a bare matrix. ``obs`` covers all ``n_obs`` cells.
    layers
        The input's layers a method may read (cells x genes, aligned with ``obs``); empty for a
        bare matrix.
    n_obs
        Cells in the data set. ``_posterior`` may get a block of them (see ``rows``).
    rows
        The rows of the data set that ``x`` holds (``slice(0, n_obs)``: all of them).
    named
        Whether ``var_names`` came with the data (an AnnData) or were made up (a bare matrix,
        whose genes can only be checked by their number).
    sample
        For ``_fit`` only: ``x`` holds just these rows (sorted) of the ``n_obs`` cells, the
        ones :meth:`BaseImputer._fit_rows` asked for; ``None``: ``x`` holds every cell.
    totals
        With ``sample``: the :class:`screpair._chunks.RowTotals` of all ``n_obs`` cells
        (library sizes; per-gene sums of the library-normalized counts), from a streaming pass
        (:func:`screpair.impute_file`) or from the whole matrix in memory, the same numbers.
    counts
        With ``sample``, for a method with ``reads_all_counts``: the validated counts of all
        ``n_obs`` cells, read by rows (``counts[a:b]``, :func:`take_rows`): the whole matrix
        in memory, or from :func:`screpair.impute_file` a
        :class:`screpair._chunks.CountsFile` on disk. ``None`` otherwise.
    """

    var_names: pd.Index
    obs: pd.DataFrame
    var: pd.DataFrame
    layers: Mapping[str, Any] = field(default_factory=dict)
    n_obs: int
    rows: slice
    named: bool = True
    sample: np.ndarray | None = None
    totals: Any = None
    counts: Any = None


def data_context(data: Data, x) -> DataContext:
    """The :class:`DataContext` of ``data`` whose validated counts are ``x`` (all cells)."""
    n = x.shape[0]
    names = var_names(data)
    if isinstance(data, AnnData):
        var = data.var if data.var.index.equals(names) else data.var.set_axis(names)
        return DataContext(var_names=names, obs=data.obs, var=var, layers=data.layers, n_obs=n,
                           rows=slice(0, n))
    return DataContext(var_names=names, obs=pd.DataFrame(index=pd.RangeIndex(n).astype(str)),
                       var=pd.DataFrame(index=names), n_obs=n, rows=slice(0, n), named=False)


def sample_rows(rng, n: int, cap: int | None) -> np.ndarray | None:
    """The sorted rows of a uniform sample of ``cap`` of ``n`` cells drawn from ``rng``
    (``np.sort(rng.choice(n, cap, replace=False))``), or ``None`` (no sample: ``cap`` is
    ``None`` or at least ``n``). ``rng`` itself is not advanced: a ``Generator`` is copied, so
    the fit that later draws the same sample from it gets the same rows."""
    if cap is None or n <= int(cap):
        return None
    gen = copy.deepcopy(rng) if isinstance(rng, np.random.Generator) else as_rng(rng)
    return np.sort(gen.choice(n, int(cap), replace=False))


def draw_sample(rng: np.random.Generator, n: int, cap: int | None,
                ctx: DataContext) -> np.ndarray | None:
    """The sample a ``_fit`` works on, drawn from its ``rng`` as :func:`sample_rows` draws it
    (advancing ``rng`` the same way whether or not the rows were taken already): ``ctx.sample``
    when the caller already took them (``x`` holds only those rows; the draw is then only made
    to advance ``rng``), else the drawn rows (``None``: every row)."""
    if cap is None or n <= int(cap):
        return None
    rows = np.sort(rng.choice(n, int(cap), replace=False))
    return rows if ctx.sample is None else ctx.sample


def moved_params_error(cls: type, params: Mapping[str, Any]) -> TypeError | None:
    """The error for parameters of ``cls`` passed by a name that moved into a nested config
    (``cls._moved_params``), e.g. "n_epochs is now train.n_epochs: pass train={'n_epochs': 5}";
    ``None`` when no name in ``params`` moved."""
    moved = getattr(cls, "_moved_params", {})
    sections: dict[str, dict[str, Any]] = {}
    for k, v in params.items():
        if k in moved:
            sections.setdefault(moved[k], {})[k] = v
    if not sections:
        return None
    parts = []
    for section, kv in sections.items():
        names = ", ".join(kv)
        where = ", ".join(f"{section}.{k}" for k in kv)
        verb = "is" if len(kv) == 1 else "are"
        parts.append(f"{names} {verb} now {where}: pass {section}={kv!r}")
    example = {s: {k: v if isinstance(v, (bool, int, float, str)) or v is None else repr(v)
                   for k, v in kv.items()} for s, kv in sections.items()}
    msg = (f"{cls.__name__}: {'; '.join(parts)} (in a --config file: "
           f"{json.dumps(example)}).")
    return TypeError(msg)


def take_rows(x, rows: np.ndarray):
    """The rows ``rows`` of validated counts ``x``, validated form kept (CSR with sorted
    indices, or a C-ordered ndarray; from a :class:`screpair._chunks.CountsFile`: CSR)."""
    if hasattr(x, "take_rows"):  # a CountsFile
        return x.take_rows(rows)
    if sp.issparse(x):
        sub = sp.csr_matrix(x[rows])
        sub.sort_indices()
        return sub
    return np.ascontiguousarray(np.asarray(x)[rows])


class BaseImputer(BaseEstimator):
    """sklearn-style base: ``__init__`` only stores parameters, ``fit`` returns ``self``.

    A template: the public :meth:`fit` / :meth:`posterior` check the parameters
    (:meth:`_check_params`), validate the counts once (:func:`screpair._utils.get_counts`, with
    the class's ``_fit_checks`` / ``_posterior_checks`` options), check that the model is fitted,
    that the genes are the fitted ones and, for transductive methods (``transductive = True``:
    ``posterior`` only works on the fitted cells), that the cells are; then they call the
    subclass's hooks on the validated matrix:

    ``_fit(x, ctx)``
        ``x``: validated counts (float64 CSR with sorted indices, or a C-ordered ndarray), cells
        x genes; ``ctx``: its :class:`DataContext`. Fits the model and stores fitted attributes
        (names ending in ``_``); the template then sets ``var_names_`` (and, for transductive
        methods, ``n_obs_``). ``x`` holds every cell of the data set (``ctx.n_obs``), unless
        the method's ``_fit_rows(n)`` asked for a sample of rows: ``x`` then holds only those
        (``ctx.sample``), and ``ctx.totals`` the library sizes and gene sums of all cells;
        :func:`screpair.impute_file` then reads only those rows from the file (and, for a
        method with ``reads_all_counts``, gives every cell's counts as ``ctx.counts``).
    ``_posterior(x, ctx) -> Posterior``
        The same kind of ``x``: the rows ``ctx.rows`` of a data set of ``ctx.n_obs`` cells with
        the fitted genes. :func:`screpair.impute` calls it once with all rows;
        :func:`screpair.impute_file` calls it on consecutive row blocks (``x`` the block's
        validated counts, ``ctx.rows`` its rows, ``ctx.n_obs`` all cells) and writes each
        result out, so a method whose output for a cell depends only on that cell's row and
        fitted state indexes per-cell fitted state with ``ctx.rows``. Methods that need all rows
        at once set ``posterior_by_rows = False``: ``impute_file`` then calls it once.

    Neither hook may modify ``x`` (``impute`` passes the same matrix to both). :meth:`transform`
    returns the posterior mean so estimators compose with sklearn. A subclass may still
    override the public ``fit`` / ``posterior`` instead (it then validates its input itself,
    and :func:`screpair.impute` calls those public methods on an AnnData).
    """

    name: ClassVar[str] = "base"
    transductive: ClassVar[bool] = False
    #: ``_posterior`` on a block of rows gives those rows of the whole (see the class docstring)
    posterior_by_rows: ClassVar[bool] = True
    #: trained on clean profiles: a benchmark with a clean reference fits on it (degrade protocol)
    uses_reference: ClassVar[bool] = False
    #: the posterior may carry ``var`` / ``dropout_prob`` (``impute`` checks those output slots)
    has_var: ClassVar[bool] = False
    has_dropout_prob: ClassVar[bool] = False
    #: ``_fit`` and ``_posterior`` take counts held compactly (``read_all(compact=True)``: uint16
    #: or float32 values), converting the rows they compute with to float64; where the fit reads
    #: all cells, :func:`screpair.impute_file` then holds them so (6 bytes per stored count)
    compact_counts: ClassVar[bool] = False
    #: a fit on a sample (``_fit_rows``) that still reads any cell's counts, from ``ctx.counts``
    #: (knn averages neighbours' counts): :func:`screpair.impute_file` then keeps all cells'
    #: counts in a temporary file (:class:`screpair._chunks.CountsFile`), not in memory
    reads_all_counts: ClassVar[bool] = False
    #: keyword arguments of ``get_counts`` for the data of ``fit`` / ``posterior``
    _fit_checks: ClassVar[dict[str, Any]] = {}
    _posterior_checks: ClassVar[dict[str, Any]] = {"warn_empty": False}
    #: parameters that moved into a nested config: old flat name -> config parameter (e.g.
    #: ``{"n_epochs": "train"}``); passing the old name is an error that says where it went
    #: (:func:`moved_params_error`), and saved models with the old names still load
    _moved_params: ClassVar[dict[str, str]] = {}

    def set_params(self, **params):
        """sklearn's ``set_params``; a name that moved into a nested config (e.g. ``n_epochs``
        for ``train.n_epochs``) is the one-line error saying where it went."""
        moved = moved_params_error(type(self), params)
        if moved is not None:
            raise moved
        return super().set_params(**params)

    # ---- hooks -------------------------------------------------------------------------------
    def _check_params(self) -> None:
        """Check the parameters (types, ranges) before any data are read; ``fit`` calls it."""
        return None

    def _fit_rows(self, n: int) -> np.ndarray | None:
        """The sorted rows of ``n`` cells that ``_fit`` reads (a sample drawn as
        :func:`sample_rows` draws it, without touching the estimator's state), or ``None``:
        every row (the default; e.g. a transductive method that needs all cells).

        When it gives rows, :meth:`_fit_validated` (every public path: ``fit``,
        :func:`screpair.impute`, :func:`screpair.impute_file`) hands ``_fit`` only those rows,
        with ``ctx.sample`` and ``ctx.totals`` set, so a fit on the whole matrix in memory and
        one on the rows read from a file are the same fit."""
        return None

    def _why_every_row(self, n: int) -> str:
        """Why :meth:`_fit_rows` gives no sample of ``n`` cells (the log of
        :func:`screpair.impute_file`), for a method that takes one above a sample size."""
        return f"{n} cells are not more than its sample size"

    def _fit(self, x, ctx: DataContext) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _posterior(self, x, ctx: DataContext) -> Posterior:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- public API --------------------------------------------------------------------------
    def fit(self, data: Data, *, layer: str | None = None) -> Self:
        """Fit on the raw counts of ``data`` (AnnData: ``X`` or ``layers[layer]``; or a matrix).

        Returns
        -------
        The fitted estimator: ``var_names_``, ``n_obs_`` (transductive methods) and the method's
        own attributes.
        """
        self._check_params()
        x = get_counts(data, layer, **self._fit_checks)
        return self._fit_validated(x, data_context(data, x))

    def posterior(self, data: Data, *, layer: str | None = None) -> Posterior:
        """Imputed counts (and, where the method has them, variance and dropout probabilities)
        for the raw counts of ``data``, which must have the fitted genes (and, for a
        transductive method, the fitted cells)."""
        self._check_fitted()
        x = get_counts(data, layer, **self._posterior_checks)
        return self._posterior_validated(x, data_context(data, x))

    def transform(self, data: Data, *, layer: str | None = None) -> np.ndarray:
        """Imputed counts as a dense ndarray (cells x genes)."""
        mean = self.posterior(data, layer=layer).mean
        return mean.toarray() if sp.issparse(mean) else np.asarray(mean)

    def fit_transform(self, data: Data, *, layer: str | None = None) -> np.ndarray:
        """``fit(data).transform(data)``, validating ``data`` once."""
        if not self._is_template():
            return self.fit(data, layer=layer).transform(data, layer=layer)
        self._check_params()
        x = get_counts(data, layer, **self._fit_checks)
        ctx = data_context(data, x)
        mean = self._fit_validated(x, ctx)._posterior_validated(x, ctx).mean
        return mean.toarray() if sp.issparse(mean) else np.asarray(mean)

    # ---- validated entry points (used by ``impute``, which has validated the counts) ----------
    @classmethod
    def _is_template(cls) -> bool:
        """Whether the public ``fit`` / ``posterior`` are the template's (not overridden)."""
        return cls.fit is BaseImputer.fit and cls.posterior is BaseImputer.posterior

    def _fit_validated(self, x, ctx: DataContext) -> Self:
        """``fit`` on counts already validated by ``get_counts`` (``ctx``: their context). When
        ``x`` holds every cell and :meth:`_fit_rows` asks for a sample, ``_fit`` gets only the
        sample's rows (with their ``ctx.sample`` and all cells' ``ctx.totals``)."""
        self._check_params()
        if ctx.sample is None:
            rows = self._fit_rows(x.shape[0])
            if rows is not None:
                from .._chunks import row_totals

                ctx = replace(ctx, sample=rows, totals=row_totals(x),
                              counts=x if self.reads_all_counts else None)
                x = take_rows(x, rows)
        self._fit(x, ctx)
        self.var_names_ = ctx.var_names
        if self.transductive:
            self.n_obs_ = ctx.n_obs
        return self

    def _posterior_validated(self, x, ctx: DataContext) -> Posterior:
        """``posterior`` on counts already validated by ``get_counts``: the fitted, gene and
        (transductive) cell checks, then ``_posterior``."""
        self._check_fitted()
        compare_var_names(self.var_names_, ctx.var_names if ctx.named else None, x.shape[1])
        if self.transductive:
            self._check_same_cells(ctx.n_obs)
        return self._posterior(x, ctx)

    # ---- checks ------------------------------------------------------------------------------
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
