"""Shared data pipeline and estimator base for the profile-repair methods (diffusion, DAE, VAE).

Pipeline (DiffRepairer, Xiao et al. 2025):

1. counts are scaled to 10,000 per cell (``L`` = each cell's observed library size over all
   genes) and ``log1p``-transformed;
2. the top ``n_top_genes`` highly variable genes (dispersion-based, :func:`screpair.pp.highly_variable_genes`,
   chosen once at ``fit``) are modelled; every other gene is returned unchanged;
3. training pairs: the clean profile ``x0`` and ``n_views`` (by default 2-8, more for fewer
   cells) pseudo-degraded versions
   ``c = simulate.degrade_counts(x0)`` per cell (real gene lengths from ``var["gene_length"]``,
   else stand-ins seeded by gene name), the damage parameters (3' bias, dropout rate, noise sd)
   drawn per cell and per view uniformly from :class:`PairConfig`'s ranges (mild to severe);
   the degraded counts are normalized and log-transformed exactly as real input would be;
4. the log values are centred per gene (clean training mean) and divided by the overall sd of
   the centred clean values (one scale for all genes, robust to rarely detected genes);
5. the repaired log profile is mapped back to the count scale with ``expm1(.) * L / 1e4``
   (``L`` the observed library size of the input cell), clipped at 0; an observed zero whose
   repaired value stays below ``PairConfig.zero_threshold`` (log1p(CP10k)) is kept at zero.

Large data (issue 16): ``fit`` trains on at most ``n_train_cells`` cells (default
:data:`TRAIN_CELLS`, 50,000; a random sample drawn from ``rng`` above it, every cell below it,
so that data below the cap train exactly as before), and the HVGs, the standardization and the
clip range come from those same training cells; :func:`screpair.impute_file` reads only those
rows from the file for the fit (``_fit_rows``), the same training as in memory. The training pairs are held sparse (the
``log1p(CP10k)`` values of the modelled genes as float32 CSR, one matrix per view) and each
minibatch is densified on its own; only the standardization statistics need the training
cells' clean profiles dense, once, for a moment (about ``2 x n_train x n_hvg x 4`` bytes: 2 GB
at 50,000 cells x 5,000 HVGs, against about 6-7 GB of dense pairs before). The network's size
depends on the genes only. The posterior of a cell depends only on its row, the fitted state
and ``posterior_seed_`` (``posterior_by_rows``): :func:`screpair.impute_file` computes it block
by block with the output of :func:`screpair.impute`, for any ``chunk_rows`` (see
:meth:`PairImputer._posterior` for how the repair noise is laid out over the cells).

Subclasses implement the network, the loss for a batch of pairs, and the prediction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _norm
from .._logging import get_logger, log_task
from .._utils import as_rng, check_sample_size, to_dense, torch_seed
from ._base import (
    BaseImputer,
    DataContext,
    Posterior,
    draw_sample,
    sample_rows,
)
from ._torch import (
    LossOutput,
    TrainConfig,
    fit_seed,
    import_torch,
    load_model,
    load_state,
    model_error,
    params_json,
    resolve_config,
    resolve_device,
    rows_entry,
    save_model,
    saved_estimator,
    saved_rows,
    saved_seed,
    split_cells,
    tensor_entry,
    train_loop,
)

logger = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class PairConfig:
    """The data pipeline: which genes are modelled, how training pairs (clean ``x0``, degraded
    ``c``) are made, and which observed zeros the repair keeps.

    Attributes
    ----------
    n_top_genes
        Highly variable genes modelled (5,000 in the paper); the others are returned unchanged.
    n_views
        Degraded versions made per training cell. ``None`` (default): below ``MANY_CELLS``
        (2,000) cells, enough for about ``PAIRS_PER_EPOCH`` (10,000) pairs, at least 2 and at
        most 8 (a reference of 400-1,350 cells: 8); from 2,000 cells on, 2. More views are more
        augmentation, which small references need: on baron pancreas (411 reference cells,
        seeds 0-2) 2 / 4 / 8 views gave diffusion log-MSE 0.234 / 0.228 / 0.226, silhouette
        0.088 / 0.110 / 0.133 and marker Spearman 0.510 / 0.522 / 0.536. They cost time: an
        epoch in proportion, and the validation loss keeps improving for more epochs. On all
        2,700 pbmc3k cells (2-core CPU) 4 views trained for 46 epochs, 1,031 s, against 33
        epochs, 357 s, with 2: hence 2 views for larger datasets.
    bias_3p, dropout_rate, noise_sd
        ``(low, high)`` ranges; each cell and view draws its damage uniformly from them and passes
        it to :func:`screpair.simulate.degrade_counts`. The defaults span no damage to severe
        damage.
    zero_threshold
        An entry observed as zero stays zero unless its repaired value, ``log1p(CP10k)`` at the
        observed library size, reaches ``zero_threshold`` (0.5: about 0.65 per 10,000 counts);
        ``0`` writes every repaired value. A repaired point estimate is never exactly zero, so
        without this every gene gets a small positive value in every cell: most clean entries
        of these genes are zero, and rank-based analyses (Wilcoxon DEGs, Spearman of markers)
        then rank cells by noise where the clean data has ties at zero. On baron pancreas
        (reference setting, seed 0) keeping the observed zeros below 0.5 raised DEG Jaccard from
        0.36 to 0.44 and marker Spearman from 0.41 to 0.53 and changed log-MSE by < 0.003; it
        lowers expressed-entry PR-AUC (0.44 to 0.41), since the kept zeros tie.
    redraw_views
        Give the training cells of one view fresh damage at the start of every epoch after
        the first (views in turn; the validation pairs stay fixed, so the monitored score is
        comparable across epochs). Augmentation without more pairs per epoch; on baron, 4 views
        redrawn were slightly worse than 8 fixed ones and only ~15% faster (numbers in
        ``DiffusionConfig``). Off by default (each epoch then costs one extra degradation pass
        over the cells: ~1 s for 822 cells x 14,878 genes).
    """

    n_top_genes: int = 5000
    n_views: int | None = None
    bias_3p: tuple[float, float] = (0.0, 0.6)
    dropout_rate: tuple[float, float] = (0.0, 0.5)
    noise_sd: tuple[float, float] = (0.0, 0.4)
    zero_threshold: float = 0.5
    redraw_views: bool = False


def _log_profiles(x, genes, lib: np.ndarray | None = None) -> np.ndarray:
    """``log1p(CP10k)`` of the columns ``genes`` as dense float32, ``L`` over all genes
    (:func:`screpair._norm.log_normalize`)."""
    lib = _norm.library_size(x) if lib is None else lib
    return to_dense(_norm.log_normalize(x[:, genes], _norm.CP10K, lib)).astype(np.float32)


def _log_csr(x, genes) -> sp.csr_matrix:
    """:func:`_log_profiles` of the counts ``x`` held sparse: the same float32 values (the
    scaling and the log in float64, per entry, then cast), as CSR; densifying any rows gives
    those rows of ``_log_profiles(x, genes)`` bit for bit."""
    lib = _norm.library_size(x)
    part = x[:, genes]
    part = sp.csr_matrix(part) if not sp.issparse(part) else part
    return sp.csr_matrix(_norm.log_normalize(part, _norm.CP10K, lib), dtype=np.float32)


def _check_range(bounds, name: str) -> tuple[float, float]:
    lo, hi = (float(b) for b in bounds)
    if not 0 <= lo <= hi:
        msg = f"{name} range must satisfy 0 <= low <= high, got {tuple(bounds)}."
        raise ValueError(msg)
    return lo, hi


def degrade_view(x, cfg: PairConfig, rng: np.random.Generator, gene_length: np.ndarray):
    """One degraded copy of the count matrix ``x`` with per-cell damage drawn uniformly from
    ``cfg``'s ranges (:func:`screpair.simulate.degrade_counts`; ``gene_length``: one value per
    column)."""
    from .. import simulate

    ranges = {name: tuple(getattr(cfg, name)) for name in ("bias_3p", "dropout_rate", "noise_sd")}
    out = simulate.degrade_counts(x, **ranges, gene_length=gene_length, rng=rng)
    return sp.csr_matrix(out.counts, dtype=np.float64)


PAIRS_PER_EPOCH = 10_000
MANY_CELLS = 2_000


def n_views(cfg: PairConfig, n_cells: int) -> int:
    """Degraded views per cell: ``cfg.n_views``, or for ``None`` 2 from ``MANY_CELLS`` cells on
    and ``ceil(PAIRS_PER_EPOCH / n_cells)`` clipped to ``[2, 8]`` below."""
    if cfg.n_views is None:
        if n_cells >= MANY_CELLS:
            return 2
        return int(np.clip(np.ceil(PAIRS_PER_EPOCH / max(n_cells, 1)), 2, 8))
    if int(cfg.n_views) < 1:
        msg = f"n_views must be >= 1 (or None for automatic), got {cfg.n_views!r}."
        raise ValueError(msg)
    return int(cfg.n_views)


def make_pairs(
    x, genes: np.ndarray, cfg: PairConfig, k: int, rng: np.random.Generator, gene_length: np.ndarray
) -> tuple[sp.csr_matrix, list[sp.csr_matrix]]:
    """Clean log profiles ``(n, g)`` and ``k`` degraded ones (a list of ``(n, g)``) on the
    ``genes`` columns, as float32 CSR (:func:`_log_csr`; ``k`` from :func:`n_views`;
    ``gene_length``: one value per column of ``x``). The views are drawn from ``rng`` one after
    the other, each over all cells."""
    clean = _log_csr(x, genes)
    views = [_log_csr(degrade_view(x, cfg, rng, gene_length), genes) for _ in range(k)]
    return clean, views


def _replace_rows(old: sp.csr_matrix, new: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """``old`` with the rows ``rows`` taken from ``new`` (same shape)."""
    n = old.shape[0]
    pick = np.arange(n)
    pick[rows] += n
    return sp.csr_matrix(sp.vstack([old, new], format="csr")[pick])


#: default ``n_train_cells``: most cells the networks are trained on (a random sample above)
TRAIN_CELLS = 50_000
#: cells per seed block of the repair noise (a multiple of the prediction batch): the noise of
#: the cells of block ``j`` comes from one generator of its own (see ``PairImputer._posterior``)
SEED_BLOCK = 8192


def _block_generator(seed: int, block: int, device):
    """The torch generator of the repair noise of seed block ``block``: block 0 from
    ``default_rng(seed)`` (the one stream every cell used before seed blocks existed), block
    ``j >= 1`` from ``default_rng(SeedSequence(seed, spawn_key=(j,)))`` (independent streams)."""
    torch = import_torch()
    src = seed if block == 0 else np.random.SeedSequence(seed, spawn_key=(int(block),))
    return torch.Generator(device=device).manual_seed(torch_seed(np.random.default_rng(src)))


class _Noise:
    """Standard normal draws of the repair, batch by batch, each batch's draws fixed by its
    position: the cells ``[a, a + batch)`` (``a`` a multiple of ``batch``, the last batch
    clipped at ``n_obs``) draw ``n_draws`` tensors of shape ``(n_samples * size, n_genes)``,
    in that order, from the generator of their seed block (:func:`_block_generator`), after the
    draws of the block's earlier batches. Asking for a batch replays (draws and discards) the
    earlier batches of its block, unless it continues where this object, or the ``marks`` of an
    earlier one (the generator states at the start and the end of its last batch), stopped."""

    def __init__(self, seed: int, device, shape: tuple[int, int, int], batch: int, marks=()):
        self.seed, self.device, self.batch = int(seed), device, int(batch)
        self.n_draws, self.n_samples, self.n_genes = shape
        self.key = (self.seed, str(device), tuple(shape), self.batch)
        self.gen, self.block, self.pos = None, -1, -1
        self.marks = [m for m in marks if m[0] == self.key]  # (key, block, position, state)

    def _draw(self, size: int) -> list:
        torch = import_torch()
        shape = (self.n_samples * size, self.n_genes)
        return [torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
                for _ in range(self.n_draws)]

    def _mark(self) -> tuple:
        return (self.key, self.block, self.pos, self.gen.get_state())

    def draws(self, start: int, stop: int) -> list:
        """The draws of the batch of cells ``[start, stop)`` (``start`` a multiple of the batch
        size, ``stop`` the batch's end)."""
        if not self.n_draws:
            return []
        block = start // SEED_BLOCK
        if self.gen is None or self.block != block or self.pos > start:
            self.gen = _block_generator(self.seed, block, self.device)
            self.block, self.pos = block, block * SEED_BLOCK
            for _, b, pos, state in self.marks:  # continue an earlier call, from the start
                # or end of a whole batch (a clipped last batch's end is no batch boundary)
                if b == block and self.pos <= pos <= start and pos % self.batch == 0:
                    self.gen.set_state(state)
                    self.pos = pos
        while self.pos < start:  # earlier batches of the block: full batches
            self._draw(self.batch)
            self.pos += self.batch
        before = self._mark()
        out = self._draw(stop - start)
        self.pos = stop
        self.marks = [before, self._mark()]
        return out


@contextlib.contextmanager
def _seeded_torch(seed: int, device) -> Iterator[None]:
    """Seed torch's default generator inside a fork, so the caller's global state is restored."""
    torch = import_torch()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class PairImputer(BaseImputer):
    """Base estimator for methods trained on (clean, degraded) pairs; see the module docstring.

    Subclasses define ``_build_module(n_genes)``, ``_loss(module, x0, c, generator)`` (a scalar
    tensor) and ``_sample(module, c, n_samples, generator, noise=None)`` (``(n_samples, batch,
    genes)`` samples in standardized log space and a ``(batch, genes)`` point estimate, or
    ``None`` to use the samples' mean; ``noise``: the batch's standard normal draws, the
    ``_noise_draws()`` tensors of shape ``(n_samples * batch, genes)`` in the order the
    sampler uses them, which it then takes instead of drawing from ``generator``), define
    ``_noise_draws()`` when the repair is random (default 0: deterministic), take
    ``n_train_cells`` in ``__init__`` and list their config classes in ``_configs``.

    Fitting trains on at most ``n_train_cells`` cells (``train_cells_``; see the module
    docstring); the posterior of any block of rows is those rows of the posterior of all rows
    (``posterior_by_rows``), bit for bit.
    """

    _configs: ClassVar[dict[str, type]] = {"pairs": PairConfig, "train": TrainConfig}
    #: the estimator's defaults of some configs (the config class's own defaults otherwise)
    _config_defaults: ClassVar[dict[str, Any]] = {}
    #: cells per prediction batch (a divisor of :data:`SEED_BLOCK`)
    _predict_batch: ClassVar[int] = 256
    uses_reference: ClassVar[bool] = True
    has_var: ClassVar[bool] = True
    #: a cell's repair depends on its row, the fitted state and ``posterior_seed_`` only (the
    #: noise is laid out by fixed batches and seed blocks of cells; see ``_posterior``)
    posterior_by_rows: ClassVar[bool] = True
    #: repairing degraded input: its counts need not be integers
    _posterior_checks: ClassVar[dict[str, Any]] = {"warn_empty": False, "require_integer": False}

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_noise_marks", None)  # where the last posterior's noise stopped: a cache
        return state

    # ---- hooks -------------------------------------------------------------------------------
    def _build_module(self, n_genes: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss(self, module, x0, c, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def _val_loss(self, module, x0, c, generator):
        """The validation score early stopping monitors (default: the training loss)."""
        return self._loss(module, x0, c, generator)

    def _sample(self, module, c, n_samples: int, generator, noise=None):  # pragma: no cover
        raise NotImplementedError

    def _noise_draws(self) -> int:
        """Standard normal tensors of shape ``(n_samples * batch, genes)`` one prediction batch
        draws (0: the repair is deterministic)."""
        return 0

    def _n_samples(self) -> int:
        return 1

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _set_extra_state(self, extra: dict[str, Any]) -> None:
        return None

    # ---- helpers -----------------------------------------------------------------------------
    def _config(self, name: str):
        """The ``name`` config (:func:`screpair.methods._torch.resolve_config`): the
        estimator's defaults (``_config_defaults``, else the config class's) when ``None``; a
        dict (e.g. from a CLI config file) replaces those fields of the defaults."""
        return resolve_config(self._configs[name], getattr(self, name), name=name,
                              default=self._config_defaults.get(name))

    def _pairs_cfg(self) -> PairConfig:
        return self._config("pairs")

    def _train_cfg(self) -> TrainConfig:
        return self._config("train")

    def _module_cfg(self):
        return self._config("module")

    def _check_params(self) -> None:
        """The parameter checks of ``fit`` (also run by :meth:`load` on the saved ones)."""
        for name in self._configs:
            self._config(name)
        pcfg = self._pairs_cfg()
        if int(pcfg.n_top_genes) < 1:
            msg = f"n_top_genes must be positive, got {pcfg.n_top_genes}."
            raise ValueError(msg)
        n_views(pcfg, MANY_CELLS)  # an explicit view count must be >= 1
        for name in ("bias_3p", "dropout_rate", "noise_sd"):
            _check_range(getattr(pcfg, name), name)
        if not float(pcfg.zero_threshold) >= 0:
            msg = f"zero_threshold must be >= 0, got {pcfg.zero_threshold!r}."
            raise ValueError(msg)
        check_sample_size("n_train_cells", getattr(self, "n_train_cells", None))

    def _standardize(self, v: np.ndarray) -> np.ndarray:
        return ((v - self.gene_mean_) / self.gene_scale_).astype(np.float32)

    def _unstandardize(self, z: np.ndarray) -> np.ndarray:
        return z * self.gene_scale_ + self.gene_mean_

    @staticmethod
    def _gene_length(ctx: DataContext) -> np.ndarray:
        """``var["gene_length"]`` when the data have it, else stand-ins seeded by gene name
        (:func:`screpair.simulate.default_gene_length`), one per gene."""
        from .. import simulate

        if "gene_length" in ctx.var:
            return ctx.var["gene_length"].to_numpy(dtype=np.float64)
        return simulate.default_gene_length(ctx.var_names)

    # ---- estimator API -----------------------------------------------------------------------
    def _fit_rows(self, n: int) -> np.ndarray | None:
        """The ``n_train_cells`` sample of ``n`` cells (drawn first from ``rng``), or ``None``:
        :func:`screpair.impute_file` reads only these rows for the fit."""
        return sample_rows(self.rng, n, getattr(self, "n_train_cells", None))

    def _fit(self, x, ctx: DataContext) -> None:
        """Make training pairs from the (clean) profiles ``x`` and train the network.

        ``fit(data)`` takes cells x genes raw counts (AnnData, ndarray or sparse): the clean
        reference. Above ``n_train_cells`` cells a random sample of that many (drawn first from
        ``rng``; ``train_cells_``, sorted) stands for all of them in everything below; at or
        below it every cell is used and ``rng`` is not touched for it. The fitted estimator
        has ``var_names_``, ``hvg_`` (bool mask over genes: the top ``n_top_genes`` by
        dispersion over the training cells), ``gene_mean_``/``gene_scale_`` (standardization of
        the log values, from the training cells' clean profiles), ``clip_``, ``module_``,
        ``history_`` (one row per epoch), ``train_cells_`` (``None``: all cells) and
        ``posterior_seed_`` (the integer seed of the repair noise: ``rng`` itself when it is an
        int, else one draw from it).
        """
        from .. import pp

        torch = import_torch()
        pcfg, tcfg = self._pairs_cfg(), self._train_cfg()
        rng = as_rng(self.rng)
        cap = getattr(self, "n_train_cells", None)
        cells = draw_sample(rng, ctx.n_obs, cap, ctx)  # ctx.sample: x holds only those
        self.train_cells_ = cells
        if cells is not None:
            logger.info("%s: training on %d of %d cells (n_train_cells)", self.name, cells.size,
                        ctx.n_obs)
            if ctx.sample is None:  # a direct _fit call on every cell: take the sample's rows
                x = x[cells]
        n_top = int(pcfg.n_top_genes)
        if x.shape[1] <= n_top:
            hvg = np.ones(x.shape[1], dtype=bool)
        else:
            hvg = pp.hvg_dispersion(x, n_top)["highly_variable"].to_numpy(dtype=bool)
        genes = np.flatnonzero(hvg)
        n = x.shape[0]
        k = n_views(pcfg, n)
        gene_length = self._gene_length(ctx)
        with log_task(f"making {k} degraded view(s) of {n} cells", logger):
            clean_log, views = make_pairs(x, genes, pcfg, k, rng, gene_length)
        # centred per gene, scaled by one overall sd: a per-gene sd would blow up rarely
        # detected genes (sd ~ 0 in the reference) when a degraded cell does express them.
        # The statistics need the clean profiles dense once (centred in place, then freed).
        clean = clean_log.toarray()
        self.gene_mean_ = clean.mean(0).astype(np.float32)
        # plausible range of a repaired log value: [0, max over the reference + 0.5]
        top = float(clean.max()) + 0.5
        clean -= self.gene_mean_
        sd = float(clean.std())
        del clean
        self.gene_scale_ = np.full(len(genes), max(sd, 1e-3), dtype=np.float32)
        self.clip_ = self._standardize(np.stack([np.zeros(len(genes)), np.full(len(genes), top)]))

        device = resolve_device(tcfg.device)
        train_cells, val_cells = split_cells(n, tcfg.val_frac, rng)
        # pair index p -> (view p // n, cell p % n); validation uses only the first view
        train_idx = (np.arange(k)[:, None] * n + train_cells[None]).ravel()
        val_idx = val_cells
        seed = torch_seed(rng)
        gen = torch.Generator(device=device).manual_seed(seed)

        def batch(rows):  # standardized (x0, c) of these pairs, dense for the batch only
            cells, view = rows % n, rows // n
            c = np.empty((len(rows), len(genes)), dtype=np.float32)
            for v in np.unique(view):
                sel = view == v
                c[sel] = self._standardize(views[v][cells[sel]].toarray())
            x0 = self._standardize(clean_log[cells].toarray())
            return torch.from_numpy(x0).to(device), torch.from_numpy(c).to(device)

        def loss_fn(rows, training):
            x0, c = batch(np.asarray(rows))
            if training:
                return LossOutput(loss=self._loss(module, x0, c, gen))
            g = torch.Generator(device=device).manual_seed(int(rows[0]))
            return LossOutput(loss=self._val_loss(module, x0, c, g))

        on_epoch = None
        if pcfg.redraw_views:  # one view's training cells get fresh damage at every epoch
            redraw_rng = np.random.default_rng(rng.integers(2**63))

            def on_epoch(epoch: int) -> None:
                fresh = _log_csr(degrade_view(x, pcfg, redraw_rng, gene_length), genes)
                v = (epoch - 1) % k
                views[v] = _replace_rows(views[v], fresh, train_cells)

        with _seeded_torch(seed, device):
            module = self._build_module(len(genes)).to(device)
            with log_task(f"training {self.name} on {len(train_idx)} pairs", logger):
                history = train_loop(
                    module, loss_fn, train_idx, val_idx, tcfg, rng, desc=f"{self.name}",
                    on_epoch=on_epoch,
                )
        self.hvg_ = hvg
        self.module_ = module.cpu().eval()
        self.history_ = history
        self.device_ = str(device)
        # every transform starts its noise from this seed: the same output on each call and
        # after save/load (drawn after training, so an int rng trains exactly as before)
        self.posterior_seed_ = fit_seed(self.rng)

    def _posterior(self, x, ctx: DataContext) -> Posterior:
        """Repair the profiles ``x`` (counts, not necessarily integers): the rows ``ctx.rows`` of
        a data set of ``ctx.n_obs`` cells.

        The cells are repaired in fixed batches of ``_predict_batch`` (256) cells of the data
        set, ``[256 i, 256 (i + 1))`` (the last one clipped at ``n_obs``); a batch that ``x``
        holds only in part is run whole, its other rows zero, so every cell meets the same
        arithmetic on any block of rows. Random repairs (diffusion) draw each batch's noise
        from the generator of its seed block of :data:`SEED_BLOCK` (8,192) cells: block 0 from
        ``posterior_seed_`` as before seed blocks existed (data of at most 8,192 cells get the
        noise, hence the output, of earlier releases), block ``j`` from
        ``SeedSequence(posterior_seed_, spawn_key=(j,))``; a batch takes its draws after those
        of the block's earlier batches. The posterior of a cell thus depends on its row, the
        fitted state, ``posterior_seed_`` and ``n_obs`` only, never on how the rows are split
        into blocks or in which order blocks are asked for. A block that starts inside a seed
        block replays the noise of that seed block's earlier batches (at most 8,191 cells' worth),
        unless it continues where the estimator's previous call stopped.

        Returns
        -------
        :class:`~screpair.methods.Posterior` with ``mean`` (dense, count scale: the HVGs repaired,
        observed zeros with a repaired value below ``PairConfig.zero_threshold`` kept at zero,
        the other genes as observed) and, for methods drawing several samples, ``var`` (the sample
        variance on the count scale; 0 for genes outside the HVG set).
        """
        torch = import_torch()
        genes = np.flatnonzero(self.hvg_)
        lib = _norm.library_size(x)
        observed = _log_profiles(x, genes, lib)
        c = self._standardize(observed)
        n_samples = self._n_samples()
        zero_threshold = float(self._pairs_cfg().zero_threshold)
        if not zero_threshold >= 0:
            msg = f"zero_threshold must be >= 0, got {zero_threshold!r}."
            raise ValueError(msg)
        device = resolve_device(self._train_cfg().device)
        module = self.module_.to(device)
        size = self._predict_batch
        r0 = int(ctx.rows.start or 0)
        r1 = r0 + x.shape[0]
        n_obs = max(int(ctx.n_obs), r1)
        noise = _Noise(self.posterior_seed_, device, (self._noise_draws(), n_samples, len(genes)),
                       size, getattr(self, "_noise_marks", ()))
        mean = x.toarray() if sp.issparse(x) else np.array(x)
        mean = mean.astype(np.float32)
        var = np.zeros_like(mean) if n_samples > 1 else None
        with (
            log_task(f"repairing {x.shape[0]} cells with {self.name}", logger),
            torch.inference_mode(),
        ):
            for b0 in range(r0 - r0 % size, r1, size):
                b1 = min(b0 + size, n_obs)  # the batch; x holds its rows lo:hi
                lo, hi = max(b0, r0), min(b1, r1)
                cb = c[lo - r0 : hi - r0]
                if (lo, hi) != (b0, b1):  # run the whole batch: the same arithmetic per cell
                    whole = np.zeros((b1 - b0, len(genes)), dtype=np.float32)
                    whole[lo - b0 : hi - b0] = cb
                    cb = whole
                eps = noise.draws(b0, b1)
                z, point = self._sample(module, torch.from_numpy(cb).to(device), n_samples,
                                        None, noise=eps)
                part = slice(lo - b0, hi - b0)
                start, stop = lo - r0, hi - r0
                z = z[:, part]
                counts = _norm.to_counts(
                    self._unstandardize(z.float().cpu().numpy()), lib[start:stop]
                )
                if point is None:
                    repaired = counts.mean(0)
                else:
                    p = self._unstandardize(point[part].float().cpu().numpy())
                    repaired = _norm.to_counts(p, lib[start:stop])
                if zero_threshold > 0:  # observed zeros whose repaired value is small stay zero
                    low = _log_profiles(repaired, slice(None), lib[start:stop]) < zero_threshold
                    repaired[(observed[start:stop] == 0) & low] = 0.0
                mean[start:stop, genes] = repaired
                if var is not None:
                    var[start:stop, genes] = counts.var(0, ddof=1)
        if noise.marks:
            self._noise_marks = noise.marks
        self.module_ = module.cpu()
        return Posterior(mean=mean, var=var)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``config.json`` (parameters, version, var_names, seed) and ``weights.pt``
        (network, gene statistics, ``train_cells_``) into directory ``path``, atomically
        (:func:`screpair.methods._torch.save_model`); the loaded model's output is bit-identical
        (on the same device)."""
        torch = import_torch()
        self._check_fitted()
        state = {
            "module": self.module_.state_dict(),
            "hvg": torch.from_numpy(self.hvg_.astype(np.uint8)),
            "gene_mean": torch.from_numpy(self.gene_mean_),
            "gene_scale": torch.from_numpy(self.gene_scale_),
            "clip": torch.from_numpy(np.asarray(self.clip_, dtype=np.float32)),
            **rows_entry("train_cells", self.train_cells_),
        }
        extra = {
            "class": type(self).__name__,
            "posterior_seed": int(self.posterior_seed_),
            **self._extra_state(),
        }
        save_model(
            path,
            config=params_json(self),
            state_dict=state,
            var_names=self.var_names_,
            extra=extra,
        )

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Load a model written by :meth:`save` (``transform`` then checks the gene names).

        The saved parameters go through the same checks as in ``fit`` (names, types, ranges),
        the weights are checked against them, and a model saved by a newer screpair is refused:
        each problem is a one-line ``ValueError`` naming the file.
        """
        meta, state = load_model(path)
        cfg_file, wts_file = Path(path) / "config.json", Path(path) / "weights.pt"
        extra = meta.get("extra", {})
        if extra.get("class") != cls.__name__:
            what = f"it holds a {extra.get('class')!r} model, not a {cls.__name__}"
            raise model_error(cfg_file, what)
        est = saved_estimator(cls, meta, cfg_file)
        est.var_names_ = pd.Index(meta["var_names"])
        est.hvg_ = tensor_entry(state, "hvg", wts_file, shape=(len(est.var_names_),)) != 0
        n_hvg = int(est.hvg_.sum())
        est.gene_mean_ = tensor_entry(state, "gene_mean", wts_file, shape=(n_hvg,))
        est.gene_scale_ = tensor_entry(state, "gene_scale", wts_file, shape=(n_hvg,))
        est.clip_ = tensor_entry(state, "clip", wts_file, shape=(2, n_hvg))
        est.train_cells_ = saved_rows(state, "train_cells", wts_file)
        est._set_extra_state(extra)
        est.posterior_seed_ = saved_seed(extra, est.rng, cfg_file)
        torch = import_torch()
        with _seeded_torch(0, torch.device("cpu")):  # the init is overwritten; keep global state
            est.module_ = est._build_module(n_hvg)
        load_state(est.module_, state.get("module"), wts_file)
        est.module_.eval()
        return est
