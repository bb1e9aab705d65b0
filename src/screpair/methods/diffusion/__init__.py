"""DiffRepairer: conditional diffusion repair of degraded profiles (``method="diffusion"``).

- :class:`NoiseSchedule` (``_schedule.py``): DDPM/DDIM noise math, no network;
- :class:`DenoiserNet` (``_module.py``): the transformer denoiser (pure ``nn.Module``), which
  predicts ``v`` (default) or the noise;
- :class:`DiffusionImputer` (``_model.py``): the estimator (data, training, repair, save/load);
- ``methods/_pairs.py``: the (clean, degraded) pair pipeline shared with the ``dae``/``vae``
  baselines.

torch is imported only when :class:`DenoiserNet` or a fitted model is used.
"""

from __future__ import annotations

from .._pairs import PairConfig, PairImputer
from ._model import DiffusionConfig, DiffusionImputer
from ._schedule import NoiseSchedule, StepOutput, make_betas

__all__ = [
    "DiffusionConfig",
    "DiffusionImputer",
    "NoiseSchedule",
    "PairConfig",
    "PairImputer",
    "StepOutput",
    "make_betas",
]


def __getattr__(name: str):
    if name == "DenoiserNet":
        from ._module import DenoiserNet

        return DenoiserNet
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
