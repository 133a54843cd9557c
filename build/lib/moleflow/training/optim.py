"""Optimizer and learning-rate schedule, built from ``_target_`` config entries (docs/method.md 5).

``model.optimizer`` (``conf/model/optimizer/*.yaml``) is a partial optimizer class: Hydra's
``instantiate`` gives a factory that receives the task's trainable parameters. A new optimizer is one
YAML file naming its class (``_target_``) and its arguments.

``model.scheduler`` (``conf/model/scheduler/*.yaml``) is a partial schedule factory called as
``factory(optimizer, total=..., units_per_epoch=..., warm_up=...)``. The method's schedule
(:func:`warmup_cosine`): task 0 decays by a cosine from lr to ``min_lr_ratio * lr``; later tasks first
warm up for ``warmup_epochs`` epochs (0.5 lr, then lr for 2 epochs). With a budget in optimizer steps
(``training.steps``) the same shape runs per step: the cosine spans the task's steps and the warm-up
lasts ``warmup_epochs`` epochs' worth of steps (an epoch of a 200-image task is 12 steps at batch 16,
far too coarse a unit for a step budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from moleflow.config.instantiation import build_entry

# The method's settings (conf/model/optimizer/adamp.yaml, conf/model/scheduler/warmup_cosine.yaml),
# for callers without a Hydra config (benchmarks, notebooks).
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "_target_": "timm.optim.AdamP",
    "_partial_": True,
    "lr": 3e-4,
    "weight_decay": 0.01,
}
DEFAULT_SCHEDULER: dict[str, Any] = {
    "_target_": "moleflow.training.optim.warmup_cosine",
    "_partial_": True,
    "warmup_epochs": 2,
    "min_lr_ratio": 0.01,
    "adapt_lr_scale": 1.0,
}


def _factory(cfg: dict[str, Any], key: str) -> Callable[..., Any]:
    """A partial from a ``_target_`` entry; a bad entry names the config key and what it needs."""
    if "_target_" not in cfg:
        msg = (
            f"{key} needs a _target_ (a class or function to build, e.g. {DEFAULT_OPTIMIZER['_target_']}); "
            f"got keys {sorted(cfg)}. Choose a file with {key.replace('.', '/')}=NAME (conf/{key.replace('.', '/')}/)."
        )
        raise ValueError(msg)
    return build_entry({**cfg, "_partial_": True}, key)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that train (``requires_grad``)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        msg = "No trainable parameters for this task: check the ablation (e.g. no adapter and no experts)."
        raise ValueError(msg)
    optimizer = _factory(cfg, "model.optimizer")(trainable)
    if not isinstance(optimizer, torch.optim.Optimizer):
        msg = f"model.optimizer._target_={cfg['_target_']!r} built a {type(optimizer).__name__}, not an optimizer."
        raise ValueError(msg)
    return optimizer


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: dict[str, Any], total: int, units_per_epoch: int, warm_up: bool
) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule over ``total`` units (epochs, or optimizer steps with a step budget)."""
    return _factory(cfg, "model.scheduler")(optimizer, total=total, units_per_epoch=units_per_epoch, warm_up=warm_up)


def lr_factor(epoch: int, total_epochs: int, warmup_epochs: int, min_ratio: float) -> float:
    """Multiplier of the base lr at ``epoch`` (0-based) of a task with ``total_epochs`` epochs."""
    warmup = min(warmup_epochs, total_epochs)
    if epoch < warmup:
        return (epoch + 1) / warmup
    cosine_epochs = total_epochs - warmup
    progress = (epoch - warmup) / max(1, cosine_epochs - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total: int,
    units_per_epoch: int,
    warm_up: bool,
    warmup_epochs: int = 2,
    min_lr_ratio: float = 0.01,
    adapt_lr_scale: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The method's schedule (:func:`lr_factor`) over ``total`` units; warm-up only when ``warm_up``.

    ``warm_up`` is true for tasks after the first that adapt a trained shared flow; a first task (or a
    separated flow, which starts fresh) has none. ``adapt_lr_scale`` multiplies the whole schedule of
    those adapting tasks only (1 = the method): their experts start from zero on a frozen base, so they
    may want a larger step than the base did, without changing how task 0 trains.
    """
    if not adapt_lr_scale > 0:
        msg = f"model.scheduler.adapt_lr_scale must be > 0 (1 = the method's schedule), got {adapt_lr_scale}"
        raise ValueError(msg)
    warmup = warmup_epochs * units_per_epoch if warm_up else 0
    scale = adapt_lr_scale if warm_up else 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: scale * lr_factor(e, total, warmup, min_lr_ratio))
