"""LightningModule wrapping the MoLE-Flow model for one task at a time.

One module lives for the whole continual run; ``start_task`` adds the task's expert and sets what
trains *before* a fresh Trainer calls ``configure_optimizers``, so the new parameters are optimised
and nothing else is. Training batches are cached backbone features (B, H, W, D), not images.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from moleflow.models.moleflow import MoLEFlowConfig, MoLEFlowModel
from moleflow.training.losses import LossConfig, is_unusable_loss, moleflow_loss
from moleflow.training.optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class MoLEFlowLitModule(pl.LightningModule):
    """Args are plain dicts (from the config) so that ``load_from_checkpoint`` can rebuild the module.

    Args:
        flow: :class:`MoLEFlowConfig` fields.
        loss: :class:`LossConfig` fields.
        optimizer: :class:`OptimConfig` fields.
        task_names: names of the tasks added so far (restored from checkpoints).
    """

    def __init__(
        self,
        flow: dict[str, Any],
        loss: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task_names"])
        self.model = MoLEFlowModel(MoLEFlowConfig.from_dict(dict(flow)))
        self.loss_cfg = LossConfig(**(loss or {}))
        self.loss_cfg.validate()
        self.optim_cfg = OptimConfig(**(optimizer or {}))
        self.task_names: list[str] = []
        self.current_task = -1
        self.skipped_batches: dict[str, int] = {}
        self.attempted_batches: dict[str, int] = {}  # to tell "some batches skipped" from "task never trained"
        self.loss_history: dict[str, list[float]] = {}  # every training step's loss (cheap; tests compare runs)
        for name in task_names or []:
            self.add_task(name)

    # ------------------------------------------------------------------------------------ tasks
    def add_task(self, name: str) -> int:
        task = self.model.add_task()
        self.task_names.append(name)
        self.skipped_batches.setdefault(name, 0)
        self.attempted_batches.setdefault(name, 0)
        self.loss_history.setdefault(name, [])
        return task

    def start_task(self, name: str) -> int:
        """Add the task and make only its trainable set require grad (method.md 3.4)."""
        task = self.add_task(name)
        self.current_task = task
        self.model.set_trainable(task)
        return task

    @property
    def task_name(self) -> str:
        return self.task_names[self.current_task]

    # --------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        features = batch[0]  # (B, H, W, D)
        self.attempted_batches[self.task_name] += 1
        nll, logdet = self.model.nll(features, self.current_task)
        loss, parts = moleflow_loss(nll, logdet, self.loss_cfg)
        if is_unusable_loss(loss, self.loss_cfg.max_loss):
            self.skipped_batches[self.task_name] += 1
            log.warning(
                "Task %s, epoch %d, batch %d: loss %s unusable (NaN, inf or > %g); batch skipped (%d so far).",
                self.task_name,
                self.current_epoch,
                batch_idx,
                float(loss.detach()),
                self.loss_cfg.max_loss,
                self.skipped_batches[self.task_name],
            )
            return None
        self.loss_history[self.task_name].append(float(loss.detach()))
        key = f"task/{self.task_name}"
        self.log(f"{key}/train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log(f"{key}/nll_mean", parts["nll_mean"], on_step=False, on_epoch=True)
        self.log(f"{key}/logdet_sq", parts["logdet_sq"], on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log(f"task/{self.task_name}/skipped_batches", float(self.skipped_batches[self.task_name]))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model.parameters(), self.optim_cfg)
        # tasks after the first adapt a trained shared flow: warm up; a separated flow starts fresh like task 0
        adapting = self.current_task > 0 and self.model.config.base_sharing != "separate"
        warmup = self.optim_cfg.warmup_epochs if adapting else 0
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = build_scheduler(optimizer, epochs, warmup, self.optim_cfg.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moleflow"] = {
            "task_names": list(self.task_names),
            "skipped_batches": dict(self.skipped_batches),
            "attempted_batches": dict(self.attempted_batches),
            "loss_history": {k: list(v) for k, v in self.loss_history.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Recreate the tasks' experts and router slots before Lightning loads the state dict."""
        info = checkpoint.get("moleflow", {})
        for name in info.get("task_names", [])[len(self.task_names) :]:
            self.add_task(name)
        self.model.router.resize(len(self.task_names))
        self.skipped_batches.update(info.get("skipped_batches", {}))
        self.attempted_batches.update(info.get("attempted_batches", {}))
        self.loss_history.update(info.get("loss_history", {}))
