"""Coupling subnets: map the conditioning half u1 to the raw scale and shift of a coupling block.

Shapes: N = B * H * W patches, each patch an independent sample; C1 = width of u1 (conditioning
half), C2 = width of u2 (transformed half). Output: s_raw (N, C2) and t_raw (N, C2).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moleflow.models.experts import ExpertMode, TaskExpertLinear

GridShape = tuple[int, int, int]  # (B, H, W): how the N patches lie on the feature grid


def _to_grid(x: torch.Tensor, grid: GridShape) -> torch.Tensor:
    """(N, C) patches -> (B, C, H, W) maps."""
    b, h, w = grid
    return x.reshape(b, h, w, x.shape[1]).permute(0, 3, 1, 2)  # explicit sizes: an empty batch reshapes too


def _from_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) maps -> (N, C) patches."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b * h * w, c)


class ScaleContext(nn.Module):
    """Depthwise conv over u1 on its grid, scaled by alpha = 0.2 * sigmoid(p) (zero at init).

    Gives the scale branch a view of neighbouring patches. Shared across tasks: trained in task 0.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.alpha_logit = nn.Parameter(torch.zeros(()))

    @property
    def alpha(self) -> torch.Tensor:
        return 0.2 * torch.sigmoid(self.alpha_logit)

    def forward(self, u1: torch.Tensor, grid: GridShape) -> torch.Tensor:
        """u1 (N, C1) -> context (N, C1)."""
        return self.alpha * _from_grid(self.conv(_to_grid(u1, grid)))


class MoLESubnet(nn.Module):
    """The MAIN subnet: an s-branch with scale context and a t-branch, all linears task-expert linears.

    With ``scale_context_kernel == 0`` it becomes the "w/o scale context" joint MLP
    (L1: C1 -> hidden, ReLU, L2: hidden -> 2 * C2) with no context conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        scale_context_kernel: int,
        expert_mode: ExpertMode,
        rank: int,
        alpha: float,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels

        def linear(i: int, o: int) -> TaskExpertLinear:
            return TaskExpertLinear(i, o, mode=expert_mode, rank=rank, alpha=alpha)

        self.scale_context: ScaleContext | None = None
        if scale_context_kernel > 0:
            self.scale_context = ScaleContext(in_channels, scale_context_kernel)
            self.s1 = linear(2 * in_channels, hidden)
            self.s2 = linear(hidden, out_channels)
            self.t1 = linear(in_channels, hidden)
            self.t2 = linear(hidden, out_channels)
        else:
            self.l1 = linear(in_channels, hidden)
            self.l2 = linear(hidden, 2 * out_channels)

    def expert_linears(self) -> list[TaskExpertLinear]:
        return [m for m in self.modules() if isinstance(m, TaskExpertLinear)]

    def add_expert(self, task: int) -> None:
        for layer in self.expert_linears():
            layer.add_expert(task)

    def forward(self, u1: torch.Tensor, task: int, grid: GridShape) -> tuple[torch.Tensor, torch.Tensor]:
        """u1 (N, C1) -> (s_raw (N, C2), t_raw (N, C2)); two tensors, not one concatenated copy."""
        if self.scale_context is None:
            s_raw, t_raw = self.l2(F.relu(self.l1(u1, task)), task).split(self.out_channels, dim=1)
            return s_raw, t_raw
        ctx = self.scale_context(u1, grid)
        s_raw = self.s2(F.relu(self.s1(torch.cat([u1, ctx], dim=1), task)), task)
        t_raw = self.t2(F.relu(self.t1(u1, task)), task)
        return s_raw, t_raw
