"""Optimizer and learning-rate schedule (docs/method.md 5).

Task 0: cosine decay per epoch from lr to ``min_lr_ratio * lr``. Later tasks: ``warmup_epochs``
linear warm-up epochs (0.5 lr, then lr for 2 epochs) before the same cosine over the rest.

With a budget in optimizer steps (``training.steps``) the same shape runs per step instead: the cosine
spans the task's steps and the warm-up lasts ``warmup_epochs`` epochs' worth of steps. An epoch of a
200-image task is 12 steps at batch 16, so per-epoch steps would be far too coarse for a step budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from timm.optim import AdamP


@dataclass
class OptimConfig:
    name: str = "adamp"
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 2
    min_lr_ratio: float = 0.01


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        msg = "No trainable parameters for this task: check the ablation (e.g. no adapter and no experts)."
        raise ValueError(msg)
    name = cfg.name.lower()
    if name == "adamp":
        return AdamP(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    msg = f"Unknown optimizer {cfg.name!r} (model.optimizer.name); choose adamp or adamw."
    raise ValueError(msg)


def lr_factor(epoch: int, total_epochs: int, warmup_epochs: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``epoch`` (0-based) of a task with ``total_epochs`` epochs."""
    warmup = min(warmup_epochs, total_epochs)
    if epoch < warmup:
        return (epoch + 1) / warmup
    cosine_epochs = total_epochs - warmup
    progress = (epoch - warmup) / max(1, cosine_epochs - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR implementing :func:`lr_factor` over ``total`` units (epochs, or steps with a step budget)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, total, warmup, min_ratio))
