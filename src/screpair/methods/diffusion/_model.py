"""DiffRepairer: conditional diffusion transformer that repairs degraded expression profiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..._utils import RNGLike
from .._pairs import TRAIN_CELLS, PairConfig, PairImputer
from .._torch import TrainConfig, import_torch
from ._schedule import NoiseSchedule


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """Network and noise-schedule settings of :class:`DiffusionImputer`.

    Attributes
    ----------
    patch_size
        Genes per token. ``None`` (default): ``max(250, ceil(G / 10))`` for ``G`` modelled genes,
        i.e. at most 10 tokens (5,000 genes: 10 patches of 500; 2,000 genes: 8 of 250). The
        transformer's cost grows with the number of tokens and dominates a training step, so
        10 tokens of 500 genes train ~1.8x faster per pair than 20 of 250 (the default before
        issue 18); with ``last_step_frac=0.3`` on baron pancreas (``degrade``, seed 0) they gave
        log-MSE / r / cell r 0.230 / 0.495 / 0.475 in 102 s against 0.230 / 0.494 / 0.473 in
        ~250 s with 20 tokens (``benchmarks/RESULTS.md``, issue 18). ``patch_size=250`` is the
        earlier setting; ``patch_size=1`` is the paper's one token per gene (only practical on a
        GPU and with few genes). See :mod:`screpair.methods.diffusion._module` for the token
        design.
    d_model, n_layers, n_heads, dim_feedforward, dropout
        Transformer encoder (the paper: 256-d tokens, 4 layers, multi-head attention).
    cond_concat, cond_dim, cond_hidden, cond_dropout
        How the degraded profile conditions the network: concatenated patch by patch to the
        tokens (``cond_concat``) and/or encoded by an MLP (``cond_hidden`` wide, dropout
        ``cond_dropout``) into a ``cond_dim``-dimensional cell code added to every token
        (``None``: no code). Both by default; see :mod:`screpair.methods.diffusion._module`.
    n_steps, beta_schedule, prediction_type
        Training diffusion steps, beta schedule and network target (:class:`NoiseSchedule`).
        The default target is ``"v_prediction"`` (``v = sqrt(abar) eps - sqrt(1 - abar) x0``, an
        invertible reparameterization of the paper's noise prediction; the sampler converts it
        to ``eps``). ``"epsilon"`` is the paper's literal choice; on small simulations (200 cells,
        40 epochs) it gave a 10x larger log-scale MSE than ``v`` with the same network, because
        the eps loss barely trains the high-noise steps that a few-step DDIM sampler relies on.
    last_step_frac
        Share of each training batch drawn at the last timestep (pure noise) instead of
        uniformly; there the network's ``x0`` estimate is the point repair of
        ``mean="denoiser"``, which uniform timesteps train on ~1/1000 of the draws (and the
        high-noise range on ~10%). Default 0.3 (issue 18); ``0`` is uniform, as in DDPM (the
        setting before). With 10 tokens (the ``patch_size`` default), seed 0, ``degrade``:
        baron 0.230 / 0.489 / 0.469 (log-MSE / r / cell r) with 0, 0.230 / 0.495 / 0.475 with
        0.3; pbmc4k (8 tokens) 0.525 / 0.642 / 0.637 with 0 (228 s), 0.529 / 0.644 / 0.637 with
        0.3 (134 s, it stops earlier).
    val_metric
        What early stopping monitors on the validation cells: ``"loss"`` (default, the
        diffusion loss at random timesteps) or ``"repair"`` (the MSE of the point estimate
        against the clean profile: what ``mean="denoiser"`` returns).

    Measured before issue 18's defaults (20 tokens, uniform timesteps) on baron pancreas
    (``degrade`` protocol of ``benchmarks/diffusion_degrade.py``, seed 0, log-MSE / Pearson r over
    2,000 HVGs; input 0.291 / 0.479): those defaults 0.230 / 0.494; ``val_metric="repair"``
    0.231 / 0.497; plus ``last_step_frac=0.3`` 0.233 / 0.502; plus
    ``PairConfig(redraw_views=True, n_views=4)`` 0.234 / 0.500 with half the pairs per epoch;
    only that pair setting 0.233 / 0.492; ``n_layers=2`` 0.233 / 0.493 (``benchmarks/RESULTS.md``,
    issue 18).
    """

    patch_size: int | None = None
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    dim_feedforward: int = 512
    dropout: float = 0.0
    cond_concat: bool = True
    cond_dim: int | None = 64
    cond_hidden: int = 512
    cond_dropout: float = 0.1
    n_steps: int = 1000
    beta_schedule: str = "cosine"
    prediction_type: str = "v_prediction"
    last_step_frac: float = 0.3
    val_metric: str = "loss"


#: the default ``TrainConfig.epoch_size`` of :class:`DiffusionImputer` (training pairs per
#: epoch): above every benchmark dataset's training pairs (human kidney's 10,233 at most), so
#: their results are unchanged; at 10^5 cells (50,000 sampled x 2 views: 90,000 training pairs)
#: an epoch costs what one of about 9,000 cells does instead of 5.5x that (issue 16)
EPOCH_PAIRS = 16_384
MAX_TOKENS = 10
MIN_PATCH = 250


def patch_size(cfg: DiffusionConfig, n_genes: int) -> int:
    """Genes per token: ``cfg.patch_size``, or for ``None`` ``max(MIN_PATCH, ceil(n_genes /
    MAX_TOKENS))`` (at most ``MAX_TOKENS`` tokens)."""
    if cfg.patch_size is None:
        return max(MIN_PATCH, -(-int(n_genes) // MAX_TOKENS))
    if int(cfg.patch_size) < 1:
        msg = f"patch_size must be >= 1 (or None for automatic), got {cfg.patch_size!r}."
        raise ValueError(msg)
    return int(cfg.patch_size)


class DiffusionImputer(PairImputer):
    """DiffRepairer (Xiao et al., Biology 14:1652, 2025): conditional DDPM for profile repair.

    A transformer (:class:`~screpair.methods.diffusion._module.DenoiserNet`) is trained with an
    MSE loss to predict the velocity ``v`` of ``x_t`` (``module.prediction_type="v_prediction"``,
    the default; ``"epsilon"``: the noise) given the timestep and the degraded profile ``c``.
    Repair runs the reverse process with DDIM from pure noise, conditioned on the observed
    profile, ``n_samples`` times: their variance is the uncertainty and the repaired profile is
    either the mean of the samples (``mean="samples"``, the paper) or the network's own estimate
    of ``E[x0 | c]`` (``mean="denoiser"``, default; see ``mean``). Trained on pairs made by
    degrading clean profiles with :func:`screpair.simulate.degrade_counts` (see
    :mod:`screpair.methods._pairs` for the pipeline: 1e4 normalization, log1p, top HVGs, per-gene
    standardization, count scale out).

    Use it inductively (``fit(reference).transform(degraded)``, the paper's setting; gene names
    are checked), or through ``screpair.impute(adata, method="diffusion")``, which trains on pairs
    made from the observed profiles and repairs those same profiles.

    Parameters
    ----------
    module
        Network and schedule settings (:class:`DiffusionConfig`).
    train
        Training settings (:class:`~screpair.methods.TrainConfig`). The default is
        ``TrainConfig(epoch_size=EPOCH_PAIRS)``: at most 16,384 training pairs per epoch (the
        next ones of a shuffled pass over all of them), so that an epoch of a large data set
        costs what one of about 9,000 cells does; a dict updates that default (``{"n_epochs": 50}``
        keeps the cap), a ``TrainConfig`` is used as given (``epoch_size=None`` unless set).
    pairs
        Training-pair settings (:class:`~screpair.methods.diffusion.PairConfig`).
    n_samples
        Reverse-process samples per cell; with ``n_samples >= 2`` the sample variance is returned.
    n_inference_steps
        DDIM steps at repair time.
    eta
        DDIM stochasticity (0: deterministic given the starting noise; 1: DDPM-like).
    mean
        Point estimate written as the repaired profile. ``"denoiser"``: the average over the
        samples of the network's ``x0`` estimate at the first (pure-noise) reverse step; there
        ``x_t`` carries no information, so the estimate is the network's ``E[x0 | c]``, the
        minimum-MSE repair, which the mean of ``n_samples`` samples only approaches as
        ``n_samples`` grows (its error exceeds it by the posterior variance / ``n_samples``).
        ``"samples"``: the mean of the final samples (the paper).
    n_train_cells
        Most cells trained on (``None``: all). Above it a random sample of this many cells
        (drawn first from ``rng``; ``train_cells_``) gives the HVGs, the standardization and
        the training pairs; at or below it every cell is used, exactly as before the cap
        existed. Default 50,000. Repair covers every cell either way.
    rng
        Seed or ``numpy.random.Generator`` (sample, pair making, split, initialization, noise).
        ``fit`` fixes the repair noise's seed, ``posterior_seed_``: the same output on every
        call and after save / load.

    Notes
    -----
    Large data: the repair of a cell depends only on its row, the fitted model and
    ``posterior_seed_`` (``posterior_by_rows``), so :func:`screpair.impute_file` computes it
    block by block and writes the in-memory path's values for any ``chunk_rows``. The noise is
    laid out by fixed batches of 256 cells and seed blocks of ``SEED_BLOCK`` (8,192) cells,
    one generator each (see :meth:`PairImputer._posterior`); the first seed block keeps the
    single noise stream of earlier releases, so data of up to 8,192 cells repair exactly as
    before, larger data get fresh noise from their 8,193rd cell on.

    Examples
    --------
    >>> import screpair
    >>> from screpair.methods import TrainConfig
    >>> ad = screpair.simulate.splat(n_obs=60, n_vars=40, rng=0)
    >>> est = DiffusionImputer(
    ...     module=DiffusionConfig(patch_size=10, d_model=16, n_layers=1, n_heads=2, dim_feedforward=16),
    ...     train=TrainConfig(n_epochs=1, progress=False), n_samples=2, n_inference_steps=2, rng=0,
    ... )
    >>> est.fit(ad, layer="true_counts").transform(ad, layer="counts").shape
    (60, 40)
    """

    name: ClassVar[str] = "diffusion"
    _configs: ClassVar[dict[str, type]] = {
        "module": DiffusionConfig,
        "pairs": PairConfig,
        "train": TrainConfig,
    }
    _config_defaults: ClassVar[dict[str, TrainConfig]] = {
        "train": TrainConfig(epoch_size=EPOCH_PAIRS),
    }

    def __init__(
        self,
        *,
        module: DiffusionConfig | None = None,
        train: TrainConfig | None = None,
        pairs: PairConfig | None = None,
        n_samples: int = 2,
        n_inference_steps: int = 4,
        eta: float = 0.0,
        mean: str = "denoiser",
        n_train_cells: int | None = TRAIN_CELLS,
        rng: RNGLike = None,
    ):
        self.module = module
        self.train = train
        self.pairs = pairs
        self.n_samples = n_samples
        self.n_inference_steps = n_inference_steps
        self.eta = eta
        self.mean = mean
        self.n_train_cells = n_train_cells
        self.rng = rng

    def _schedule(self) -> NoiseSchedule:
        cfg = self._module_cfg()
        return NoiseSchedule(
            n_steps=cfg.n_steps,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction_type,
        )

    def _build_module(self, n_genes: int):
        from ._module import DenoiserNet

        cfg = self._module_cfg()
        return DenoiserNet(
            n_genes,
            patch_size=patch_size(cfg, n_genes),
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            cond_dim=cfg.cond_dim,
            cond_hidden=cfg.cond_hidden,
            cond_dropout=cfg.cond_dropout,
            cond_concat=cfg.cond_concat,
        )

    def _loss(self, module, x0, c, generator):
        torch = import_torch()
        sched = self._schedule()
        t = torch.randint(0, sched.n_steps, (x0.shape[0],), generator=generator, device=x0.device)
        frac = float(self._module_cfg().last_step_frac)
        if frac > 0:
            last = torch.rand(x0.shape[0], generator=generator, device=x0.device) < frac
            t = torch.where(last, torch.full_like(t, sched.n_steps - 1), t)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        pred = module(sched.add_noise(x0, noise, t), t, c)
        return torch.nn.functional.mse_loss(pred, sched.target(x0, noise, t))

    def _val_loss(self, module, x0, c, generator):
        if self._module_cfg().val_metric == "loss":
            return self._loss(module, x0, c, generator)
        # the repair itself: MSE of the point estimate (x0 at the first reverse step, from
        # pure noise) against the clean profile
        torch = import_torch()
        sched = self._schedule()
        t0 = int(sched.timesteps(int(self.n_inference_steps))[0])
        x = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        tt = torch.full((x0.shape[0],), t0, device=x0.device, dtype=torch.long)
        clip = torch.as_tensor(self.clip_, device=x0.device, dtype=x0.dtype)
        out = sched.step(module(x, tt, c), t0, x, prev_t=-1, clip=(clip[0], clip[1]))
        return torch.nn.functional.mse_loss(out.x0_hat, x0)

    def _n_samples(self) -> int:
        if int(self.n_samples) < 1:
            msg = f"n_samples must be >= 1, got {self.n_samples}."
            raise ValueError(msg)
        return int(self.n_samples)

    def _check_mean(self) -> None:
        if self.mean not in ("denoiser", "samples"):
            msg = f"mean must be 'denoiser' or 'samples', got {self.mean!r}."
            raise ValueError(msg)

    def _check_params(self) -> None:
        super()._check_params()
        self._n_samples()
        self._check_mean()
        self._schedule().timesteps(int(self.n_inference_steps))  # schedule and step count
        cfg = self._module_cfg()
        patch_size(cfg, 1)  # an explicit patch size must be >= 1
        if not 0.0 <= float(cfg.last_step_frac) <= 1.0:
            msg = f"last_step_frac must be in [0, 1], got {cfg.last_step_frac!r}."
            raise ValueError(msg)
        if cfg.val_metric not in ("loss", "repair"):
            msg = f"val_metric must be 'loss' or 'repair', got {cfg.val_metric!r}."
            raise ValueError(msg)

    def _noise_draws(self) -> int:
        """The starting noise, plus one fresh noise per step but the last when ``eta > 0``."""
        n_steps = len(self._schedule().timesteps(int(self.n_inference_steps)))
        return 1 + (n_steps - 1 if float(self.eta) > 0 else 0)

    def _sample(self, module, c, n_samples: int, generator, noise=None):
        """DDIM reverse process from pure noise, ``n_samples`` per cell: the samples ``(S, B, G)``
        and the point estimate ``(B, G)`` (``None`` for ``mean="samples"``).

        The starting noise and (``eta > 0``) each step's fresh noise come from ``noise`` when
        given (:meth:`_noise_draws` tensors of shape ``(S * B, G)``, sample-major rows: row
        ``s * B + b`` is sample ``s`` of cell ``b``), else they are drawn from ``generator``
        in that order."""
        self._check_mean()
        torch = import_torch()
        sched = self._schedule()
        b, g = c.shape
        cond = c.repeat(n_samples, 1)
        draws = iter(noise) if noise is not None else None
        if draws is None:
            x = torch.randn(cond.shape, generator=generator, device=c.device, dtype=c.dtype)
        else:
            x = next(draws).to(device=c.device, dtype=c.dtype)
        clip = torch.as_tensor(self.clip_, device=c.device, dtype=c.dtype)
        n_inf = int(self.n_inference_steps)
        ts = sched.timesteps(n_inf)
        eta = float(self.eta)
        point = None
        for i, t in enumerate(ts):
            prev_t = int(ts[i + 1]) if i + 1 < len(ts) else -1
            tt = torch.full((cond.shape[0],), int(t), device=c.device, dtype=torch.long)
            pred = module(x, tt, cond)  # v or eps (module.prediction_type)
            z = next(draws) if draws is not None and eta > 0 and prev_t >= 0 else None
            out = sched.step(
                pred,
                int(t),
                x,
                prev_t=prev_t,
                eta=eta,
                clip=(clip[0], clip[1]),
                generator=generator,
                noise=z,
            )
            x = out.prev
            if i == 0 and self.mean == "denoiser":
                point = out.x0_hat.reshape(n_samples, b, g).mean(0)
        return x.reshape(n_samples, b, g), point
