"""Per-task whitening input adapter (docs/method.md 3.1).

y = gamma_t * LN(x) + beta_t with an affine-free LayerNorm over the channels of each patch, and a
bounded gain and offset: gamma_t = 0.5 + 1.5 * sigmoid(g_t) in [0.5, 2], beta_t = 2 * tanh(b_t) in [-2, 2].
Bounding them keeps a new task's adapter from drifting into degenerate scalings.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class WhiteningAdapter(nn.Module):
    """x (..., D) -> y (..., D). ``gate_init`` = -0.7 gives gamma ~ 1.0 (task 0); 0.0 gives gamma = 1.25."""

    def __init__(self, dim: int, gate_init: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.g = nn.Parameter(torch.full((dim,), float(gate_init)))
        self.b = nn.Parameter(torch.zeros(dim))

    @property
    def gamma(self) -> torch.Tensor:
        return 0.5 + 1.5 * torch.sigmoid(self.g)

    @property
    def beta(self) -> torch.Tensor:
        return 2.0 * torch.tanh(self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * F.layer_norm(x, (self.dim,), eps=self.eps) + self.beta
