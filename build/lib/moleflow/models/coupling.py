"""Affine coupling blocks and the coupling flow of MoLE subnets (docs/method.md 3.3).

Every patch is an independent sample: x (N, D) with N = B * H * W; the grid shape (B, H, W) is
passed explicitly so that the scale-context conv can see neighbouring patches.
"""

from __future__ import annotations

import torch
from torch import nn

from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.experts import ExpertMode
from moleflow.models.subnet import GridShape, MoLESubnet


def _affine(
    u2: torch.Tensor, s_raw: torch.Tensor, t_raw: torch.Tensor, subnet_scale: float, clamp: float
) -> tuple[torch.Tensor, ...]:
    """y2 = u2 * exp(s) + subnet_scale * t_raw with s = clamp * tanh(subnet_scale * s_raw); all (N, C2).

    Returns (y2, log-det (N,), tanh term, exp(s)); the last two are what the backward needs. Written
    with in-place steps on fresh buffers: each line is one pass over an (N, C2) tensor.
    """
    th = (s_raw * subnet_scale).tanh_()
    s = th * clamp
    logdet = s.sum(dim=1)
    e = s.exp_()  # s is not needed any more: its buffer becomes exp(s)
    y2 = u2 * e
    y2.add_(t_raw, alpha=subnet_scale)
    return y2, logdet, th, e


_FLOW = MoLEFlowConfig  # defaults are the flow settings' own (one place)


class _AffineCoupling(torch.autograd.Function):
    """:func:`_affine` with a hand-written backward.

    Why: autograd's generic graph of these eight element-wise ops makes about fifteen passes over
    (N, C2) tensors in the backward, plus zero fills for the slices; this backward makes five.
    """

    @staticmethod
    def forward(ctx, u2, s_raw, t_raw, subnet_scale: float, clamp: float):  # noqa: ANN001, ANN205
        y2, logdet, th, e = _affine(u2, s_raw, t_raw, subnet_scale, clamp)
        ctx.save_for_backward(u2, th, e)
        ctx.constants = (subnet_scale, clamp, s_raw.dtype, t_raw.dtype)
        return y2, logdet

    @staticmethod
    def backward(ctx, g_y2, g_logdet):  # noqa: ANN001, ANN205
        u2, th, e = ctx.saved_tensors
        subnet_scale, clamp, s_dtype, t_dtype = ctx.constants
        g_u2 = g_y2 * e  # d y2 / d u2 = exp(s)
        g_s = torch.addcmul(g_logdet.unsqueeze(1), g_u2, u2)  # d/ds: u2 exp(s) from y2, 1 from the log-det
        k = clamp * subnet_scale  # ds / ds_raw = k (1 - tanh^2)
        g_s.mul_(torch.addcmul(th.new_tensor(k), th, th, value=-k))
        g_t = g_y2 * subnet_scale
        return g_u2, g_s.to(s_dtype), g_t.to(t_dtype), None, None


def _concat_permute(u1: torch.Tensor, y2: torch.Tensor, dest1: torch.Tensor, dest2: torch.Tensor) -> torch.Tensor:
    """cat([u1, y2], 1)[:, perm], written straight into place: column k of u1 goes to dest1[k], of y2 to dest2[k]."""
    out = u1.new_empty(u1.shape[0], u1.shape[1] + y2.shape[1], dtype=torch.promote_types(u1.dtype, y2.dtype))
    out.index_copy_(1, dest1, u1.to(out.dtype))
    out.index_copy_(1, dest2, y2.to(out.dtype))
    return out


class _ConcatPermute(torch.autograd.Function):
    """:func:`_concat_permute` with gathers as its backward.

    Why: ``cat`` then ``y[:, perm]`` copies twice forward and scatters with accumulation backward;
    this is one copy each way (about 3x cheaper over (N, D) on a CPU).
    """

    @staticmethod
    def forward(ctx, u1, y2, dest1, dest2):  # noqa: ANN001, ANN205
        ctx.save_for_backward(dest1, dest2)
        ctx.dtypes = (u1.dtype, y2.dtype)
        return _concat_permute(u1, y2, dest1, dest2)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        dest1, dest2 = ctx.saved_tensors
        n = g.shape[0]
        g1 = g.gather(1, dest1.expand(n, -1)).to(ctx.dtypes[0])
        g2 = g.gather(1, dest2.expand(n, -1)).to(ctx.dtypes[1])
        return g1, g2, None, None


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
        clamp: float = _FLOW.clamp,
        subnet_scale: float = _FLOW.subnet_scale,
        scale_context_kernel: int = _FLOW.scale_context_kernel,
        expert_mode: ExpertMode = "lora",
        rank: int = _FLOW.lora_rank,
        lora_alpha: float = _FLOW.lora_alpha,
        permutation_seed: int = _FLOW.permutation_seed,
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
        # where the columns of u1 and u2' land in the permuted output (derived from perm: not saved)
        self.register_buffer("dest1", self.inv_perm[: self.c1].clone(), persistent=False)
        self.register_buffer("dest2", self.inv_perm[self.c1 :].clone(), persistent=False)

    def forward(self, x: torch.Tensor, task: int, grid: GridShape) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (y (N, D), log|det J| per patch (N,))."""
        u1, u2 = x.split([self.c1, self.c2], dim=1)
        s_raw, t_raw = self.subnet(u1, task, grid)
        if torch.is_grad_enabled() and (x.requires_grad or s_raw.requires_grad):
            y2, logdet = _AffineCoupling.apply(u2, s_raw, t_raw, self.subnet_scale, self.clamp)
            return _ConcatPermute.apply(u1, y2, self.dest1, self.dest2), logdet
        y2, logdet, _, _ = _affine(u2, s_raw, t_raw, self.subnet_scale, self.clamp)
        return _concat_permute(u1, y2, self.dest1, self.dest2), logdet

    def inverse(self, y: torch.Tensor, task: int, grid: GridShape) -> torch.Tensor:
        """Exact inverse of forward: y (N, D) -> x (N, D)."""
        u1, v2 = y[:, self.inv_perm].split([self.c1, self.c2], dim=1)
        s_raw, t_raw = self.subnet(u1, task, grid)
        s = self.clamp * torch.tanh(self.subnet_scale * s_raw)
        return torch.cat([u1, (v2 - self.subnet_scale * t_raw) * torch.exp(-s)], dim=1)


class CouplingFlow(nn.Module):
    """A stack of ``num_blocks`` coupling blocks; zero blocks is the identity with zero log-det."""

    def __init__(
        self, num_blocks: int, dim: int, permutation_seed: int = _FLOW.permutation_seed, **block_kwargs
    ) -> None:
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
