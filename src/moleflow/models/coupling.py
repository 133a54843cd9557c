"""Affine coupling blocks and the coupling flow of MoLE subnets (method.md 3.3).

Every patch is an independent sample: x (N, D) with N = B * H * W; the grid shape (B, H, W) is
passed explicitly so that the scale-context conv can see neighbouring patches.
"""

from __future__ import annotations

import torch
from torch import nn

from moleflow.models.experts import ExpertMode
from moleflow.models.subnet import GridShape, MoLESubnet


class CouplingBlock(nn.Module):
    """AllInOne-style affine coupling: u2' = u2 * exp(s) + t with (s, t) from u1, then a fixed permutation.

    Args:
        dim: channel count D (even).
        hidden: subnet hidden width.
        clamp: s = clamp * tanh(a_s) bounds the per-channel log-scale.
        subnet_scale: a = subnet_scale * subnet(u1) keeps the block near identity at the start.
        scale_context_kernel: kernel of the subnet's scale context (0 = joint MLP, no context).
        expert_mode, rank, lora_alpha: task-expert linears of the subnet.
        permutation_seed: seed of the fixed channel permutation (not trained).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        clamp: float = 1.9,
        subnet_scale: float = 0.1,
        scale_context_kernel: int = 5,
        expert_mode: ExpertMode = "lora",
        rank: int = 64,
        lora_alpha: float = 1.0,
        permutation_seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.c1 = dim // 2  # conditioning half
        self.c2 = dim - self.c1  # transformed half
        self.clamp = clamp
        self.subnet_scale = subnet_scale
        self.subnet = MoLESubnet(self.c1, self.c2, hidden, scale_context_kernel, expert_mode, rank, lora_alpha)
        gen = torch.Generator().manual_seed(permutation_seed)
        perm = torch.randperm(dim, generator=gen)
        self.register_buffer("perm", perm, persistent=True)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=True)

    def _scale_shift(self, u1: torch.Tensor, task: int, grid: GridShape) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.subnet_scale * self.subnet(u1, task, grid)  # (N, 2 * c2)
        s = self.clamp * torch.tanh(a[:, : self.c2])
        t = a[:, self.c2 :]
        return s, t

    def forward(self, x: torch.Tensor, task: int, grid: GridShape) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (y (N, D), log|det J| per patch (N,))."""
        u1, u2 = x[:, : self.c1], x[:, self.c1 :]
        s, t = self._scale_shift(u1, task, grid)
        y = torch.cat([u1, u2 * torch.exp(s) + t], dim=1)
        return y[:, self.perm], s.sum(dim=1)

    def inverse(self, y: torch.Tensor, task: int, grid: GridShape) -> torch.Tensor:
        """Exact inverse of forward: y (N, D) -> x (N, D)."""
        y = y[:, self.inv_perm]
        u1, v2 = y[:, : self.c1], y[:, self.c1 :]
        s, t = self._scale_shift(u1, task, grid)
        return torch.cat([u1, (v2 - t) * torch.exp(-s)], dim=1)


class CouplingFlow(nn.Module):
    """A stack of ``num_blocks`` coupling blocks; zero blocks is the identity with zero log-det."""

    def __init__(self, num_blocks: int, dim: int, permutation_seed: int = 0, **block_kwargs) -> None:
        super().__init__()
        if num_blocks < 0:
            msg = f"ncl (number of coupling blocks) must be >= 0, got {num_blocks}."
            raise ValueError(msg)
        self.blocks = nn.ModuleList(
            CouplingBlock(dim, permutation_seed=permutation_seed + i, **block_kwargs) for i in range(num_blocks)
        )

    def add_expert(self, task: int) -> None:
        for block in self.blocks:
            block.subnet.add_expert(task)

    def forward(self, x: torch.Tensor, task: int, grid: GridShape) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (z (N, D), log-det (N,))."""
        logdet = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, ld = block(x, task, grid)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, task: int, grid: GridShape) -> torch.Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, task, grid)
        return z
