"""The single AnnData-writing wrapper around every imputation method."""

from __future__ import annotations

import inspect
import time
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, is_dataclass, replace
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._chunks import as_float64, gene_stats, open_rows
from .._logging import get_logger, log_task
from .._utils import (
    NNZ_PIECE,
    RNGLike,
    check_output_keys,
    get_counts,
    jsonable,
    nonempty,
    prepare_adata,
    var_names,
)
from ._base import BaseImputer, DataContext, Posterior, moved_params_error
from ._genes import check_genes, parse_genes, select_genes
from ._registry import get_method

logger = get_logger(__name__)


def make_estimator(method: str | BaseImputer, *, rng: RNGLike = 0, **params) -> BaseImputer:
    """Build the estimator for ``method`` (a registered name or an estimator instance)."""
    if isinstance(method, BaseImputer):
        if params:
            moved = moved_params_error(type(method), params)
            if moved is not None:
                raise moved
            method = method.set_params(**params)
        return method
    if not isinstance(method, str):
        msg = f"method must be a method name or a BaseImputer, got {type(method).__name__}."
        raise TypeError(msg)
    cls = get_method(method)
    moved = moved_params_error(cls, params)  # a name that moved into a nested config
    if moved is not None:
        raise moved
    accepted = {
        k
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    unknown = set(params) - accepted
    if unknown:
        msg = (
            f"method {method!r} got unknown parameter(s) {sorted(unknown)}; "
            f"it accepts {sorted(accepted)}."
        )
        raise TypeError(msg)
    _check_param_types(cls, method, params)
    if "rng" in accepted:
        params.setdefault("rng", rng)
        _check_seed(params["rng"])
    est = cls(**params)
    check = getattr(est, "_check_params", None)
    if check is not None:  # ranges and combinations, before any data are read
        check()
    return est


def quiet_estimator(est: BaseImputer, params: Mapping | None = None) -> None:
    """Switch off an estimator's own progress bars (a ``progress`` parameter: SAVER's gene
    batches; ``train`` settings: the epochs of the neural methods) where ``params``, the
    parameters it was built with, did not ask for them.

    A ``train`` config given as a dict updates the method's own default (for cnn: its preset's
    training settings; for diffusion: its epoch cap), so only ``progress`` changes.
    """
    params = params or {}
    own = est.get_params(deep=False)
    if "progress" in own and "progress" not in params:
        est.set_params(progress=False)
    if "train" not in own:
        return
    train = own["train"]
    if is_dataclass(train):
        est.set_params(train=replace(train, progress=False))
    elif train is None or (isinstance(train, Mapping) and "progress" not in train):
        est.set_params(train={**(train or {}), "progress": False})


#: seeds are stored in ``uns`` (HDF5 int64) and saved models: keep them in range
MAX_SEED = 2**63 - 1


def _check_seed(rng) -> None:
    if isinstance(rng, (bool, np.bool_)) or (
        isinstance(rng, (int, np.integer)) and not 0 <= rng <= MAX_SEED
    ):
        msg = f"rng must be None, a numpy Generator or an integer from 0 to 2**63 - 1, got {rng!r}."
        raise ValueError(msg)


_SIMPLE = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
           type(None): "null (None)"}


def _allowed(hint) -> list | None:
    """The simple alternatives of a type hint (types or Literal values); ``None``: not simple."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return [("literal", v) for v in typing.get_args(hint)]
    if origin in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(hint):
            sub = _allowed(arg)
            if sub is None:
                return None
            out += sub
        return out
    return [hint] if hint in _SIMPLE else None


def _matches(value, alt) -> bool:
    if isinstance(alt, tuple):  # ("literal", v)
        return not isinstance(value, bool) and value == alt[1] or value is alt[1]
    if alt is bool:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if alt is int:
        return isinstance(value, (int, np.integer))
    if alt is float:
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, alt)


def _check_param_types(cls, method: str, params: dict) -> None:
    """Name the parameter whose value has the wrong type (e.g. ``k="abc"``), before any work.

    Only parameters annotated with simple types (int, float, bool, str, None, Literal and their
    unions) are checked; the estimator checks the rest itself.
    """
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: leave the checks to the class
        return
    for name, value in params.items():
        alts = _allowed(hints.get(name))
        if alts is None or any(_matches(value, a) for a in alts):
            continue
        want = " or ".join(repr(a[1]) if isinstance(a, tuple) else _SIMPLE[a] for a in alts)
        msg = f"method {method!r}: parameter {name!r} must be {want}, got {value!r}."
        raise TypeError(msg)


def _scatter(block, cells: np.ndarray, genes: np.ndarray, shape: tuple[int, int]):
    """Place the result for the non-empty cells/genes back into a full-size matrix of zeros."""
    if cells.all() and genes.all():
        return block
    if sp.issparse(block):
        block = block.tocoo()
        rows, cols = np.flatnonzero(cells), np.flatnonzero(genes)
        return sp.csr_matrix((block.data, (rows[block.row], cols[block.col])), shape=shape)
    out = np.zeros(shape, dtype=block.dtype)
    out[np.ix_(cells, genes)] = block
    return out


def _subset(x, rows: np.ndarray, cols: np.ndarray):
    """The counts of the cells ``rows`` and genes ``cols``, in the form ``get_counts`` returns
    (CSR with sorted indices, or a C-ordered ndarray); all rows or all columns kept: one copy,
    not two (at 10^6 cells the counts are GBs)."""
    sub = x if rows.size == x.shape[0] else x[rows]
    sub = sub if cols.size == x.shape[1] else sub[:, cols]
    if sp.issparse(sub):
        sub = sp.csr_matrix(sub)
        sub.sort_indices()
        return sub
    return np.ascontiguousarray(sub)


def _drop_empty(x: sp.csr_matrix, cells: np.ndarray, genes: np.ndarray) -> sp.csr_matrix:
    """The CSR counts ``x`` without the cells ``~cells`` and genes ``~genes``, which hold no
    stored entry (:func:`~screpair._utils.nonempty`'s masks), sharing ``x``'s values: no entry
    goes, so only the row pointers shrink and the column indices are renumbered, in place, by
    pieces. ``x`` is spent (its indices renumbered): for counts the caller owns, such as
    :func:`~screpair.methods._file.impute_file`'s read, where a copy would hold the counts twice."""
    indptr = np.concatenate([x.indptr[:1], x.indptr[1:][cells]])
    if not genes.all():
        new = (np.cumsum(genes) - 1).astype(x.indices.dtype)
        for a in range(0, x.nnz, NNZ_PIECE):
            part = x.indices[a:a + NNZ_PIECE]
            np.take(new, part, out=part)  # buffered: safe in place
    out = sp.csr_matrix((x.data, x.indices, indptr), shape=(int(cells.sum()), int(genes.sum())),
                        copy=False)
    out.has_sorted_indices = x.has_sorted_indices  # the renumbering keeps the order
    return out


def _restrict(m, mask: np.ndarray, observed=None):
    """The layer ``m`` (cells x all genes) with only the genes ``mask`` kept, as float32: all of
    ``m`` when every gene is kept, else CSR with ``observed`` (or zeros) in the other genes."""
    if mask.all():
        return _as_layer(m)
    keep = np.flatnonzero(mask)
    part = sp.csr_matrix(m[:, keep] if sp.issparse(m) else np.asarray(m)[:, keep])
    out = sp.csr_matrix((part.data, keep[part.indices], part.indptr), shape=m.shape)
    if observed is not None:
        rest = np.flatnonzero(~mask)
        obs = sp.csr_matrix(observed[:, rest])
        out = out + sp.csr_matrix((obs.data, rest[obs.indices], obs.indptr), shape=m.shape)
    out.sort_indices()
    return sp.csr_matrix(out, dtype=np.float32)


@dataclass
class _Job:
    """An estimator and the validated counts of its cells and genes with counts (those without
    are set aside, as :func:`impute` does): fit once, then the posterior of all rows or of a
    block of them (``posterior(i0, i1)``: rows ``i0:i1`` of ``x``, for ``posterior_by_rows``
    methods on the template)."""

    est: BaseImputer
    x: Any  # validated counts of the non-empty cells x genes
    ctx: DataContext | None
    cells: np.ndarray  # masks over all cells / genes
    genes: np.ndarray
    rows: np.ndarray  # indices of the kept cells
    sub: AnnData | None = None  # for estimators with their own public fit / posterior
    #: ``x`` holds only these kept cells (the fit's sample, read from a file), not all of them
    sample: np.ndarray | None = None

    @classmethod
    def from_sample(cls, est: BaseImputer, x, sample: np.ndarray, totals, *, cells: np.ndarray,
                    genes: np.ndarray, obs, var, names, counts=None) -> _Job:
        """The job of a template estimator whose fit reads only the kept cells ``sample``
        (:meth:`BaseImputer._fit_rows`), ``x`` their validated counts of the kept genes and
        ``totals`` the :class:`~screpair._chunks.RowTotals` of all kept cells: the context is
        the one :meth:`prepare` builds, plus ``sample``, ``totals`` and ``counts`` (all kept
        cells' counts read by rows, for ``reads_all_counts``), so the fit is the one
        ``prepare``'s job makes from all counts in memory."""
        rows, cols = np.flatnonzero(cells), np.flatnonzero(genes)
        obs = obs.iloc[rows].copy()
        var = var.iloc[cols].copy()
        var.index = names[genes]
        ctx = DataContext(var_names=var.index, obs=obs, var=var, layers={}, n_obs=rows.size,
                          rows=slice(0, rows.size), sample=sample, totals=totals,
                          counts=counts)
        return cls(est, x, ctx, cells, genes, rows, sample=sample)

    @classmethod
    def prepare(cls, est: BaseImputer, x, *, obs, var, names, layers: Mapping[str, Any],
                owned: bool = False) -> _Job:
        """The job of the validated counts ``x`` of all cells and genes. ``owned``: ``x`` is the
        caller's to spend (CSR with sorted indices): its cells and genes with counts are then
        taken without a copy (:func:`_drop_empty`), and ``x`` must not be used afterwards
        unless the job's counts are ``x`` itself (every cell and gene has counts)."""
        cells, genes = nonempty(x)
        rows, cols = np.flatnonzero(cells), np.flatnonzero(genes)
        full = cells.all() and genes.all()
        if full:
            sub_x = x
        elif owned and sp.isspmatrix_csr(x) and x.has_sorted_indices:
            sub_x = _drop_empty(x, cells, genes)
        else:
            sub_x = _subset(x, rows, cols)
        obs = obs.iloc[rows].copy()
        var = var.iloc[cols].copy()  # methods may read columns (gene_length)
        var.index = names[genes]
        layers = {k: v if full else v[rows][:, cols] for k, v in layers.items()}
        n_obs = sub_x.shape[0]
        if est._is_template():  # hand over the validated counts: no second get_counts
            ctx = DataContext(var_names=var.index, obs=obs, var=var, layers=layers, n_obs=n_obs,
                              rows=slice(0, n_obs))
            return cls(est, sub_x, ctx, cells, genes, rows)
        sub = AnnData(X=sub_x, obs=obs, var=var, layers=layers)
        return cls(est, sub_x, None, cells, genes, rows, sub)

    @property
    def by_rows(self) -> bool:
        """Whether the posterior can be computed block by block of rows."""
        return self.ctx is not None and bool(self.est.posterior_by_rows)

    def fit(self) -> _Job:
        if self.ctx is not None:
            self.est._fit_validated(self.x, self.ctx)
            if self.sample is not None:  # the posterior's contexts: blocks of all kept cells
                self.ctx = replace(self.ctx, sample=None, totals=None, counts=None)
        else:  # an estimator with its own public fit / posterior validates an AnnData itself
            self.est.fit(self.sub)
        return self

    def posterior(self, i0: int = 0, i1: int | None = None) -> Posterior:
        """The posterior of the kept cells ``i0:i1`` from the counts held (all kept cells)."""
        if self.sample is not None:
            msg = "this job holds only its fit's sample: use block_posterior on each block."
            raise RuntimeError(msg)
        i1 = self.x.shape[0] if i1 is None else i1
        if self.ctx is None:
            return self.est.posterior(self.sub)
        if (i0, i1) == (0, self.x.shape[0]):
            return self.est._posterior_validated(self.x, self.ctx)
        ctx = replace(self.ctx, rows=slice(i0, i1))  # float64 rows of compact counts
        return self.est._posterior_validated(as_float64(self.x[i0:i1]), ctx)


    def block_posterior(self, block, s: int, e: int, i0: int, i1: int) -> Posterior:
        """The posterior of rows ``s:e`` of the data set (all cells and genes), whose validated
        counts are ``block`` and which hold the kept cells ``i0:i1`` (``i1 > i0``)."""
        cells = self.cells[s:e]
        full = cells.all() and self.genes.all()
        sub = block if full else _subset(block, np.flatnonzero(cells), np.flatnonzero(self.genes))
        return self.est._posterior_validated(sub, replace(self.ctx, rows=slice(i0, i1)))

    def probe(self) -> Posterior:
        """The posterior of one kept cell: which fields the method returns, dense or sparse."""
        if self.sample is None:
            return self.posterior(0, 1)
        r = int(self.sample[0])
        return self.est._posterior_validated(self.x[0:1], replace(self.ctx, rows=slice(r, r + 1)))


def _as_layer(m):
    if m is None:
        return None
    if sp.issparse(m):
        return sp.csr_matrix(m, dtype=np.float32)
    return np.asarray(m, dtype=np.float32)


def impute(
    adata: AnnData,
    method: str | BaseImputer = "alra",
    *,
    layer: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
    overwrite: bool = False,
    genes: str | Sequence[str] | None = None,
    rng: RNGLike = 0,
    **params,
) -> AnnData | None:
    """Impute / repair the counts of ``adata`` with one of screpair's methods.

    Parameters
    ----------
    adata
        Cells x genes. Raw counts in ``X`` or in ``layers[layer]``.
    method
        A registered method name (see :func:`screpair.available_methods`) or an estimator.
    layer
        Layer holding the raw counts; ``None`` uses ``X``.
    key_added
        Name of the output layer; defaults to the method name.
    copy
        Return a modified copy instead of writing into ``adata``.
    overwrite
        Allow the output to replace existing ``layers`` / ``uns`` entries of the same name. Without
        it such a name is an error (raised before any work); the layer holding the input counts
        is never replaced.
    genes
        Return imputed values only for these genes: ``"hvg:N"`` (the ``N`` most variable genes
        by dispersion, :func:`screpair.pp.hvg_dispersion` on all cells), the name of a boolean
        ``var`` column, a gene name or a list of names; unknown names are an error before any
        work. The method still sees every gene (the fit is the same as without ``genes``); the
        output layer holds the imputed values of the chosen genes and the observed counts of
        the others, stored as CSR (``_var`` / ``dropout_prob`` layers: zero for the others).
        ``None``: every gene (a dense layer, or CSR where the method's output is sparse).
    rng
        Seed or ``numpy.random.Generator`` for methods with randomness.
    **params
        Method parameters (see each estimator's docstring).

    Returns
    -------
    ``None``, or a copy when ``copy=True``. Writes

    - ``.layers[key_added | method]``: imputed counts on the count scale (float32);
    - ``.layers[f"{key}_var"]``: posterior variance, for methods that have one;
    - ``.layers["dropout_prob"]``: dropout probabilities, for methods that compute them;
    - ``.uns[key]``: ``{"method", "params", "layer", "version", "seconds", ...}`` (with
      ``genes=``: also ``"genes"`` and ``"n_genes_imputed"``).

    For data larger than memory, :func:`screpair.impute_file` reads a file by blocks of cells
    and streams the same results to a new file.

    Cells and genes with no counts are set aside (with a warning) and returned unchanged.
    ``X`` and every other slot are left untouched.
    """
    from .. import __version__

    if not isinstance(adata, AnnData):  # before building the estimator: the clearer error
        prepare_adata(adata, copy, "impute")
    est = make_estimator(method, rng=rng, **params)
    key = key_added or est.name
    outputs = [key]
    if est.has_var:
        outputs.append(f"{key}_var")
    if est.has_dropout_prob and getattr(est, "dropout_layer", None) != "dropout_prob":
        outputs.append("dropout_prob")
    check_output_keys(adata, outputs, layer=layer, overwrite=overwrite, uns=(key,))
    spec = check_genes(parse_genes(genes), adata.var, adata.var_names.astype(str))
    adata = prepare_adata(adata, copy, "impute")

    x = get_counts(adata, layer)
    names = var_names(adata)
    mask = select_genes(spec, adata.var.set_axis(names), names,
                        lambda: gene_stats(open_rows(x, validated=True), x.shape[0]))
    read = {getattr(est, "dropout_layer", None)} & set(adata.layers)  # layers a method reads
    job = _Job.prepare(est, x, obs=adata.obs, var=adata.var, names=names,
                       layers={k: adata.layers[k] for k in read})
    cells, genes = job.cells, job.genes

    start = time.perf_counter()
    n_obs, n_vars = job.x.shape
    with log_task(f"imputing {n_obs} cells x {n_vars} genes with {est.name!r}", logger):
        post = job.fit().posterior()
    seconds = time.perf_counter() - start

    shape = adata.shape
    late = [k for k, m in ((f"{key}_var", post.var), ("dropout_prob", post.dropout_prob))
            if m is not None and k not in outputs and k != getattr(est, "dropout_layer", None)]
    check_output_keys(adata, late, layer=layer, overwrite=overwrite)  # estimators without flags
    outputs += late
    observed = None if mask.all() else x
    adata.layers[key] = _restrict(_scatter(post.mean, cells, genes, shape), mask, observed)
    if post.var is not None:
        adata.layers[f"{key}_var"] = _restrict(_scatter(post.var, cells, genes, shape), mask)
    if post.dropout_prob is not None and "dropout_prob" in outputs:
        adata.layers["dropout_prob"] = _restrict(
            _scatter(post.dropout_prob, cells, genes, shape), mask)
    adata.uns[key] = {
        "method": est.name,
        "params": jsonable(est.get_params(deep=False)),
        "layer": jsonable(layer),
        "version": __version__,
        "seconds": float(seconds),
        "n_cells_set_aside": int((~cells).sum()),
        "n_genes_set_aside": int((~genes).sum()),
    }
    if spec is not None:
        adata.uns[key]["genes"] = spec.text
        adata.uns[key]["n_genes_imputed"] = int(mask.sum())
    return adata if copy else None
