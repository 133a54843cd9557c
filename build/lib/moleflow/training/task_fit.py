"""Training one task on its cached features: a fresh Lightning Trainer, its length, and how its loss ended."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from moleflow.config.schema import JobConfig, TrainingConfig
from moleflow.training.trainer_parts import build_trainer

log = logging.getLogger(__name__)


class _ReextractEachEpoch(pl.Callback):
    """Replace the training features before every epoch after the first (``training.feature_cache=none``)."""

    def __init__(self, dataset: TensorDataset, extract: Callable[[], torch.Tensor]) -> None:
        self.dataset = dataset
        self.extract = extract

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self.dataset.tensors = (self.extract(),)


def fit_task(
    cfg: JobConfig,
    module: Any,
    features: torch.Tensor,
    t: int,
    name: str,
    loggers: list,
    output_dir: Path,
    refresh: Callable[[], torch.Tensor] | None,
) -> None:
    """Train task t on its features (N, H, W, D) with a fresh Trainer: shuffled, drop_last, seeded."""
    batch = cfg.data["train_batch_size"]
    devices = cfg.trainer.get("devices", 1)
    if "ddp" in str(cfg.trainer.get("strategy", "")) and isinstance(devices, int) and devices > 1:
        batch = max(1, batch // devices)  # per-device batch: the global batch stays data.train_batch_size
    if len(features) < batch:
        log.warning("Task %s has %d training images < batch %d: one smaller batch.", name, len(features), batch)
    dataset = TensorDataset(features)
    loader = DataLoader(
        dataset,
        batch_size=min(batch, len(features)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed + t),
        pin_memory=torch.cuda.is_available() and bool(cfg.data.get("pin_memory", False)),
    )
    callbacks = [_ReextractEachEpoch(dataset, refresh)] if refresh is not None else []
    epochs, steps = task_length(cfg.training, len(loader))
    module.step_budget = (steps, len(loader)) if steps > 0 else None
    trainer = build_trainer(cfg.trainer, cfg.callbacks, epochs, loggers, output_dir, t == 0, callbacks, max_steps=steps)
    module.train()
    trainer.fit(module, train_dataloaders=loader)
    if trainer.interrupted:  # Lightning swallows Ctrl-C; an unfinished task must not be saved as done
        msg = f"Training of task {name} was interrupted; rerun with resume=true to continue."
        raise KeyboardInterrupt(msg)


def task_length(training_cfg: TrainingConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, optimizer steps) of one task: ``training.epochs``, or ``training.steps`` when set.

    A step budget gives every task the same number of updates whatever its size (a 200-image task has
    12 steps per epoch at batch 16: 8 epochs are 96 steps); it overrides the epochs (-1 steps = no limit).
    """
    steps = training_cfg.steps
    if steps is None:
        return training_cfg.epochs, -1
    return math.ceil(steps / max(1, steps_per_epoch)), steps


def loss_curve_summary(losses: list[float]) -> dict[str, Any]:
    """How a task's training loss ended: first and last values and whether the curve had flattened.

    ``last_fifth_drop`` is the relative decrease of the mean loss from the fourth to the last fifth of the
    steps; below 1 % the loss is taken as having reached its plateau (more steps would change little).
    """
    n = len(losses)
    if n < 10:
        return {"steps": n, "first": losses[0] if losses else None, "last": losses[-1] if losses else None}
    fifth = n // 5
    last, previous = losses[-fifth:], losses[-2 * fifth : -fifth]
    last_mean, prev_mean = sum(last) / len(last), sum(previous) / len(previous)
    drop = (prev_mean - last_mean) / abs(prev_mean) if prev_mean else 0.0
    return {
        "steps": n,
        "first": losses[0],
        "last_fifth_mean": last_mean,
        "fourth_fifth_mean": prev_mean,
        "last_fifth_drop": drop,
        "plateau": bool(drop < 0.01),
    }
