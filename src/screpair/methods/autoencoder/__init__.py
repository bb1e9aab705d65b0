"""Autoencoder baselines of DiffRepairer: ``dae`` (denoising AE) and ``vae`` (variational AE).

They share the diffusion method's (clean, degraded) pair pipeline; torch is imported when a
network is built.
"""

from __future__ import annotations

from ._model import AEConfig, DAEImputer, VAEImputer

__all__ = ["AEConfig", "DAEImputer", "VAEImputer"]
