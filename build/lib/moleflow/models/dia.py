"""Deep invertible adapter (DIA): per-task affine coupling blocks after the shared flow (docs/method.md 3.5).

No permutation: even blocks condition on the first half and transform the second, odd blocks the
reverse, so channels keep their positions. The last layer of each MLP is zero-initialised, so a
new task's DIA starts as the identity.
"""

from __future__ import annotations

import torch
from torch import nn


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """in -> out -> out -> out with ReLU; last layer zero-initialised."""
    mlp = nn.Sequential(
        nn.Linear(in_dim, out_dim),
        nn.ReLU(),
        nn.Linear(out_dim, out_dim),
        nn.ReLU(),
        nn.Linear(out_dim, out_dim),
    )
    nn.init.zeros_(mlp[-1].weight)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class DIABlock(nn.Module):
    """One DIA coupling; ``odd`` flips which half conditions. x (N, D) -> (y (N, D), log-det (N,))."""

    def __init__(self, dim: int, odd: bool, clamp: float = 1.9) -> None:
        super().__init__()
        if dim % 2:
            msg = f"DIA blocks need an even embedding size, got {dim}."
            raise ValueError(msg)
        half = dim // 2
        self.half = half
        self.odd = odd
        self.clamp = clamp
        self.S = _mlp(half, half)
        self.T = _mlp(half, half)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[:, : self.half], x[:, self.half :]
        return (b, a) if self.odd else (a, b)  # (conditioning, transformed)

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([trans, cond] if self.odd else [cond, trans], dim=1)

    def _log_scale(self, cond: torch.Tensor) -> torch.Tensor:
        return self.clamp * torch.tanh(self.S(cond) / self.clamp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._split(x)
        s = self._log_scale(cond)
        return self._join(cond, trans * torch.exp(s) + self.T(cond)), s.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        cond, trans = self._split(y)
        s = self._log_scale(cond)
        return self._join(cond, (trans - self.T(cond)) * torch.exp(-s))


class DIA(nn.Module):
    """``num_blocks`` DIA blocks of one task, alternating the conditioning half."""

    def __init__(self, dim: int, num_blocks: int, clamp: float = 1.9) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DIABlock(dim, odd=bool(i % 2), clamp=clamp) for i in range(num_blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y
