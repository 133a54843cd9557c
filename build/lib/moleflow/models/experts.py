"""Task-expert linear layers: a shared base linear plus one expert per task (docs/method.md 3.4).

An expert is either low rank (LoRA: ``h = W x + b + (alpha / r) B_t A_t x + b_t``) or full rank
(the "w/o LoRA" ablation: a per-task copy ``h = W_t x + b_t`` initialised from the base). In both
cases a new expert starts out computing exactly what the base computes, so adding a task never
changes earlier outputs and the new task starts from the shared solution.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from moleflow.config.flow import EXPERT_MODES, MoLEFlowConfig

ExpertMode = Literal["lora", "full", "none"]


class LoRAExpert(nn.Module):
    """Low-rank update ``scale * B A x + bias`` of one task; zero at initialisation (B = 0, bias = 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, rank))  # (out, r)
        self.bias = nn.Parameter(torch.zeros(out_features))  # (out,)
        nn.init.xavier_uniform_(self.A)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Expert contribution for x (N, in) -> (N, out)."""
        return F.linear(F.linear(x, self.A), self.B) * self.scale + self.bias

    def merged_weight(self, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Base weight and bias with this expert folded in (for inference without the extra matmuls)."""
        weight = base.weight + self.scale * (self.B @ self.A)
        bias = self.bias if base.bias is None else base.bias + self.bias
        return weight, bias


class FullRankExpert(nn.Module):
    """Full per-task copy of the linear layer (the "w/o LoRA" ablation), initialised from the base."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(
            base.bias.detach().clone() if base.bias is not None else torch.zeros(base.out_features)
        )

    def merged_weight(self, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.bias


class TaskExpertLinear(nn.Module):
    """Linear layer with a shared base and a dict of per-task experts keyed by task id.

    Args:
        in_features: input width.
        out_features: output width.
        mode: ``"lora"`` (low-rank experts), ``"full"`` (full-rank copies) or ``"none"`` (base only).
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: ExpertMode = "lora",
        rank: int = MoLEFlowConfig.lora_rank,
        alpha: float = MoLEFlowConfig.lora_alpha,
    ) -> None:
        super().__init__()
        if mode not in EXPERT_MODES:
            msg = f"Unknown expert mode {mode!r}; choose one of {EXPERT_MODES} (model.experts.mode)."
            raise ValueError(msg)
        if mode == "lora" and rank < 1:
            msg = f"lora_rank must be >= 1, got {rank}."
            raise ValueError(msg)
        self.base = nn.Linear(in_features, out_features)
        self.mode = mode
        self.rank = rank
        self.alpha = alpha
        self.experts = nn.ModuleDict()
        # inference only: task -> (weight, bias) with the expert folded in (see MoLEFlowModel.merged_experts)
        self.merged: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def add_expert(self, task: int) -> None:
        """Create task's expert (no-op in mode "none"). Its output equals the base's at creation."""
        key = str(task)
        if self.mode == "none" or key in self.experts:
            return
        if self.mode == "lora":
            self.experts[key] = LoRAExpert(self.base.in_features, self.base.out_features, self.rank, self.alpha)
        else:
            self.experts[key] = FullRankExpert(self.base)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """x (N, in) -> (N, out), through the base and task's expert (if it has one)."""
        if self.merged is not None:
            if task not in self.merged:
                self.merged[task] = tuple(t.detach() for t in self.merged_weight(task))
            weight, bias = self.merged[task]
            return F.linear(x, weight, bias)
        expert = self.experts[str(task)] if str(task) in self.experts else None
        if expert is None:
            return self.base(x)
        if isinstance(expert, FullRankExpert):
            return F.linear(x, expert.weight, expert.bias)
        if self.base.weight.requires_grad and torch.is_grad_enabled():
            # The base trains with the expert (task 0): fold B A into W first. The weight gradient
            # (N x in x out) is paid anyway, so this saves the rank-r matmuls and two passes over (N, out).
            weight, bias = expert.merged_weight(self.base)
            return F.linear(x, weight, bias)
        return self.base(x) + expert.delta(x)

    def merged_weight(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias that compute the same function as ``forward(x, task)`` with one matmul."""
        key = str(task)
        if key not in self.experts:
            return self.base.weight, self.base.bias
        return self.experts[key].merged_weight(self.base)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, rank={self.rank}, alpha={self.alpha}, tasks={list(self.experts.keys())}"


def expert_parameter_count(in_features: int, out_features: int, mode: ExpertMode, rank: int) -> int:
    """Number of parameters one task's expert adds to a linear layer (used by reports and tests)."""
    if mode == "none":
        return 0
    if mode == "full":
        return in_features * out_features + out_features
    return rank * (in_features + out_features) + out_features


__all__ = [
    "ExpertMode",
    "FullRankExpert",
    "LoRAExpert",
    "TaskExpertLinear",
    "expert_parameter_count",
]
