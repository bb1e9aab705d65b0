"""Peer methods and trivial baselines for the benchmark, as :class:`BaseImputer` estimators.

- ``raw``: no imputation (the observed counts), the reference every method must beat;
- ``gene_mean``: each gene's mean of its non-zero ``log1p(CPM)`` values, mapped back to counts
  (issue 5's trivial baseline);
- ``cqn``: conditional quantile normalization's regression step (Hansen et al. 2012): each cell's
  dependence of log-expression on gene length (and GC content where ``var`` has it) removed,
  the baseline of the DiffRepairer paper's tables;
- ``magic``: MAGIC (van Dijk et al. 2018) via ``magic-impute``, defaults, on ``log1p(CPM)``;
- ``scvi``: scVI (Lopez et al. 2018) via ``scvi-tools``, defaults, CPU.

The peers import their package lazily; a missing package raises ``ImportError`` with a note on
how to install it (the benchmark records the run as skipped).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import scipy.sparse as sp

from .. import _norm
from .._utils import RNGLike, as_rng, library_size, to_dense, torch_seed
from ..methods._base import BaseImputer, DataContext, Posterior

#: name -> estimator class, for the benchmark runner (checked before the method registry).
PEERS: dict[str, type[BaseImputer]] = {}


def _register(cls: type[BaseImputer]) -> type[BaseImputer]:
    PEERS[cls.name] = cls
    return cls


@_register
class RawImputer(BaseImputer):
    """No imputation: returns the observed counts (baseline)."""

    name = "raw"
    transductive = True

    def __init__(self, *, rng: RNGLike = None):
        self.rng = rng

    def _fit(self, x, ctx: DataContext) -> None:
        return None

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        return Posterior(mean=to_dense(x))


@_register
class GeneMeanImputer(BaseImputer):
    """Every entry set to its gene's mean non-zero ``log1p(CPM)`` value, on the count scale.

    ``mean_g = mean over cells with x_cg > 0 of log1p(x_cg / L_c * 1e6)``; the prediction is
    ``expm1(mean_g) * L_c / 1e6`` (so that scoring on ``log1p(CPM)`` gives back ``mean_g``).
    """

    name = "gene_mean"
    transductive = True

    def __init__(self, *, rng: RNGLike = None):
        self.rng = rng

    def _fit(self, x, ctx: DataContext) -> None:
        x = to_dense(x)
        lib = library_size(x)
        lg = _norm.log_normalize(x, _norm.CPM, lib)
        nz = x > 0
        with np.errstate(invalid="ignore"):
            mean = np.where(nz, lg, 0.0).sum(0) / nz.sum(0)
        self.gene_log_mean_ = np.nan_to_num(mean, nan=0.0)

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        lib = library_size(x)
        v = np.broadcast_to(self.gene_log_mean_, x.shape)
        return Posterior(mean=_norm.to_counts(v, lib, _norm.CPM))


#: expressed genes a cell needs per fitted term before :class:`CQNImputer` corrects it
_CQN_GENES_PER_TERM = 10
#: ``var`` columns read as GC content (fraction or percent) by :class:`CQNImputer`
GC_KEYS = ("gc", "gc_content", "GC", "percent_gc")


def _cqn_basis(adata_var, names, degree: int) -> np.ndarray:
    """Genes x p design: 1, then powers 1..degree of standardized log length (and of GC)."""
    from ..simulate import default_gene_length

    if "gene_length" in adata_var:
        length = np.asarray(adata_var["gene_length"], dtype=np.float64)
    else:
        length = default_gene_length(names)
    cols = [np.log(np.maximum(length, 1.0))]
    gc_key = next((k for k in GC_KEYS if k in adata_var), None)
    if gc_key is not None:
        cols.append(np.asarray(adata_var[gc_key], dtype=np.float64))
    basis = [np.ones(len(names))]
    for c in cols:
        z = (c - c.mean()) / (c.std() or 1.0)
        basis += [z**d for d in range(1, degree + 1)]
    return np.column_stack(basis)


@_register
class CQNImputer(BaseImputer):
    """Conditional quantile normalization's regression step (Hansen, Irizarry & Wu 2012), per cell.

    For every cell ``i``, ``y_ij = log1p(x_ij / L_i * 1e4)`` of its expressed genes is regressed
    (least squares, ridge ``1e-6``) on a cubic polynomial of the standardized log gene length,
    plus one of GC content when ``var`` holds it (``GC_KEYS``; otherwise length only). The
    cell's own curve is replaced by the curve averaged over the fitted cells::

        y'_ij = y_ij - B_j (beta_i - beta_mean),   B_j without its intercept column

    so each cell keeps its level but loses its own length (3' bias) and GC effect. Zeros stay
    zero (CQN corrects what was measured; it does not impute), and ``y'`` is clipped at 0 and
    mapped back to counts at the observed library size. Gene lengths come from
    ``var['gene_length']``, else :func:`screpair.simulate.default_gene_length` (as the degrade
    protocol's damage does). Departures from CQN: least squares instead of median regression and
    polynomials instead of natural splines (fast and vectorised over cells), and no quantile
    normalization of the residuals across cells (with most entries zero in single cells it would
    mostly rank zeros). Cells with fewer than 10 expressed genes per fitted term are left as they
    are (a cubic through a handful of genes extrapolates wildly), and a corrected value never
    exceeds the cell's largest observed one.
    """

    name = "cqn"

    def __init__(self, *, degree: int = 3, rng: RNGLike = None):
        self.degree = degree
        self.rng = rng

    def _coef(self, x, ctx: DataContext) -> tuple:
        x = sp.csr_matrix(x, dtype=np.float64)
        names = ctx.var_names
        basis = _cqn_basis(ctx.var, names, self.degree)
        lib = library_size(x)
        y = _norm.log_normalize(x, _norm.CP10K, lib)
        expressed = y.copy()
        expressed.data[:] = 1.0
        p = basis.shape[1]
        outer = np.einsum("gk,gl->gkl", basis, basis).reshape(len(names), p * p)
        gram = (expressed @ outer).reshape(-1, p, p) + 1e-6 * np.eye(p)
        rhs = np.asarray(y @ basis)
        coef = np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]
        enough = np.diff(y.indptr) >= _CQN_GENES_PER_TERM * p  # a curve worth fitting
        return y, lib, basis, coef, enough

    def _check_params(self) -> None:
        if not isinstance(self.degree, (int, np.integer)) or self.degree < 1:
            msg = f"degree must be a positive integer, got {self.degree!r}."
            raise ValueError(msg)

    def _fit(self, x, ctx: DataContext) -> None:
        _, _, _, coef, enough = self._coef(x, ctx)
        self.coef_mean_ = coef[enough].mean(0) if enough.any() else np.zeros(coef.shape[1])

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        y, lib, basis, coef, enough = self._coef(x, ctx)
        rows = np.repeat(np.arange(y.shape[0]), np.diff(y.indptr))
        delta = np.where(enough[:, None], coef - self.coef_mean_, 0.0)[:, 1:]
        shift = np.einsum("ek,ek->e", delta[rows], basis[y.indices, 1:])  # at the entries only
        has = np.diff(y.indptr) > 0
        cell_max = np.zeros(y.shape[0])
        cell_max[has] = np.maximum.reduceat(y.data, y.indptr[:-1][has]) if y.nnz else 0.0
        out = y.copy()
        out.data = np.clip(y.data - shift, 0.0, cell_max[rows])
        out.data = np.expm1(out.data) * (lib[rows] / _norm.CP10K)
        return Posterior(mean=out)


class _Precomputed(BaseImputer):
    """A transductive peer whose ``fit`` computes the whole output (``imputed_``) at once."""

    transductive = True

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        return Posterior(mean=self.imputed_[ctx.rows])


@_register
class MagicImputer(_Precomputed):
    """MAGIC 3 (``magic.MAGIC`` defaults: knn=5, t=3, decay=1, n_pca=100) on ``log1p(CPM)``.

    The smoothed log values are mapped back to counts with ``expm1(v) * L / 1e6`` at each cell's
    observed library size ``L``.

    Parameters
    ----------
    knn, t, n_pca
        MAGIC parameters (``None`` keeps MAGIC's default).
    rng
        Seed for MAGIC's ``random_state``.
    """

    name = "magic"

    def __init__(self, *, knn: int | None = None, t: int | str | None = None,
                 n_pca: int | None = None, rng: RNGLike = None):
        self.knn, self.t, self.n_pca, self.rng = knn, t, n_pca, rng

    def _fit(self, x, ctx: DataContext) -> None:
        try:
            import magic
        except ImportError as e:
            e.add_note("The `magic` peer needs magic-impute: `pip install 'screpair[bench]'` "
                       "or `pip install magic-impute`.")
            raise
        x = to_dense(x)
        lib = library_size(x)
        kw = {k: v for k, v in {"knn": self.knn, "t": self.t, "n_pca": self.n_pca}.items()
              if v is not None}
        seed = int(as_rng(self.rng).integers(2**31))
        op = magic.MAGIC(random_state=seed, verbose=0, n_jobs=1, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # third-party chatter (graphtools, sklearn)
            smooth = np.asarray(op.fit_transform(_norm.log_normalize(x, _norm.CPM, lib)),
                                dtype=np.float64)
        self.imputed_ = _norm.to_counts(smooth, lib, _norm.CPM)


@contextlib.contextmanager
def _quiet_scvi():
    names = ["scvi", "lightning", "lightning.pytorch", "pytorch_lightning", "lightning.fabric"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


@_register
class ScviImputer(_Precomputed):
    """scVI (``scvi.model.SCVI`` defaults) on CPU; output ``get_normalized_expression() * L``.

    ``get_normalized_expression`` gives each cell's expected expression proportions (rows sum to
    1); multiplying by the observed library size ``L`` puts them on the count scale.

    Parameters
    ----------
    max_epochs
        Training epochs; ``None`` keeps scvi-tools' default (``min(round(20000 / n_cells * 400),
        400)``). Small values make quick test runs.
    n_latent
        Latent dimension (``None``: scvi's default, 10).
    rng
        Seed; torch's global RNG is seeded inside a ``torch.random.fork_rng`` block, so the
        caller's global state is restored afterwards.
    """

    name = "scvi"

    def __init__(self, *, max_epochs: int | None = None, n_latent: int | None = None,
                 rng: RNGLike = None):
        self.max_epochs, self.n_latent, self.rng = max_epochs, n_latent, rng

    def _fit(self, x, ctx: DataContext) -> None:
        try:
            import scvi
        except ImportError as e:
            e.add_note("The `scvi` peer needs scvi-tools: `pip install 'screpair[bench]'` "
                       "or `pip install scvi-tools`.")
            raise
        import torch
        from anndata import AnnData

        lib = library_size(x)
        ad = AnnData(X=sp.csr_matrix(x, dtype=np.float32))
        seed = torch_seed(as_rng(self.rng))
        kw = {} if self.n_latent is None else {"n_latent": self.n_latent}
        with _quiet_scvi(), torch.random.fork_rng():
            torch.manual_seed(seed)
            scvi.model.SCVI.setup_anndata(ad)
            model = scvi.model.SCVI(ad, **kw)
            model.train(max_epochs=self.max_epochs, accelerator="cpu", devices=1,
                        enable_progress_bar=False)
            rho = np.asarray(model.get_normalized_expression(ad, library_size=1.0,
                                                              return_numpy=True), dtype=np.float64)
        rho *= lib[:, None]  # in place: one dense float64 copy, not two (same values)
        self.imputed_ = rho
