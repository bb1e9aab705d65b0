"""The Splat simulation model of Splatter (Zappia, Phipson & Oshlack, Genome Biol 2017).

Re-implemented from the published model description and Splatter's documented parameters in
vectorised numpy. The steps, for gene ``g`` and cell ``c``:

1. groups: ``group_c ~ Categorical(group_prob)``;
2. library sizes: ``L_c ~ LogNormal(lib_loc, lib_scale)`` (or ``Normal`` when ``lib_norm``);
3. gene means: ``m_g ~ Gamma(mean_shape, rate=mean_rate)``; with probability ``out_prob`` a gene is
   an expression outlier and its mean becomes ``median(m) * LogNormal(out_fac_loc, out_fac_scale)``;
4. differential expression: per group, with probability ``de_prob`` a gene gets a factor
   ``f ~ LogNormal(de_fac_loc, de_fac_scale)``, inverted (``1/f``) with probability ``de_down_prob``;
5. base cell means: ``mu_cg = L_c * m_g f_{group_c,g} / sum_g' m_g' f_{group_c,g'}``;
6. BCV: ``phi_cg = (bcv_common + 1/sqrt(mu_cg)) * sqrt(bcv_df / X_g)``, ``X_g ~ chi2(bcv_df)``;
   cell means ``lambda_cg ~ Gamma(shape=1/phi^2, scale=mu_cg phi^2)`` (mean ``mu_cg``);
7. true counts ``y_cg ~ Poisson(lambda_cg)``;
8. dropout: ``p_cg = 1 / (1 + exp(-k (log lambda_cg - x0)))`` with ``k = dropout_shape`` and
   ``x0 = dropout_mid``; an entry is dropped with probability ``p_cg`` and the observed count is
   ``y_cg (1 - d_cg)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.special import expit

from .._logging import get_logger, log_task
from .._utils import RNGLike, as_rng
from ._common import COUNTS, MASK, TRUTH, check_range, csr, truth_adata, truth_uns

logger = get_logger(__name__)

DropoutType = Literal["none", "experiment", "group", "cell"]

# Entries simulated per block of cells: bounds peak memory at a few dense (block x genes) arrays.
# A fixed constant, so that the random stream (and therefore a seeded result) never depends on
# the machine.
_BLOCK_ENTRIES = 2**21


@dataclass(frozen=True, kw_only=True)
class SplatParams:
    """Parameters of the Splat model; field defaults are Splatter's ``newSplatParams()`` defaults.

    The only deliberate difference is ``dropout_type``: Splatter defaults to ``"none"``, here it
    defaults to ``"experiment"`` (one logistic curve for all cells), because the point of these
    simulations is to have dropouts with known positions. Pass ``dropout_type="none"`` for
    Splatter's behaviour.

    Per-group parameters (``de_*``) accept a scalar or one value per group; ``dropout_mid`` and
    ``dropout_shape`` accept a scalar (``"experiment"``), one value per group (``"group"``) or one
    per cell (``"cell"``); a scalar is shared by all groups or cells.
    """

    n_obs: int = 100
    n_vars: int = 10_000
    group_prob: tuple[float, ...] = (1.0,)
    mean_shape: float = 0.6
    mean_rate: float = 0.3
    lib_loc: float = 11.0
    lib_scale: float = 0.2
    lib_norm: bool = False
    out_prob: float = 0.05
    out_fac_loc: float = 4.0
    out_fac_scale: float = 0.5
    de_prob: float | tuple[float, ...] = 0.1
    de_down_prob: float | tuple[float, ...] = 0.5
    de_fac_loc: float | tuple[float, ...] = 0.1
    de_fac_scale: float | tuple[float, ...] = 0.4
    bcv_common: float = 0.1
    bcv_df: float = 60.0
    dropout_type: DropoutType = "experiment"
    dropout_mid: float | tuple[float, ...] = 0.0
    dropout_shape: float | tuple[float, ...] = -1.0


#: Named parameter sets for :func:`splat`.
#:
#: ``"default"``: Splatter's defaults (100 cells x 10,000 genes, one group), with dropout on.
#: ``"cnnimpute"``: the simulation of the cnnImpute paper (Zhang et al. 2023): 2000 cells x 4000
#: genes, five groups with probabilities 0.1/0.1/0.2/0.2/0.4, logistic dropout with shape -0.5 and
#: midpoint 1; every other parameter keeps Splatter's default.
PRESETS: dict[str, SplatParams] = {
    "default": SplatParams(),
    "cnnimpute": SplatParams(
        n_obs=2000,
        n_vars=4000,
        group_prob=(0.1, 0.1, 0.2, 0.2, 0.4),
        dropout_type="experiment",
        dropout_shape=-0.5,
        dropout_mid=1.0,
    ),
}


def splat(
    n_obs: int | None = None,
    n_vars: int | None = None,
    *,
    preset: str = "default",
    group_prob: Sequence[float] | None = None,
    mean_shape: float | None = None,
    mean_rate: float | None = None,
    lib_loc: float | None = None,
    lib_scale: float | None = None,
    lib_norm: bool | None = None,
    out_prob: float | None = None,
    out_fac_loc: float | None = None,
    out_fac_scale: float | None = None,
    de_prob: float | Sequence[float] | None = None,
    de_down_prob: float | Sequence[float] | None = None,
    de_fac_loc: float | Sequence[float] | None = None,
    de_fac_scale: float | Sequence[float] | None = None,
    bcv_common: float | None = None,
    bcv_df: float | None = None,
    dropout_type: DropoutType | None = None,
    dropout_mid: float | Sequence[float] | None = None,
    dropout_shape: float | Sequence[float] | None = None,
    keep_intermediates: bool = False,
    out: str | os.PathLike[str] | None = None,
    chunk_size: int | None = None,
    overwrite: bool = False,
    rng: RNGLike = None,
) -> AnnData | None:
    """Simulate counts with known truth from the Splat model of Splatter.

    Every parameter left as ``None`` takes its value from ``preset`` (see :data:`PRESETS` and
    :class:`SplatParams`, whose defaults are Splatter's). The model is described in the module
    docstring of :mod:`screpair.simulate._splat`; parameter names are Splatter's with ``.``
    replaced by ``_`` and camelCase split (``de.facLoc`` -> ``de_fac_loc``).

    Parameters
    ----------
    n_obs, n_vars
        Number of cells and genes (Splatter: ``nCells`` 100, ``nGenes`` 10000).
    preset
        Name of the base parameter set: ``"default"`` or ``"cnnimpute"``.
    group_prob
        Probability of each group; its length is the number of groups. Normalised to sum to 1.
    mean_shape, mean_rate
        Shape and rate of the gamma distribution of gene means (0.6, 0.3).
    lib_loc, lib_scale
        meanlog and sdlog of the log-normal expected library sizes (11, 0.2).
    lib_norm
        Draw library sizes from a normal distribution with mean ``lib_loc`` and sd ``lib_scale``
        instead (non-positive draws become half the smallest positive one).
    out_prob, out_fac_loc, out_fac_scale
        Probability that a gene is an expression outlier, and the log-normal outlier factor
        (0.05, 4, 0.5).
    de_prob, de_down_prob, de_fac_loc, de_fac_scale
        Per group: probability that a gene is differentially expressed, probability that a DE
        factor is a down-regulation, and the log-normal DE factor (0.1, 0.5, 0.1, 0.4).
    bcv_common, bcv_df
        Common biological coefficient of variation and the degrees of freedom of its scaled
        inverse chi-squared variation across genes (0.1, 60; ``inf`` turns it off).
    dropout_type
        ``"none"``, ``"experiment"`` (one curve), ``"group"`` or ``"cell"`` (one ``dropout_mid`` /
        ``dropout_shape`` per group or per cell).
    dropout_mid, dropout_shape
        Midpoint (on the natural-log mean scale) and shape of the logistic dropout curve
        (0, -1). A negative shape makes lowly expressed entries drop out more often.
    keep_intermediates
        Also store the dense layers ``base_cell_means`` (``mu``), ``cell_means`` (``lambda``) and
        ``true_dropout_prob`` (``p``). Memory: three dense float64 matrices. Not with ``out``.
    out
        Write the simulation to this new ``.h5ad`` file or ``.zarr`` store instead of returning
        it, with bounded memory (for 10^5-10^6 cells): the gene parameters, groups and library
        sizes are drawn once; the cells are drawn block by block and their counts written as
        CSR as they come, atomically (a temporary file or directory next to ``out``, renamed at
        the end: an error or Ctrl-C leaves the old file or none). The file holds what the
        in-memory AnnData holds, the same values for the same seed (plain
        :func:`anndata.read_h5ad` / :func:`anndata.read_zarr` read it).
    chunk_size
        With ``out``: cells collected before their rows are written (default: about 4 million
        entries' worth, 2,097 cells at 2,000 genes). It changes memory only, not the values:
        the random draws follow internal blocks of a fixed 2^21 entries (``n_vars`` sets their
        cells), so the file is the same for every ``chunk_size``, and the same as without
        ``out``. Memory: those blocks' dense working arrays (about 150 MB), ``chunk_size`` cells
        of the four CSR matrices, and per cell its group, library size and name (about 100 bytes:
        100 MB at 10^6 cells).
    overwrite
        With ``out``: replace an existing file (otherwise an error, before any work).
    rng
        Seed or :class:`numpy.random.Generator`. The same seed gives a bit-identical result.

    Returns
    -------
    ``None`` with ``out`` (the file holds the same slots, ``dropout_mask`` stored as bool).
    Otherwise an AnnData (cells x genes) with

    - ``.X`` and ``.layers['counts']``: observed counts after dropout (CSR, float32 integers);
    - ``.layers['true_counts']``: counts before dropout (CSR);
    - ``.layers['dropout_mask']``: ``True`` where a non-zero true count was zeroed by dropout (CSR
      bool). Unlike Splatter's ``Dropout`` assay, draws that hit a true zero are not marked;
    - ``.obs['group']`` (categorical ``Group1`` …) and ``.obs['exp_lib_size']``;
    - ``.var['base_gene_mean']``, ``.var['outlier_factor']``, ``.var['gene_mean']``,
      ``.var['bcv_chi2']`` (the per-gene chi-squared draw) and ``.var['DEFacGroup1']`` … (DE
      factor of each gene in each group; 1 = not DE);
    - ``.uns['simulate']``: ``{"method": "splat", "params": ..., "version": ...}``.

    Examples
    --------
    >>> from screpair import simulate
    >>> sim = simulate.splat(n_obs=50, n_vars=30, group_prob=(0.5, 0.5), lib_loc=6, rng=0)
    >>> sim.layers["true_counts"].shape
    (50, 30)
    >>> cnn = simulate.splat(preset="cnnimpute", rng=0)  # doctest: +SKIP
    >>> simulate.splat(10**6, 2000, out="sim.h5ad", rng=0)  # doctest: +SKIP
    """
    if preset not in PRESETS:
        msg = f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}."
        raise ValueError(msg)
    given = {
        "n_obs": n_obs,
        "n_vars": n_vars,
        "group_prob": None if group_prob is None else tuple(np.ravel(group_prob).tolist()),
        "mean_shape": mean_shape,
        "mean_rate": mean_rate,
        "lib_loc": lib_loc,
        "lib_scale": lib_scale,
        "lib_norm": lib_norm,
        "out_prob": out_prob,
        "out_fac_loc": out_fac_loc,
        "out_fac_scale": out_fac_scale,
        "de_prob": de_prob,
        "de_down_prob": de_down_prob,
        "de_fac_loc": de_fac_loc,
        "de_fac_scale": de_fac_scale,
        "bcv_common": bcv_common,
        "bcv_df": bcv_df,
        "dropout_type": dropout_type,
        "dropout_mid": dropout_mid,
        "dropout_shape": dropout_shape,
    }
    params = dataclasses.replace(
        PRESETS[preset], **{k: v for k, v in given.items() if v is not None}
    )
    return simulate_splat(params, keep_intermediates=keep_intermediates, rng=rng, preset=preset,
                          out=out, chunk_size=chunk_size, overwrite=overwrite)


def _per_group(name: str, value, n_groups: int) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.size == 1:
        return np.repeat(arr, n_groups)
    if arr.size != n_groups:
        msg = f"{name} must be a scalar or have one value per group ({n_groups}), got {arr.size}."
        raise ValueError(msg)
    return arr


def _lognormal_factors(
    rng: np.random.Generator, n: int, sel_prob: float, down_prob: float, loc: float, scale: float
) -> np.ndarray:
    """Splatter's multiplicative factors: 1 unless selected, else LogNormal(loc, scale)^(+-1).

    A selected factor is inverted with probability ``down_prob``; a draw below 1 has its direction
    flipped, so ``down_prob`` is the probability that the factor ends up below 1.
    """
    selected = rng.random(n) < sel_prob
    k = int(selected.sum())
    direction = np.where(rng.random(k) < down_prob, -1.0, 1.0)
    fac = rng.lognormal(loc, scale, k)
    direction[fac < 1] *= -1
    out = np.ones(n)
    out[selected] = fac**direction
    return out


#: log library sizes above this overflow the Poisson draws (numpy: lam must be below ~9e18)
_MAX_LIB_LOC = 25.0


def _check(p: SplatParams) -> None:
    for name in ("n_obs", "n_vars"):
        v = getattr(p, name)
        if not isinstance(v, (int, np.integer)) or v < 1:
            msg = f"{name} must be a positive integer, got {v!r}."
            raise ValueError(msg)
    check_range("group_prob", p.group_prob, 0.0)
    if len(p.group_prob) == 0 or sum(p.group_prob) <= 0:
        msg = f"group_prob must have at least one positive value, got {p.group_prob!r}."
        raise ValueError(msg)
    for name in ("mean_shape", "mean_rate"):
        if not getattr(p, name) > 0:
            msg = f"{name} must be > 0, got {getattr(p, name)!r}."
            raise ValueError(msg)
    check_range("lib_scale", p.lib_scale, 0.0)
    if not p.lib_norm and not (np.isfinite(p.lib_loc) and p.lib_loc <= _MAX_LIB_LOC):
        msg = (
            f"lib_loc is the log of the typical library size (11: about 60,000 counts) and must be "
            f"at most {_MAX_LIB_LOC} (about {np.exp(_MAX_LIB_LOC):.0e} counts), got {p.lib_loc!r}."
        )
        raise ValueError(msg)
    check_range("out_prob", p.out_prob, 0.0, 1.0)
    check_range("out_fac_scale", p.out_fac_scale, 0.0)
    check_range("de_prob", p.de_prob, 0.0, 1.0)
    check_range("de_down_prob", p.de_down_prob, 0.0, 1.0)
    check_range("de_fac_scale", p.de_fac_scale, 0.0)
    check_range("bcv_common", p.bcv_common, 0.0)
    if not p.bcv_df > 0:
        msg = f"bcv_df must be > 0 (inf to disable), got {p.bcv_df!r}."
        raise ValueError(msg)
    if p.dropout_type not in ("none", "experiment", "group", "cell"):
        msg = (
            f"dropout_type must be 'none', 'experiment', 'group' or 'cell', got {p.dropout_type!r}."
        )
        raise ValueError(msg)


def _dropout_curve(p: SplatParams, groups: np.ndarray, n_groups: int):
    """Per-cell logistic midpoint and shape, or ``None`` without dropout."""
    if p.dropout_type == "none":
        return None
    mid = np.atleast_1d(np.asarray(p.dropout_mid, dtype=np.float64))
    shape = np.atleast_1d(np.asarray(p.dropout_shape, dtype=np.float64))
    check_range("dropout_mid", mid, -np.inf)
    check_range("dropout_shape", shape, -np.inf)
    expected = {"experiment": 1, "group": n_groups, "cell": p.n_obs}[p.dropout_type]
    if mid.size not in (1, expected) or shape.size not in (1, expected):
        msg = (
            f"dropout_type={p.dropout_type!r} needs dropout_mid and dropout_shape of length "
            f"{expected} (or 1), got {mid.size} and {shape.size}."
        )
        raise ValueError(msg)
    mid, shape = np.broadcast_to(mid, (expected,)), np.broadcast_to(shape, (expected,))
    if p.dropout_type == "experiment":
        return np.repeat(mid, p.n_obs), np.repeat(shape, p.n_obs)
    if p.dropout_type == "group":
        return mid[groups], shape[groups]
    return mid, shape


def dropout_probability(cell_means: np.ndarray, mid, shape) -> np.ndarray:
    """Splat's logistic dropout probability ``1 / (1 + exp(-shape (log(cell_means) - mid)))``.

    ``mid`` and ``shape`` broadcast against ``cell_means`` (pass per-cell values as a column).
    A zero mean is treated as ``exp(-700)``, so a negative shape gives probability 1.
    """
    eta = np.log(np.maximum(cell_means, 1e-304))
    return expit(np.asarray(shape) * (eta - np.asarray(mid)))


def _groups_and_libraries(p: SplatParams, gp: np.ndarray, rng: np.random.Generator):
    """Steps 1-2: each cell's group and library size."""
    n_obs, n_groups = int(p.n_obs), gp.size
    groups = rng.choice(n_groups, size=n_obs, p=gp) if n_groups > 1 else np.zeros(n_obs, int)
    if p.lib_norm:
        lib = rng.normal(p.lib_loc, p.lib_scale, n_obs)
        pos = lib[lib > 0]
        if pos.size == 0:
            msg = "lib_norm=True drew no positive library size; raise lib_loc."
            raise ValueError(msg)
        lib[lib <= 0] = pos.min() / 2
    else:
        lib = rng.lognormal(p.lib_loc, p.lib_scale, n_obs)
    return groups, lib


def _gene_means(p: SplatParams, rng: np.random.Generator):
    """Step 3: base gene means, outlier factors, and the gene means with outliers."""
    n_vars = int(p.n_vars)
    base_mean = rng.gamma(p.mean_shape, 1.0 / p.mean_rate, n_vars)
    out_fac = _lognormal_factors(rng, n_vars, p.out_prob, 0.0, p.out_fac_loc, p.out_fac_scale)
    gene_mean = np.where(out_fac != 1, np.median(base_mean) * out_fac, base_mean)
    return base_mean, out_fac, gene_mean


def _de_factors(p: SplatParams, n_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Step 4: ``(n_groups, n_vars)`` differential-expression factors (all 1 for one group)."""
    n_vars = int(p.n_vars)
    de_fac = np.ones((n_groups, n_vars))
    if n_groups > 1:
        vals = [
            _per_group(n, getattr(p, n), n_groups)
            for n in ("de_prob", "de_down_prob", "de_fac_loc", "de_fac_scale")
        ]
        for k in range(n_groups):
            de_fac[k] = _lognormal_factors(rng, n_vars, *(v[k] for v in vals))
    return de_fac


def _bcv_genes(p: SplatParams, rng: np.random.Generator):
    """Step 6, per gene: the chi-squared draw and the BCV factor ``sqrt(bcv_df / X_g)``."""
    n_vars = int(p.n_vars)
    chi2 = rng.chisquare(p.bcv_df, n_vars) if np.isfinite(p.bcv_df) else np.full(n_vars, np.nan)
    bcv_gene = np.sqrt(p.bcv_df / chi2) if np.isfinite(p.bcv_df) else np.ones(n_vars)
    return chi2, bcv_gene


def _count_blocks(p: SplatParams, lib, groups, props, bcv_gene, curve, rng):
    """Steps 5-8 in blocks of cells (:data:`_BLOCK_ENTRIES` entries each): base cell means, BCV
    cell means, Poisson true counts and dropout. Yields per block the observed counts, true
    counts and dropout mask (CSR) and the base cell means, cell means and dropout probabilities
    (dense), drawn in the block order from ``rng``."""
    n_obs, n_vars = int(p.n_obs), int(p.n_vars)
    step = max(1, _BLOCK_ENTRIES // n_vars)
    for start in range(0, n_obs, step):
        sl = slice(start, min(start + step, n_obs))
        mu = lib[sl, None] * props[groups[sl]]
        bcv = (p.bcv_common + 1.0 / np.sqrt(mu)) * bcv_gene
        bcv2 = bcv * bcv
        lam = rng.gamma(1.0 / bcv2, mu * bcv2)
        y = rng.poisson(lam).astype(np.float32)
        if curve is not None:
            prob = dropout_probability(lam, curve[0][sl, None], curve[1][sl, None])
            dropped = rng.random(lam.shape) < prob
            obs_y = np.where(dropped, np.float32(0), y)
            mask = csr(dropped & (y > 0), dtype=bool)
        else:
            prob = np.zeros_like(lam)
            obs_y = y
            mask = sp.csr_matrix(y.shape, dtype=bool)
        yield csr(obs_y), csr(y), mask, mu, lam, prob


def _counts(p: SplatParams, lib, groups, props, bcv_gene, curve, keep_intermediates, rng):
    """All blocks of :func:`_count_blocks`: lists of the observed counts, true counts and
    dropout masks (CSR blocks) and the intermediates (dense blocks, only with
    ``keep_intermediates``)."""
    counts, truth, masks, inter = [], [], [], {"base": [], "lam": [], "prob": []}
    for obs_y, y, mask, mu, lam, prob in _count_blocks(p, lib, groups, props, bcv_gene, curve,
                                                       rng):
        counts.append(obs_y)
        truth.append(y)
        masks.append(mask)
        if keep_intermediates:
            inter["base"].append(mu)
            inter["lam"].append(lam)
            inter["prob"].append(prob)
    return counts, truth, masks, inter


def simulate_splat(
    params: SplatParams,
    *,
    keep_intermediates: bool = False,
    rng: RNGLike = None,
    preset: str | None = None,
    out: str | os.PathLike[str] | None = None,
    chunk_size: int | None = None,
    overwrite: bool = False,
) -> AnnData | None:
    """Run the Splat model for a :class:`SplatParams` (what :func:`splat` calls).

    The steps of the module docstring, drawn in that order (groups, library sizes, gene means,
    DE factors, BCV per gene, then per block of cells the cell means, counts and dropout); the
    block size is a constant, so a seed gives the same simulation on every machine. With
    ``out``, the blocks are written to that store as they are drawn (see :func:`splat`) and
    ``None`` is returned.
    """
    _check(params)
    p = params
    if out is not None:
        out = _check_out(out, chunk_size, keep_intermediates, overwrite)
    elif chunk_size is not None:
        msg = "chunk_size= applies only with out= (the cells written to the file at a time)."
        raise ValueError(msg)
    rng = as_rng(rng)
    n_obs, n_vars = int(p.n_obs), int(p.n_vars)
    gp = np.asarray(p.group_prob, dtype=np.float64)
    gp = gp / gp.sum()
    n_groups = gp.size

    with log_task(f"simulating Splat counts ({n_obs} cells x {n_vars} genes)", logger):
        groups, lib = _groups_and_libraries(p, gp, rng)
        base_mean, out_fac, gene_mean = _gene_means(p, rng)
        de_fac = _de_factors(p, n_groups, rng)
        chi2, bcv_gene = _bcv_genes(p, rng)
        curve = _dropout_curve(p, groups, n_groups)
        # 5. proportions per group (the base cell mean is lib_c * prop[group_c])
        group_means = gene_mean * de_fac
        props = group_means / group_means.sum(axis=1, keepdims=True)
        obs = pd.DataFrame(
            {
                "group": pd.Categorical.from_codes(groups,
                                                   [f"Group{k + 1}" for k in range(n_groups)]),
                "exp_lib_size": lib,
            },
            index=pd.Index([f"Cell{i + 1}" for i in range(n_obs)]),
        )
        var = pd.DataFrame(
            {
                "base_gene_mean": base_mean,
                "outlier_factor": out_fac,
                "gene_mean": gene_mean,
                "bcv_chi2": chi2,
                **{f"DEFacGroup{k + 1}": de_fac[k] for k in range(n_groups)},
            },
            index=pd.Index([f"Gene{j + 1}" for j in range(n_vars)]),
        )
        info = {"method": "splat", "preset": preset, **dataclasses.asdict(p)}
        if out is not None:
            blocks = _count_blocks(p, lib, groups, props, bcv_gene, curve, rng)
            rows = chunk_size or max(1, _CHUNK_ENTRIES // n_vars)
            _write_store(out, blocks, obs=obs, var=var, uns=truth_uns("splat", info),
                         chunk_size=rows)
            return None
        counts, truth, masks, inter = _counts(
            p, lib, groups, props, bcv_gene, curve, keep_intermediates, rng
        )

    ad = truth_adata(
        sp.vstack(counts, format="csr"),
        sp.vstack(truth, format="csr"),
        sp.vstack(masks, format="csr"),
        obs=obs,
        var=var,
        uns_key="simulate",
        params=info,
    )
    ad.uns["simulate"]["method"] = "splat"
    if keep_intermediates:
        ad.layers["base_cell_means"] = np.vstack(inter["base"])
        ad.layers["cell_means"] = np.vstack(inter["lam"])
        ad.layers["true_dropout_prob"] = np.vstack(inter["prob"])
    return ad


#: stored values per layer, at most, collected before they are written (``chunk_size`` default)
_CHUNK_ENTRIES = 2**22


def _check_out(out, chunk_size, keep_intermediates: bool, overwrite: bool) -> Path:
    """The output store path, checked before any work (with ``chunk_size`` and the options
    that cannot be streamed)."""
    from .._chunks import check_chunk_rows
    from ..io import check_output_path

    if keep_intermediates:
        msg = ("keep_intermediates=True adds three dense cells x genes layers; it cannot be "
               "combined with out= (simulate in memory, without out=).")
        raise ValueError(msg)
    if chunk_size is not None:
        try:
            check_chunk_rows(chunk_size)
        except ValueError:
            msg = f"chunk_size must be a positive integer (cells), got {chunk_size!r}."
            raise ValueError(msg) from None
    return check_output_path(out, overwrite=overwrite, formats=("h5ad", "zarr"))


def _write_store(path: Path, blocks, *, obs: pd.DataFrame, var: pd.DataFrame, uns: dict,
                 chunk_size: int) -> None:
    """Write the simulated blocks to a new ``.h5ad`` / ``.zarr`` store as :func:`truth_adata`
    lays them out in memory (``X`` = ``layers['counts']``, ``true_counts``, ``dropout_mask``
    as bool, all CSR), at least every ``chunk_size`` cells, atomically."""
    from .._chunks import stream_store

    n_vars = len(var)
    keys = ("X", f"layers/{COUNTS}", f"layers/{TRUTH}", f"layers/{MASK}")
    with stream_store(path, obs=obs, var=var, chunk_rows=chunk_size) as w:
        for key in keys:
            w.matrix(key, n_vars, sparse=True, dtype=bool if key.endswith(MASK) else np.float32)
        held = 0
        for obs_y, y, mask, *_ in blocks:
            for key, m in zip(keys, (obs_y, obs_y, y, mask), strict=True):
                w.append(key, m)
            held += obs_y.shape[0]
            if held >= chunk_size:
                w.flush()
                held = 0
        w.uns["simulate"] = uns
