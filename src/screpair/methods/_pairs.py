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
from .._utils import as_rng, to_dense, torch_seed
from ._base import BaseImputer, DataContext, Posterior
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
    save_model,
    saved_estimator,
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
) -> tuple[np.ndarray, np.ndarray]:
    """Clean log profiles ``(n, g)`` and ``k`` degraded ones ``(k, n, g)`` on the ``genes``
    columns (``k`` from :func:`n_views`; ``gene_length``: one value per column of ``x``)."""
    clean = _log_profiles(x, genes)
    views = np.empty((k, *clean.shape), dtype=np.float32)
    for v in range(k):
        views[v] = _log_profiles(degrade_view(x, cfg, rng, gene_length), genes)
    return clean, views


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
    tensor) and ``_sample(module, c, n_samples, generator)`` (``(n_samples, batch, genes)``
    samples in standardized log space and a ``(batch, genes)`` point estimate, or ``None`` to use
    the samples' mean), and list their config classes in ``_configs``.
    """

    _configs: ClassVar[dict[str, type]] = {"pairs": PairConfig, "train": TrainConfig}
    _predict_batch: ClassVar[int] = 256
    uses_reference: ClassVar[bool] = True
    has_var: ClassVar[bool] = True
    #: the repair noise is one stream over the cells in order (seeded by ``posterior_seed_``)
    posterior_by_rows: ClassVar[bool] = False
    #: repairing degraded input: its counts need not be integers
    _posterior_checks: ClassVar[dict[str, Any]] = {"warn_empty": False, "require_integer": False}

    # ---- hooks -------------------------------------------------------------------------------
    def _build_module(self, n_genes: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _loss(self, module, x0, c, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def _val_loss(self, module, x0, c, generator):
        """The validation score early stopping monitors (default: the training loss)."""
        return self._loss(module, x0, c, generator)

    def _sample(self, module, c, n_samples: int, generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def _n_samples(self) -> int:
        return 1

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _set_extra_state(self, extra: dict[str, Any]) -> None:
        return None

    # ---- helpers -----------------------------------------------------------------------------
    def _config(self, name: str):
        """The ``name`` config (:func:`screpair.methods._torch.resolve_config`): the config
        class's defaults when ``None``; a dict (e.g. from a CLI config file) replaces those
        fields of the defaults."""
        return resolve_config(self._configs[name], getattr(self, name), name=name)

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
    def _fit(self, x, ctx: DataContext) -> None:
        """Make training pairs from the (clean) profiles ``x`` and train the network.

        ``fit(data)`` takes cells x genes raw counts (AnnData, ndarray or sparse): the clean
        reference. The fitted estimator has ``var_names_``, ``hvg_`` (bool mask over genes),
        ``gene_mean_``/``gene_scale_`` (standardization of the log values), ``module_``,
        ``history_`` (one row per epoch) and ``posterior_seed_`` (the integer seed of the repair
        noise: ``rng`` itself when it is an int, else one draw from it).
        """
        from .. import pp

        torch = import_torch()
        pcfg, tcfg = self._pairs_cfg(), self._train_cfg()
        rng = as_rng(self.rng)
        n_top = int(pcfg.n_top_genes)
        if x.shape[1] <= n_top:
            hvg = np.ones(x.shape[1], dtype=bool)
        else:
            hvg = pp.hvg_dispersion(x, n_top)["highly_variable"].to_numpy(dtype=bool)
        genes = np.flatnonzero(hvg)
        k = n_views(pcfg, x.shape[0])
        gene_length = self._gene_length(ctx)
        with log_task(f"making {k} degraded view(s) of {x.shape[0]} cells", logger):
            clean, views = make_pairs(x, genes, pcfg, k, rng, gene_length)
        # centred per gene, scaled by one overall sd: a per-gene sd would blow up rarely
        # detected genes (sd ~ 0 in the reference) when a degraded cell does express them
        self.gene_mean_ = clean.mean(0).astype(np.float32)
        sd = float((clean - self.gene_mean_).std())
        self.gene_scale_ = np.full(len(genes), max(sd, 1e-3), dtype=np.float32)
        clean_z = self._standardize(clean)
        views_z = self._standardize(views)
        # plausible range of a repaired log value: [0, max over the reference + 0.5]
        top = float(clean.max()) + 0.5
        self.clip_ = self._standardize(np.stack([np.zeros(len(genes)), np.full(len(genes), top)]))

        device = resolve_device(tcfg.device)
        n = x.shape[0]
        train_cells, val_cells = split_cells(n, tcfg.val_frac, rng)
        # pair index p -> (view p // n, cell p % n); validation uses only the first view
        train_idx = (np.arange(k)[:, None] * n + train_cells[None]).ravel()
        val_idx = val_cells
        x0_all = torch.from_numpy(clean_z)
        c_all = torch.from_numpy(views_z.reshape(k * n, -1))
        seed = torch_seed(rng)
        gen = torch.Generator(device=device).manual_seed(seed)

        def loss_fn(rows, training):
            rows_t = torch.as_tensor(rows, dtype=torch.long)
            x0 = x0_all[rows_t % n].to(device)
            c = c_all[rows_t].to(device)
            if training:
                return LossOutput(loss=self._loss(module, x0, c, gen))
            g = torch.Generator(device=device).manual_seed(int(rows[0]))
            return LossOutput(loss=self._val_loss(module, x0, c, g))

        on_epoch = None
        if pcfg.redraw_views:  # one view's training cells get fresh damage at every epoch
            redraw_rng = np.random.default_rng(rng.integers(2**63))
            c_view = c_all.view(k, n, -1)

            def on_epoch(epoch: int) -> None:
                fresh = _log_profiles(degrade_view(x, pcfg, redraw_rng, gene_length), genes)
                c_view[(epoch - 1) % k, train_cells] = torch.from_numpy(
                    self._standardize(fresh[train_cells])
                )

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
        """Repair the profiles ``x`` (counts, not necessarily integers).

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
        gen = torch.Generator(device=device).manual_seed(torch_seed(as_rng(self.posterior_seed_)))
        mean = x.toarray() if sp.issparse(x) else np.array(x)
        mean = mean.astype(np.float32)
        var = np.zeros_like(mean) if n_samples > 1 else None
        with (
            log_task(f"repairing {x.shape[0]} cells with {self.name}", logger),
            torch.inference_mode(),
        ):
            for start in range(0, x.shape[0], self._predict_batch):
                stop = min(start + self._predict_batch, x.shape[0])
                cb = torch.from_numpy(c[start:stop]).to(device)
                z, point = self._sample(module, cb, n_samples, gen)
                counts = _norm.to_counts(
                    self._unstandardize(z.float().cpu().numpy()), lib[start:stop]
                )
                if point is None:
                    repaired = counts.mean(0)
                else:
                    p = self._unstandardize(point.float().cpu().numpy())
                    repaired = _norm.to_counts(p, lib[start:stop])
                if zero_threshold > 0:  # observed zeros whose repaired value is small stay zero
                    low = _log_profiles(repaired, slice(None), lib[start:stop]) < zero_threshold
                    repaired[(observed[start:stop] == 0) & low] = 0.0
                mean[start:stop, genes] = repaired
                if var is not None:
                    var[start:stop, genes] = counts.var(0, ddof=1)
        self.module_ = module.cpu()
        return Posterior(mean=mean, var=var)

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``config.json`` (parameters, version, var_names, seed) and ``weights.pt`` into
        directory ``path``, atomically (:func:`screpair.methods._torch.save_model`); the loaded
        model's output is bit-identical (on the same device)."""
        torch = import_torch()
        self._check_fitted()
        state = {
            "module": self.module_.state_dict(),
            "hvg": torch.from_numpy(self.hvg_.astype(np.uint8)),
            "gene_mean": torch.from_numpy(self.gene_mean_),
            "gene_scale": torch.from_numpy(self.gene_scale_),
            "clip": torch.from_numpy(np.asarray(self.clip_, dtype=np.float32)),
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
        est._set_extra_state(extra)
        est.posterior_seed_ = saved_seed(extra, est.rng, cfg_file)
        torch = import_torch()
        with _seeded_torch(0, torch.device("cpu")):  # the init is overwritten; keep global state
            est.module_ = est._build_module(n_hvg)
        load_state(est.module_, state.get("module"), wts_file)
        est.module_.eval()
        return est
