"""Gaussian diffusion noise schedule: forward noising, timestep spacing and the DDPM/DDIM step.

The schedule owns all the noise math (diffusers' scheduler role); it knows nothing about networks
or data. It works on torch tensors of any shape whose first axis is the batch.

Conventions (Ho et al. 2020; Song et al. 2021; diffusers ``DDIMScheduler``):

- ``betas[t]`` for ``t = 0 … n_steps - 1`` and ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])``;
- forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``;
- one reverse step from ``t`` to the previous timestep ``s`` (``abar_{-1} = 1``) with
  ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``,
  ``sigma = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s))`` and
  ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z``.
  ``eta = 0`` is deterministic DDIM; ``eta = 1`` over all ``n_steps`` timesteps is ancestral DDPM.

The network's output is the noise ``eps`` (``prediction_type="epsilon"``, the paper's choice) or
the velocity ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (``"v_prediction"``, Salimans & Ho
2022), which weighs the high-noise steps more evenly; :meth:`NoiseSchedule.target` gives the
training target and :meth:`NoiseSchedule.step` converts either to ``eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._torch import import_torch

if TYPE_CHECKING:
    import torch

BETA_SCHEDULES = ("cosine", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_betas(n_steps: int, beta_schedule: str = "cosine") -> np.ndarray:
    """Noise variances ``beta_t`` (float64).

    ``"linear"``: ``linspace(1e-4, 0.02, n_steps)`` scaled by ``1000 / n_steps`` (Ho et al. 2020).
    ``"cosine"``: ``abar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2``, ``beta_t = 1 -
    abar((t + 1) / n) / abar(t / n)`` clipped at 0.999 (Nichol & Dhariwal 2021).
    """
    if n_steps < 1:
        msg = f"n_steps must be a positive integer, got {n_steps}."
        raise ValueError(msg)
    if beta_schedule == "linear":
        scale = 1000.0 / n_steps
        return np.linspace(scale * 1e-4, scale * 0.02, n_steps, dtype=np.float64)
    if beta_schedule == "cosine":

        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1.0 - abar((i + 1) / n_steps) / abar(i / n_steps), 0.999) for i in range(n_steps)],
            dtype=np.float64,
        )
    msg = f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}."
    raise ValueError(msg)


@dataclass
class StepOutput:
    """Result of one reverse step: the sample at the previous timestep and the ``x0`` estimate."""

    prev: torch.Tensor
    x0_hat: torch.Tensor


class NoiseSchedule:
    """DDPM/DDIM noise schedule (no network).

    Parameters
    ----------
    n_steps
        Number of training diffusion steps ``T``.
    beta_schedule
        ``"cosine"`` (default) or ``"linear"``; see :func:`make_betas`.
    prediction_type
        What the network predicts: ``"epsilon"`` (default) or ``"v_prediction"``.

    Examples
    --------
    >>> import torch
    >>> s = NoiseSchedule(n_steps=1000)
    >>> x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
    >>> x_t = s.add_noise(x0, eps, torch.tensor([999, 999]))
    >>> for t in s.timesteps(10):
    ...     x_t = s.step(eps, t, x_t, n_inference=10).prev
    >>> bool(torch.allclose(x_t, x0, atol=1e-4))
    True
    """

    def __init__(
        self, n_steps: int = 1000, beta_schedule: str = "cosine", prediction_type: str = "epsilon"
    ):
        if prediction_type not in PREDICTION_TYPES:
            msg = f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}."
            raise ValueError(msg)
        self.n_steps = int(n_steps)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.betas = make_betas(self.n_steps, beta_schedule)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(n_steps={self.n_steps}, beta_schedule={self.beta_schedule!r}, "
            f"prediction_type={self.prediction_type!r})"
        )

    def _abar(self, t, like: torch.Tensor) -> torch.Tensor:
        """``abar_t`` gathered for integer timesteps ``t`` (``t < 0`` gives 1), shaped to broadcast."""
        torch = import_torch()
        table = torch.as_tensor(
            np.concatenate([self.alphas_cumprod, [1.0]]), dtype=like.dtype, device=like.device
        )
        t = torch.as_tensor(t, device=like.device, dtype=torch.long)
        t = torch.where(t < 0, torch.full_like(t, self.n_steps), t)
        a = table[t]
        if a.ndim:  # per-sample timesteps: broadcast over the trailing axes
            a = a.reshape(a.shape + (1,) * (like.ndim - a.ndim))
        return a

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

        ``t`` is an int or a LongTensor with one timestep per sample (first axis).
        """
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Training target of the network at ``(x0, noise, t)``: ``noise`` or ``v``."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._abar(t, x0)
        return a.sqrt() * noise - (1.0 - a).sqrt() * x0

    def timesteps(self, n: int) -> np.ndarray:
        """``n`` inference timesteps, descending, "trailing" spacing (first is ``n_steps - 1``).

        ``n = n_steps`` gives every timestep (DDPM). The trailing spacing (Lin et al. 2024)
        starts the sampler at the last training step so that it starts from (almost) pure noise.
        """
        if not 1 <= n <= self.n_steps:
            msg = f"number of inference steps must be in [1, {self.n_steps}], got {n}."
            raise ValueError(msg)
        return np.unique(np.round(np.arange(self.n_steps, 0, -self.n_steps / n)).astype(int) - 1)[
            ::-1
        ]

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        *,
        prev_t: int | None = None,
        n_inference: int | None = None,
        eta: float = 0.0,
        clip: tuple[float | torch.Tensor, float | torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> StepOutput:
        """One reverse step from timestep ``t`` to ``prev_t``.

        Parameters
        ----------
        model_output
            The network's prediction at ``(x_t, t)``: the noise, or ``v`` (``prediction_type``).
        t
            Current timestep (an int shared by the batch).
        x_t
            Current sample.
        prev_t
            Timestep to step to; ``-1`` means the clean end point. When ``None`` it is the next
            entry of :meth:`timesteps` for ``n_inference`` steps (default 1 step per call when
            neither is given: ``t - 1``).
        n_inference
            Number of inference steps used to derive ``prev_t``.
        eta
            Stochasticity: 0 deterministic DDIM, 1 DDPM-like ancestral sampling.
        clip
            Optional ``(low, high)`` bounds for ``x0_hat`` (numbers, or tensors broadcasting
            against the sample, e.g. per-gene bounds); the noise estimate is made consistent
            with the clipped ``x0_hat`` (as diffusers does when thresholding).
        generator
            Source of the fresh noise ``z`` when ``eta > 0``.
        noise
            The fresh noise ``z`` itself (shaped like ``x_t``), instead of a draw from
            ``generator``; used only when ``eta > 0`` and ``prev_t >= 0``.
        """
        torch = import_torch()
        t = int(t)
        if prev_t is None:
            if n_inference is None:
                prev_t = t - 1
            else:
                ts = self.timesteps(n_inference)
                later = ts[ts < t]
                prev_t = int(later[0]) if len(later) else -1
        a_t = self._abar(t, x_t)
        a_s = self._abar(prev_t, x_t)
        if self.prediction_type == "epsilon":
            eps_hat = model_output
            x0_hat = (x_t - (1.0 - a_t).sqrt() * eps_hat) / a_t.sqrt()
        else:  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v, eps = sqrt(abar) v + sqrt(1 - abar) x_t
            eps_hat = a_t.sqrt() * model_output + (1.0 - a_t).sqrt() * x_t
            x0_hat = a_t.sqrt() * x_t - (1.0 - a_t).sqrt() * model_output
        if clip is not None:
            low, high = (torch.as_tensor(b, dtype=x_t.dtype, device=x_t.device) for b in clip)
            x0_hat = torch.minimum(torch.maximum(x0_hat, low), high)
            eps_hat = (x_t - a_t.sqrt() * x0_hat) / (1.0 - a_t).sqrt()
        var = (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
        sigma = eta * var.clamp_min(0.0).sqrt()
        direction = (1.0 - a_s - sigma**2).clamp_min(0.0).sqrt() * eps_hat
        prev = a_s.sqrt() * x0_hat + direction
        if eta > 0 and prev_t >= 0:
            z = noise if noise is not None else torch.randn(
                x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device
            )
            prev = prev + sigma * z
        return StepOutput(prev=prev, x0_hat=x0_hat)
