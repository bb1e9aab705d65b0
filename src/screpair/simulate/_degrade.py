"""RNA-degradation damage of clean expression profiles, after the DiffRepairer paper.

The damage model works on the log-normalized scale ``y = log1p(x / L * target_sum)`` (``x``
counts, ``L`` the cell's library size, CP10k by default), as the paper's training pairs do. For
cell ``c`` and gene ``g``:

``y'_cg = max(0, M_cg * y_cg * d_cg + eps_cg)``

- 3' bias: ``M_cg = exp(-b_c * l_g / median(l))`` keeps a fraction of the signal that decays with
  transcript length ``l_g`` and degradation intensity ``b_c`` (``bias_3p``): to first order a
  fraction ``b_c l_g / median(l)`` of the signal is removed, so longer transcripts lose more. The
  exponential is the survival probability of an intact 3' end under uniformly placed breaks, so
  ``M`` stays in ``(0, 1]`` for any intensity;
- dropout: ``d_cg ~ Bernoulli(1 - r_c)`` with dropout rate ``r_c``;
- noise: ``eps_cg ~ Normal(0, s_c^2)`` with ``s_c`` = ``noise_sd``, added to every entry (zeros
  included) before clipping at 0.

Each of ``b``, ``r``, ``s`` may be one value, one value per cell, or a ``(low, high)`` range from
which each cell draws uniformly, so a trainer can mix mild and severe damage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from anndata import AnnData
from scipy.special import ndtri

from .. import _norm
from .._logging import get_logger, log_task
from .._utils import RNGLike, as_rng, get_counts, library_size, to_dense
from ._common import check_range, csr, truth_adata

logger = get_logger(__name__)

#: A damage parameter: one value, one value per cell, or a ``(low, high)`` tuple drawn per cell.
CellParam = float | Sequence[float] | np.ndarray | tuple[float, float]

#: Log-normal law of the stand-in transcript lengths (bp) used when no lengths are given:
#: ``LogNormal(meanlog=log(2000), sdlog=0.7)``, roughly the spread of human mRNA lengths
#: (median 2 kb, central 95% about 0.5 to 8 kb). See :func:`default_gene_length`.
DEFAULT_LENGTH_MEANLOG, DEFAULT_LENGTH_SDLOG = float(np.log(2000.0)), 0.7

_BLOCK_ENTRIES = 2**21


@dataclass
class DegradeOutput:
    """Result of :func:`degrade_log`.

    Attributes
    ----------
    log
        Degraded log-normalized values (cells x genes, float64, >= 0).
    dropped
        Boolean Bernoulli dropout draws (``True`` = the entry was zeroed before the noise).
    bias_3p, dropout_rate, noise_sd
        The per-cell damage parameters used (length ``n_obs``).
    retention
        The 3' bias factor ``M`` (cells x genes).
    """

    log: np.ndarray
    dropped: np.ndarray
    bias_3p: np.ndarray
    dropout_rate: np.ndarray
    noise_sd: np.ndarray
    retention: np.ndarray


def _cell_values(
    name: str, value: CellParam, n_obs: int, rng: np.random.Generator, high: float = np.inf
) -> np.ndarray:
    """Expand a damage parameter to one value per cell.

    A ``tuple`` of two numbers is a ``(low, high)`` range drawn uniformly per cell; a list or array
    must have one value per cell; a scalar is used for every cell.
    """
    if isinstance(value, tuple):
        if len(value) != 2:
            msg = f"{name} as a tuple must be a (low, high) range, got {value!r}."
            raise ValueError(msg)
        low, hi = float(value[0]), float(value[1])
        check_range(name, [low, hi], 0.0, high)
        if hi < low:
            msg = f"{name} range must have low <= high, got {value!r}."
            raise ValueError(msg)
        return rng.uniform(low, hi, n_obs)
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        check_range(name, float(arr), 0.0, high)
        arr = np.full(n_obs, float(arr))
    elif arr.shape != (n_obs,):
        msg = (
            f"{name} must be a number, a (low, high) tuple or one value per cell ({n_obs}), "
            f"got shape {arr.shape}."
        )
        raise ValueError(msg)
    check_range(name, arr, 0.0, high)
    return arr.copy()


def default_gene_length(names) -> np.ndarray:
    """Stand-in transcript lengths (bp) when none are known, one per gene name.

    ``length = exp(log(2000) + 0.7 * z)`` with ``z = Phi^-1(u)`` and ``u`` in ``(0, 1)`` taken
    from the BLAKE2b hash of the gene name: a ``LogNormal(log(2000), 0.7)`` draw that is the same
    for a gene in every call, whatever the other genes, the order or the ``rng``. So repeated
    degradations of one dataset (training views, gene subsets) agree on every gene's length.
    """
    digests = [
        int.from_bytes(hashlib.blake2b(str(n).encode(), digest_size=8).digest(), "little")
        for n in names
    ]
    u = (np.asarray(digests, dtype=np.float64) + 0.5) / 2.0**64
    return np.exp(DEFAULT_LENGTH_MEANLOG + DEFAULT_LENGTH_SDLOG * ndtri(u))


def _relative_length(gene_length) -> np.ndarray:
    length = np.asarray(gene_length, dtype=np.float64).ravel()
    check_range("gene_length", length, 0.0)
    med = np.median(length)
    if not med > 0:
        msg = "gene_length must have a positive median."
        raise ValueError(msg)
    return length / med


def degrade_log(
    y: np.ndarray,
    *,
    bias_3p: CellParam = 0.0,
    dropout_rate: CellParam = 0.0,
    noise_sd: CellParam = 0.0,
    gene_length: np.ndarray,
    rng: RNGLike = None,
) -> DegradeOutput:
    """Damage log-normalized profiles: 3' bias, Bernoulli dropout, Gaussian noise clipped at 0.

    ``degrade_log(y, *, bias_3p=0.0, dropout_rate=0.0, noise_sd=0.0, gene_length, rng=None)
    -> DegradeOutput``. This is the array core of :func:`degrade`, meant for training loops that
    draw fresh damage per minibatch.

    Parameters
    ----------
    y
        Clean ``log1p`` normalized values, dense (cells x genes), non-negative.
    bias_3p
        Degradation intensity ``b`` (>= 0): the 3' bias keeps ``exp(-b * l_g / median(l))``.
    dropout_rate
        Probability ``r`` in ``[0, 1]`` that an entry is zeroed.
    noise_sd
        Standard deviation ``s`` (>= 0) of the Gaussian noise on the log scale.
    gene_length
        Transcript length of each gene (any unit; only ratios to the median matter).
    rng
        Seed or :class:`numpy.random.Generator`; the same seed gives bit-identical output.

    Each of ``bias_3p``, ``dropout_rate``, ``noise_sd`` is a number, one value per cell, or a
    ``(low, high)`` tuple from which every cell draws uniformly.

    Returns
    -------
    :class:`DegradeOutput` with the degraded values, the dropout draws and the per-cell parameters.
    Random draws happen in this order: the per-cell ranges (bias, dropout, noise), then dropout
    uniforms, then the noise.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        msg = f"y must be 2-D (cells x genes), got shape {y.shape}."
        raise ValueError(msg)
    check_range("y", y, 0.0)
    rel = _relative_length(gene_length)
    if rel.size != y.shape[1]:
        msg = f"gene_length has {rel.size} values but y has {y.shape[1]} genes."
        raise ValueError(msg)
    rng = as_rng(rng)
    n = y.shape[0]
    b = _cell_values("bias_3p", bias_3p, n, rng)
    r = _cell_values("dropout_rate", dropout_rate, n, rng, high=1.0)
    s = _cell_values("noise_sd", noise_sd, n, rng)
    retention = np.exp(-b[:, None] * rel[None, :])
    dropped = rng.random(y.shape) < r[:, None]
    out = np.where(dropped, 0.0, retention * y)
    if np.any(s > 0):
        out += rng.standard_normal(y.shape) * s[:, None]
        np.maximum(out, 0.0, out=out)
    return DegradeOutput(out, dropped, b, r, s, retention)


def _round_counts(x: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray:
    near = np.rint(x)
    x = np.where(np.abs(x - near) < 1e-6, near, x)  # undo float error of expm1(log1p(.))
    if how == "nearest":
        return near
    if how == "stochastic":
        low = np.floor(x)
        return low + (rng.random(x.shape) < (x - low))
    return x


@dataclass
class DegradeCountsOutput:
    """Result of :func:`degrade_counts`.

    Attributes
    ----------
    counts
        Degraded counts (CSR float32, cells x genes).
    dropout_mask
        ``True`` where a non-zero clean count was hit by the Bernoulli dropout (CSR bool).
    bias_3p, dropout_rate, noise_sd
        The per-cell damage parameters used (length ``n_obs``).
    library_size
        Each cell's clean library size ``L``.
    """

    counts: sp.csr_matrix
    dropout_mask: sp.csr_matrix
    bias_3p: np.ndarray
    dropout_rate: np.ndarray
    noise_sd: np.ndarray
    library_size: np.ndarray


def _check_degrade_options(rounding: str, target_sum: float) -> None:
    if rounding not in ("stochastic", "nearest", "none"):
        msg = f"rounding must be 'stochastic', 'nearest' or 'none', got {rounding!r}."
        raise ValueError(msg)
    if not target_sum > 0:
        msg = f"target_sum must be > 0, got {target_sum!r}."
        raise ValueError(msg)


def degrade_counts(
    x,
    *,
    bias_3p: CellParam = 0.0,
    dropout_rate: CellParam = 0.0,
    noise_sd: CellParam = 0.0,
    gene_length: np.ndarray,
    target_sum: float = 1e4,
    rounding: Literal["stochastic", "nearest", "none"] = "stochastic",
    rng: RNGLike = None,
) -> DegradeCountsOutput:
    """Degrade a clean count matrix (3' bias, dropout, noise): the matrix core of :func:`degrade`.

    The counts are log-normalized (``y = log1p(x / L * target_sum)``, ``L`` each cell's clean
    library size), damaged by :func:`degrade_log` and turned back into counts at the clean
    library size, ``x' = expm1(y') * L / target_sum``, then rounded (``rounding``), in row blocks
    of about two million entries so that only one block is ever dense.

    Parameters
    ----------
    x
        Clean raw counts, cells x genes (dense or sparse).
    bias_3p, dropout_rate, noise_sd, target_sum, rounding, rng
        As for :func:`degrade`.
    gene_length
        Transcript length of each gene (one value per column; only ratios to the median matter).
        For stand-ins seeded by gene name use :func:`default_gene_length` of the gene names.

    Returns
    -------
    :class:`DegradeCountsOutput`. Random draws happen in this order: the per-cell ranges (bias,
    dropout, noise), then per row block the dropout uniforms, the noise and the rounding.
    """
    _check_degrade_options(rounding, target_sum)
    x = get_counts(x, warn_empty=False)
    return _degrade_matrix(
        x,
        bias_3p=bias_3p,
        dropout_rate=dropout_rate,
        noise_sd=noise_sd,
        gene_length=gene_length,
        target_sum=target_sum,
        rounding=rounding,
        rng=as_rng(rng),
        what="the data have",
    )


def _degrade_matrix(
    x, *, bias_3p, dropout_rate, noise_sd, gene_length, target_sum, rounding, rng, what: str
) -> DegradeCountsOutput:
    """:func:`degrade_counts` on counts that :func:`get_counts` has already validated."""
    x = sp.csr_matrix(x) if not sp.issparse(x) else x
    n_obs, n_vars = x.shape
    length = np.asarray(gene_length, dtype=np.float64).ravel()
    if length.size != n_vars:
        msg = f"gene_length has {length.size} values but {what} {n_vars} genes."
        raise ValueError(msg)
    _relative_length(length)  # validate before drawing anything else

    b = _cell_values("bias_3p", bias_3p, n_obs, rng)
    r = _cell_values("dropout_rate", dropout_rate, n_obs, rng, high=1.0)
    s = _cell_values("noise_sd", noise_sd, n_obs, rng)
    lib = library_size(x)
    scale = _norm.scale_factors(lib, target_sum)  # cells without counts: y = 0 and L = 0

    counts, masks = [], []
    step = max(1, _BLOCK_ENTRIES // n_vars)
    with log_task(f"degrading {n_obs} cells x {n_vars} genes", logger):
        for start in range(0, n_obs, step):
            sl = slice(start, min(start + step, n_obs))
            clean = x[sl].toarray()
            y = _norm.log1p(_norm.scale_rows(clean, scale[sl]))
            out = degrade_log(
                y, bias_3p=b[sl], dropout_rate=r[sl], noise_sd=s[sl], gene_length=length, rng=rng
            )
            back = _norm.unnormalize(np.expm1(out.log), lib[sl], target_sum)
            counts.append(csr(_round_counts(back, rounding, rng)))
            masks.append(csr(out.dropped & (clean > 0), dtype=bool))
    return DegradeCountsOutput(
        sp.vstack(counts, format="csr"), sp.vstack(masks, format="csr"), b, r, s, lib
    )


def _resolve_gene_length(adata: AnnData, gene_length: str | np.ndarray | None):
    """The lengths :func:`degrade` uses and where they came from (for ``uns``)."""
    if isinstance(gene_length, str):
        if gene_length not in adata.var:
            msg = f"gene_length column {gene_length!r} not found in adata.var."
            raise KeyError(msg)
        return adata.var[gene_length].to_numpy(dtype=np.float64), f"var[{gene_length!r}]"
    if gene_length is None and "gene_length" in adata.var:
        return adata.var["gene_length"].to_numpy(dtype=np.float64), "var['gene_length']"
    if gene_length is None:
        logger.info(
            "no gene lengths given: drew them from LogNormal(log(2000), 0.7) (median 2 kb), "
            "seeded by each gene's name"
        )
        return default_gene_length(adata.var_names), "drawn from gene names"
    return np.asarray(gene_length, dtype=np.float64).ravel(), "given"


def degrade(
    adata: AnnData,
    *,
    layer: str | None = None,
    bias_3p: CellParam = 0.0,
    dropout_rate: CellParam = 0.0,
    noise_sd: CellParam = 0.0,
    gene_length: str | np.ndarray | None = None,
    target_sum: float = 1e4,
    rounding: Literal["stochastic", "nearest", "none"] = "stochastic",
    rng: RNGLike = None,
) -> AnnData:
    """Simulate RNA degradation of clean counts (3' bias, dropout, noise), keeping the truth.

    Signature: ``degrade(adata, *, layer=None, bias_3p=0.0, dropout_rate=0.0, noise_sd=0.0,
    gene_length=None, target_sum=1e4, rounding="stochastic", rng=None) -> AnnData``.

    The clean counts ``x`` are log-normalized (``y = log1p(x / L * target_sum)``, ``L`` the
    cell's clean library size), damaged by :func:`degrade_log` (see the module docstring for the
    model), and turned back into counts at the clean library size: ``x' = expm1(y') * L /
    target_sum``, then rounded to integers (``rounding``). Converting with the clean ``L`` keeps
    the signal lost to degradation lost (degraded cells have smaller libraries), and the degraded
    log values are exactly ``log1p(x' / L * target_sum)`` when ``rounding="none"``. The matrix
    work is :func:`degrade_counts`; this function resolves the gene lengths and builds the
    AnnData.

    Parameters
    ----------
    adata
        Cells x genes with clean raw counts in ``X`` or ``layers[layer]``. Not modified.
    layer
        Layer with the clean counts; ``None`` reads ``X``.
    bias_3p
        Degradation intensity ``b`` >= 0 (3' bias keeps ``exp(-b * length / median length)``).
    dropout_rate
        Bernoulli dropout probability in ``[0, 1]``.
    noise_sd
        Standard deviation of the Gaussian noise on the log-normalized scale (>= 0).
    gene_length
        Transcript lengths: the name of a ``var`` column, an array (one value per gene), or
        ``None`` to use ``var['gene_length']`` when present, otherwise stand-in lengths from
        :func:`default_gene_length` (``LogNormal(log(2000), 0.7)`` seeded by each gene's name,
        so a gene keeps its length across calls; logged at INFO level).
    target_sum
        Normalization total of the log scale (CP10k).
    rounding
        ``"stochastic"`` (floor plus a Bernoulli draw of the fractional part: integer counts with
        the expectation of ``x'``; noise on a zero entry then turns into an occasional count of
        1), ``"nearest"``, or ``"none"`` (non-integer counts).
    rng
        Seed or :class:`numpy.random.Generator`; the same seed gives bit-identical output.

    Each of ``bias_3p``, ``dropout_rate``, ``noise_sd`` is a number, a sequence with one value per
    cell, or a ``(low, high)`` tuple from which each cell draws uniformly (mild to severe damage
    in one call).

    Returns
    -------
    A new AnnData with ``obs``/``var`` copied from ``adata`` and

    - ``.X`` and ``.layers['counts']``: degraded counts (CSR float32);
    - ``.layers['true_counts']``: the clean input counts (CSR);
    - ``.layers['dropout_mask']``: ``True`` where a non-zero clean count was hit by the Bernoulli
      dropout (CSR bool);
    - ``.obs['degrade_bias_3p' | 'degrade_dropout_rate' | 'degrade_noise_sd']``: per-cell
      parameters, and ``.obs['clean_library_size']``;
    - ``.var['gene_length']``: the lengths used;
    - ``.uns['degrade']``: ``{"params": ..., "version": ...}``.

    Examples
    --------
    >>> from screpair import simulate
    >>> sim = simulate.splat(n_obs=50, n_vars=30, lib_loc=7, dropout_type="none", rng=0)
    >>> deg = simulate.degrade(sim, layer="true_counts", bias_3p=(0.1, 1.0), dropout_rate=0.2,
    ...                        noise_sd=0.1, rng=0)
    >>> deg.layers["counts"].shape
    (50, 30)
    """
    _check_degrade_options(rounding, target_sum)
    rng = as_rng(rng)
    x = get_counts(adata, layer, warn_empty=False)
    x = sp.csr_matrix(x) if not sp.issparse(x) else x
    length, length_source = _resolve_gene_length(adata, gene_length)
    out = _degrade_matrix(
        x,
        bias_3p=bias_3p,
        dropout_rate=dropout_rate,
        noise_sd=noise_sd,
        gene_length=length,
        target_sum=target_sum,
        rounding=rounding,
        rng=rng,
        what="adata has",
    )

    params = {
        "layer": layer,
        **{
            k: v if isinstance(v, tuple) or np.ndim(v) == 0 else "per cell (see obs)"
            for k, v in (
                ("bias_3p", bias_3p),
                ("dropout_rate", dropout_rate),
                ("noise_sd", noise_sd),
            )
        },
        "gene_length": length_source,
        "target_sum": target_sum,
        "rounding": rounding,
    }
    return _degraded_adata(adata, x, out, length, params)


def _degraded_adata(
    adata: AnnData, x: sp.csr_matrix, out: DegradeCountsOutput, length: np.ndarray, params: dict
) -> AnnData:
    """The AnnData :func:`degrade` returns (see its "Returns")."""
    obs = adata.obs.copy()
    obs["degrade_bias_3p"] = out.bias_3p
    obs["degrade_dropout_rate"] = out.dropout_rate
    obs["degrade_noise_sd"] = out.noise_sd
    obs["clean_library_size"] = out.library_size
    var = adata.var.copy()
    var["gene_length"] = length
    return truth_adata(
        out.counts, csr(x), out.dropout_mask, obs=obs, var=var, uns_key="degrade", params=params
    )


def log_normalize(counts, target_sum: float = 1e4) -> np.ndarray:
    """Dense ``log1p(x / L * target_sum)`` of a count matrix (the scale :func:`degrade_log` uses)."""
    return to_dense(_norm.log_normalize(counts, target_sum))


__all__ = [
    "DegradeCountsOutput",
    "DegradeOutput",
    "default_gene_length",
    "degrade",
    "degrade_counts",
    "degrade_log",
    "log_normalize",
]
