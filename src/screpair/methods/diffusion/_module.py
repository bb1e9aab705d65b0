"""Transformer noise-prediction network (pure ``nn.Module``; tensors only, no AnnData).

Token design (why gene patches): the DiffRepairer paper embeds the profile into 256-d tokens and
fuses them with a 4-layer transformer encoder. One token per gene (``patch_size=1``, the paper's
reading) makes self-attention cost O(G^2) with G = 5,000 genes, which is far too slow on a CPU.
Here the genes (in a fixed order) are cut into ``ceil(G / patch_size)`` patches; each patch is one
token. Every patch has its **own** linear embedding (a grouped linear layer), so each gene keeps its
own weights as it would with per-gene tokens, and a learned position embedding tells the encoder
which patch a token is. The timestep enters as a sinusoidal embedding passed through an MLP and
added to every token. A grouped linear read-out maps each token back to its patch of genes (the
predicted noise).

The condition ``c`` (the degraded profile) enters by two routes (both on by default):

- per patch (``cond_concat=True``): token ``k`` embeds ``[x_t[patch k], c[patch k]]``, the literal
  reading of the paper, so every gene's observed value reaches the network;
- as a cell code (``cond_dim=d``, default 64): an MLP encodes the whole profile ``c`` into a
  ``d``-dimensional code and a linear layer maps it to one embedding per token, added to the
  tokens, so every token sees the cell's overall expression programme from the first layer on
  (not only through attention between patches).

On baron pancreas (a clean reference of 411 cells repairing 411 degraded ones, moderate damage,
90 s of training) the two together gave log-MSE 0.181 / Pearson r 0.581, per patch alone 0.189 /
0.548, the code alone 0.191 / 0.545 (the DAE baseline 0.190 / 0.540).
"""

from __future__ import annotations

import math

from .._torch import import_torch

torch = import_torch()
nn = torch.nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. / DDPM), shape ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchLinear(nn.Module):
    """Independent linear maps per token: ``(B, K, d_in) -> (B, K, d_out)``."""

    def __init__(self, n_tokens: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(n_tokens, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(n_tokens, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bki,kio->bko", x, self.weight) + self.bias


class DenoiserNet(nn.Module):
    """Conditional denoiser ``f(x_t, t, c)`` on gene profiles.

    It predicts the noise schedule's training target (:meth:`NoiseSchedule.target`): the velocity
    ``v`` for ``prediction_type="v_prediction"`` (the default of :class:`DiffusionConfig`) or the
    noise ``eps`` for ``"epsilon"``; the network itself is the same for both.

    Parameters
    ----------
    n_genes
        Profile length G.
    patch_size
        Genes per token (``patch_size=1`` is one token per gene, as in the paper).
    d_model
        Token width (256 in the paper).
    n_layers
        Transformer encoder layers (4 in the paper).
    n_heads
        Attention heads.
    dim_feedforward
        Width of the encoder's feed-forward block.
    dropout
        Dropout inside the encoder.
    conditional
        Whether a condition ``c`` of the same shape as ``x_t`` is given.
    cond_concat
        Concatenate each patch of ``c`` to its token.
    cond_dim
        Width of the cell code ``c`` is encoded into (``None``: no code). With
        ``conditional=True`` at least one of the two routes must be on.
    cond_hidden
        Hidden width of the condition encoder.
    cond_dropout
        Dropout in the condition encoder.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        patch_size: int = 250,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        dim_feedforward: int = 512,
        dropout: float = 0.0,
        conditional: bool = True,
        cond_concat: bool = True,
        cond_dim: int | None = 64,
        cond_hidden: int = 512,
        cond_dropout: float = 0.1,
    ):
        super().__init__()
        if conditional and not cond_concat and cond_dim is None:
            msg = "a conditional network needs cond_concat=True or a cond_dim (or both)."
            raise ValueError(msg)
        self.n_genes, self.patch_size, self.conditional = n_genes, patch_size, conditional
        self.n_tokens = math.ceil(n_genes / patch_size)
        self.pad = self.n_tokens * patch_size - n_genes
        self.concat = conditional and cond_concat
        self.embed = PatchLinear(self.n_tokens, (2 if self.concat else 1) * patch_size, d_model)
        self.cond_encoder = None
        if conditional and cond_dim is not None:
            self.cond_encoder = nn.Sequential(
                nn.Linear(n_genes, cond_hidden),
                nn.LayerNorm(cond_hidden),
                nn.GELU(),
                nn.Dropout(cond_dropout),
                nn.Linear(cond_hidden, cond_dim),
                nn.LayerNorm(cond_dim),
                nn.Linear(cond_dim, self.n_tokens * d_model),
            )
        self.pos = nn.Parameter(torch.zeros(1, self.n_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.time_mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model)
        )
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.readout = PatchLinear(self.n_tokens, d_model, patch_size)
        self.d_model = d_model

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        return x.reshape(x.shape[0], self.n_tokens, self.patch_size)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The prediction (``v`` or ``eps``, see the class) for ``x_t`` (B, G) at timesteps ``t``
        (B,) given ``cond`` (B, G)."""
        if x_t.ndim != 2 or x_t.shape[1] != self.n_genes:
            msg = f"x_t must have shape (batch, {self.n_genes}), got {tuple(x_t.shape)}."
            raise ValueError(msg)
        tokens = self._patches(x_t)
        if self.conditional and (cond is None or cond.shape != x_t.shape):
            msg = "a condition with the same shape as x_t is required."
            raise ValueError(msg)
        if self.concat:
            tokens = torch.cat([tokens, self._patches(cond)], dim=-1)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.d_model))
        h = self.embed(tokens) + self.pos + temb[:, None, :]
        if self.cond_encoder is not None:
            h = h + self.cond_encoder(cond).reshape(x_t.shape[0], self.n_tokens, self.d_model)
        h = self.encoder(h)
        out = self.readout(h).reshape(x_t.shape[0], -1)
        return out[:, : self.n_genes]
