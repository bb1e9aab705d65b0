"""The cnnImpute network as one batched ``nn.Module`` over all subset models (tensors only)."""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupedCNN(nn.Module):
    """``n_groups`` independent cnnImpute networks evaluated at once.

    Each group is the network of Zhang et al. (2024): input (n_inputs x 1) -> Conv1d(16, k=3) + ReLU
    + MaxPool(2) + BatchNorm -> Conv1d(16, k=3) + ReLU + MaxPool(2) + BatchNorm -> Dropout(0.3) ->
    Dense(1024) + ReLU -> Dense(n_outputs). The groups share nothing: the convolutions are grouped
    (``groups=n_groups``), batch norm is per channel (hence per group), and the dense layers are
    batched matmuls with one weight matrix per group. Same maths as a Python loop over separate
    models, in one kernel launch per layer.

    Parameters
    ----------
    n_groups
        Number of subset networks.
    n_inputs
        Input length (inputs of smaller groups are zero-padded to this length).
    n_outputs
        Targets per group (smaller groups are padded; padded outputs are masked out of the loss).
    n_filters, kernel_size, n_hidden, dropout
        Architecture (paper: 16, 3, 1024, 0.3).
    pooling
        End of the second block: ``"max"`` (the paper's text: max-pool(2), batch norm, flatten to
        ``n_filters * length`` features) or ``"average"`` (the original cnnImpute code: global
        average pooling over the input positions, then batch norm, ``n_filters`` features), which
        makes the first dense layer ``length`` times smaller.

    Notes
    -----
    The paper's output layer has a ReLU; here it is linear (a ReLU output unit that dies never
    recovers under a masked loss) and predictions are clipped at 0 by the caller.
    Dropout draws its masks from :attr:`generator` when set, so training is reproducible without
    touching torch's global RNG.
    """

    def __init__(
        self,
        n_groups: int,
        n_inputs: int,
        n_outputs: int,
        *,
        n_filters: int = 16,
        kernel_size: int = 3,
        n_hidden: int = 1024,
        dropout: float = 0.3,
        pooling: str = "max",
    ):
        super().__init__()
        if pooling not in ("max", "average"):
            msg = f"pooling must be 'max' or 'average', got {pooling!r}."
            raise ValueError(msg)
        self.pooling = pooling
        g, f, k = n_groups, n_filters, kernel_size
        self.n_groups, self.n_inputs, self.n_outputs = n_groups, n_inputs, n_outputs
        self.dropout = dropout
        self.generator: torch.Generator | None = None
        length = n_inputs
        for _ in range(2):
            length = (length - k + 1) // 2
        if length < 1:
            msg = f"n_inputs={n_inputs} is too short for two conv(k={k}) + maxpool(2) blocks."
            raise ValueError(msg)
        self.n_features = f * length if pooling == "max" else f
        self.conv1 = nn.Conv1d(g, g * f, k, groups=g)
        self.bn1 = nn.BatchNorm1d(g * f)
        self.conv2 = nn.Conv1d(g * f, g * f, k, groups=g)
        self.bn2 = nn.BatchNorm1d(g * f)
        self.pool = nn.MaxPool1d(2)
        self.w1 = nn.Parameter(torch.empty(g, self.n_features, n_hidden))
        self.b1 = nn.Parameter(torch.zeros(g, 1, n_hidden))
        self.w2 = nn.Parameter(torch.empty(g, n_hidden, n_outputs))
        self.b2 = nn.Parameter(torch.zeros(g, 1, n_outputs))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Initialise all weights from ``generator`` (Keras defaults: Glorot uniform convolutions,
        Glorot normal dense layers, zero biases)."""
        for conv in (self.conv1, self.conv2):
            fan_in = conv.in_channels // conv.groups * conv.kernel_size[0]
            fan_out = conv.out_channels // conv.groups * conv.kernel_size[0]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            conv.weight.copy_(
                torch.rand(conv.weight.shape, generator=generator) * 2 * bound - bound
            )
            conv.bias.zero_()
        for w in (self.w1, self.w2):
            std = math.sqrt(2.0 / (w.shape[1] + w.shape[2]))
            w.copy_(torch.randn(w.shape, generator=generator) * std)
        self.b1.zero_()
        self.b2.zero_()
        for bn in (self.bn1, self.bn2):
            bn.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, n_groups, n_inputs) -> (batch, n_groups, n_outputs)."""
        b = x.shape[0]
        # max-pool and ReLU commute (ReLU is monotone): pooling first halves the ReLU's work
        h = self.bn1(torch.relu_(self.pool(self.conv1(x))))
        if self.pooling == "max":
            h = self.bn2(torch.relu_(self.pool(self.conv2(h))))
        else:  # global average pooling: (b, g*f, L) -> (b, g*f)
            h = self.bn2(torch.relu_(self.conv2(h)).mean(-1))
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = torch.rand(h.shape, generator=self.generator, device=h.device) < keep
            h = h * mask / keep
        # (b, g*f, L) -> (g, b, f*L): channel index = group * f + filter
        h = h.reshape(b, self.n_groups, self.n_features).transpose(0, 1)
        h = torch.relu(torch.baddbmm(self.b1, h, self.w1))
        out = torch.baddbmm(self.b2, h, self.w2)
        return out.transpose(0, 1)
