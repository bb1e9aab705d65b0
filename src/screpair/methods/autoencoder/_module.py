"""Autoencoder networks for the ``dae`` and ``vae`` baselines (pure ``nn.Module``; tensors only)."""

from __future__ import annotations

from .._torch import import_torch

torch = import_torch()
nn = torch.nn


def _mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(b), nn.GELU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DenoisingAE(nn.Module):
    """``x0_hat = decoder(encoder(c))``: a symmetric MLP autoencoder (G -> hidden -> latent -> G)."""

    def __init__(self, n_genes: int, *, hidden: int = 512, latent: int = 64, dropout: float = 0.1):
        super().__init__()
        self.encoder = _mlp([n_genes, hidden, latent], dropout)
        self.act = nn.GELU()
        self.decoder = _mlp([latent, hidden, n_genes], dropout)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.act(self.encoder(c)))


class VariationalAE(nn.Module):
    """Gaussian VAE: ``q(z | c) = N(mu, diag(exp(logvar)))``, decoder mean ``f(z)``.

    ``forward(c, generator)`` returns ``(x0_hat, mu, logvar)`` with ``z`` drawn by the
    reparameterization trick (``generator=None`` uses ``z = mu``).
    """

    def __init__(self, n_genes: int, *, hidden: int = 512, latent: int = 64, dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.Sequential(
            _mlp([n_genes, hidden], dropout), nn.LayerNorm(hidden), nn.GELU()
        )
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = _mlp([latent, hidden, n_genes], dropout)

    def encode(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(c)
        return self.mu(h), self.logvar(h).clamp(-10.0, 10.0)

    def forward(self, c: torch.Tensor, generator: torch.Generator | None = None):
        mu, logvar = self.encode(c)
        if generator is None:
            z = mu
        else:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + (0.5 * logvar).exp() * eps
        return self.decoder(z), mu, logvar
