"""Spatial context mixer (docs/method.md 3.2): a gated depthwise conv shared by all tasks.

out = (1 - g) x + g * conv(x), g = sigmoid(theta). Mixing each patch with its neighbours before the
flow lets a patch's likelihood depend on its surroundings. Trained in task 0 only.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialContextMixer(nn.Module):
    """x (B, H, W, D) -> (B, H, W, D)."""

    def __init__(self, dim: int, kernel_size: int = 3, gate_init: float = 0.5) -> None:
        super().__init__()
        if kernel_size < 1:
            msg = f"spatial_context_kernel must be >= 1 to build a mixer (0 disables it), got {kernel_size}."
            raise ValueError(msg)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.constant_(self.conv.weight, 1.0 / kernel_size**2)
        nn.init.zeros_(self.conv.bias)
        self.theta = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.theta)
        mixed = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return (1 - g) * x + g * mixed
