"""Denoising and variational autoencoder baselines of DiffRepairer (``dae``, ``vae``).

Both use exactly the diffusion method's data pipeline and training pairs
(:mod:`screpair.methods._pairs`): input the degraded log profile ``c``, target the clean
``x0`` (standardized log values of the top HVGs), output back on the count scale. Training
uses at most ``n_train_cells`` cells; the repair is deterministic (no noise: the networks run
in eval mode and the VAE decodes its posterior mean), one cell's output depends only on its
row and the fitted model, and ``posterior_by_rows`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..._utils import RNGLike
from .._pairs import TRAIN_CELLS, PairConfig, PairImputer
from .._torch import TrainConfig, import_torch


@dataclass(frozen=True, kw_only=True)
class AEConfig:
    """Autoencoder architecture.

    Attributes
    ----------
    hidden
        Width of the hidden layer on each side.
    latent
        Bottleneck (latent) dimension.
    dropout
        Dropout after each hidden layer.
    kl_weight
        VAE only: weight of the KL term (per gene) against the reconstruction MSE.
    """

    hidden: int = 512
    latent: int = 64
    dropout: float = 0.1
    kl_weight: float = 1.0


class _AEImputer(PairImputer):
    #: name of the network class in :mod:`._module`
    _network: ClassVar[str]
    _configs: ClassVar[dict[str, type]] = {
        "module": AEConfig,
        "pairs": PairConfig,
        "train": TrainConfig,
    }

    def __init__(
        self,
        *,
        module: AEConfig | None = None,
        train: TrainConfig | None = None,
        pairs: PairConfig | None = None,
        n_train_cells: int | None = TRAIN_CELLS,
        rng: RNGLike = None,
    ):
        self.module = module
        self.train = train
        self.pairs = pairs
        self.n_train_cells = n_train_cells
        self.rng = rng

    def _build_module(self, n_genes: int):
        from . import _module

        cfg = self._module_cfg()
        network = getattr(_module, self._network)
        return network(n_genes, hidden=cfg.hidden, latent=cfg.latent, dropout=cfg.dropout)


class DAEImputer(_AEImputer):
    """Denoising autoencoder baseline (``method="dae"``): ``x0_hat = AE(c)`` trained with MSE.

    Parameters
    ----------
    module
        Architecture (:class:`AEConfig`).
    train
        Training settings (:class:`~screpair.methods.TrainConfig`).
    pairs
        Training-pair settings (:class:`~screpair.methods.diffusion.PairConfig`).
    n_train_cells
        Most cells trained on (``None``: all). Above it a random sample of this many cells
        (drawn first from ``rng``; ``train_cells_``) gives the HVGs, the standardization and
        the training pairs; at or below it every cell is used, exactly as before the cap
        existed. Default 50,000. Prediction covers every cell either way, by rows
        (:func:`screpair.impute_file` computes it block by block).
    rng
        Seed or ``numpy.random.Generator``.
    """

    name: ClassVar[str] = "dae"
    _network: ClassVar[str] = "DenoisingAE"

    def _loss(self, module, x0, c, generator):
        torch = import_torch()
        return torch.nn.functional.mse_loss(module(c), x0)

    def _sample(self, module, c, n_samples, generator, noise=None):
        return module(c)[None], None


class VAEImputer(_AEImputer):
    """Variational autoencoder baseline (``method="vae"``): encode ``c``, decode ``x0``.

    Loss: per-entry MSE to the clean profile plus ``kl_weight * KL(q(z|c) || N(0, I)) / n_genes``.
    Repair decodes the posterior mean ``z = mu``.

    Parameters
    ----------
    module
        Architecture and KL weight (:class:`AEConfig`).
    train
        Training settings (:class:`~screpair.methods.TrainConfig`).
    pairs
        Training-pair settings (:class:`~screpair.methods.diffusion.PairConfig`).
    n_train_cells
        Most cells trained on (``None``: all). Above it a random sample of this many cells
        (drawn first from ``rng``; ``train_cells_``) gives the HVGs, the standardization and
        the training pairs; at or below it every cell is used, exactly as before the cap
        existed. Default 50,000. Prediction covers every cell either way, by rows
        (:func:`screpair.impute_file` computes it block by block).
    rng
        Seed or ``numpy.random.Generator``.
    """

    name: ClassVar[str] = "vae"
    _network: ClassVar[str] = "VariationalAE"

    def _loss(self, module, x0, c, generator):
        torch = import_torch()
        x_hat, mu, logvar = module(c, generator)
        kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        recon = torch.nn.functional.mse_loss(x_hat, x0)
        return recon + self._module_cfg().kl_weight * kl / x0.shape[1]

    def _sample(self, module, c, n_samples, generator, noise=None):
        return module(c, None)[0][None], None
