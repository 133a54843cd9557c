"""LightningModule wrapping the MoLE-Flow model for one task at a time.

One module lives for the whole continual run; ``start_task`` adds the task's expert and sets what
trains *before* a fresh Trainer calls ``configure_optimizers``, so the new parameters are optimised
and nothing else is. Training batches are cached backbone features (B, H, W, D), not images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from moleflow.assembly.checkpoint_files import (
    CONVERT_COMMAND,
    NOT_A_CHECKPOINT,
    READ_ERRORS,
    VERIFIED_MARK,
    CheckpointError,
    read_checkpoint,
)
from moleflow.assembly.integrity import verify
from moleflow.assembly.model_files import restore_model
from moleflow.config.flow import MoLEFlowConfig
from moleflow.config.loss import LossConfig
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.training.losses import is_unusable_loss, moleflow_loss
from moleflow.training.optim import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER, build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class BatchCounters(nn.Module):
    """[attempted, skipped] training batches per task, kept as buffers.

    Buffers travel with the state dict: the counts survive checkpoints and come back from the
    worker processes of a DDP-spawn run, where plain attributes would be lost.
    """

    def add(self, task: int) -> None:
        self.register_buffer(f"task_{task}", torch.zeros(2, dtype=torch.long))

    def get(self, task: int) -> torch.Tensor:
        return getattr(self, f"task_{task}")


class MoLEFlowLitModule(pl.LightningModule):
    """Args are plain dicts (from the config) so that ``load_from_checkpoint`` can rebuild the module.

    Args:
        flow: :class:`MoLEFlowConfig` fields.
        loss: :class:`LossConfig` fields.
        optimizer: ``model.optimizer``, a ``_target_`` entry (default: the method's AdamP).
        scheduler: ``model.scheduler``, a ``_target_`` entry (default: the method's warm-up + cosine).
        task_names: names of the tasks added so far (restored from checkpoints).
    """

    def __init__(
        self,
        flow: dict[str, Any],
        loss: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["task_names"])
        self.model = MoLEFlowModel(MoLEFlowConfig.from_dict(dict(flow)))
        self.loss_cfg = LossConfig(**(loss or {}))
        self.loss_cfg.validate()
        # built only when a task trains, so that checkpoints load wherever their optimizer class is absent
        self.optimizer_cfg = dict(optimizer or DEFAULT_OPTIMIZER)
        self.scheduler_cfg = dict(scheduler or DEFAULT_SCHEDULER)
        self.task_names: list[str] = []
        self.current_task = -1
        self.counters = BatchCounters()
        self.loss_history: dict[str, list[float]] = {}  # every training step's loss (cheap; tests compare runs)
        # (total steps, steps per epoch) of the current task when it trains on a step budget, else None
        self.step_budget: tuple[int, int] | None = None
        for name in task_names or []:
            self.add_task(name)

    # ------------------------------------------------------------------------------------ tasks
    def add_task(self, name: str) -> int:
        task = self.model.add_task()
        self._track_task(name)
        return task

    def _track_task(self, name: str) -> None:
        """The module's own per-task state (name, batch counters, loss history) of the model's next task."""
        self.counters.add(len(self.task_names))
        self.task_names.append(name)
        self.loss_history.setdefault(name, [])

    def start_task(self, name: str) -> int:
        """Add the task and make only its trainable set require grad (docs/method.md 3.4)."""
        task = self.add_task(name)
        self.current_task = task
        self.model.set_trainable(task)
        return task

    @property
    def task_name(self) -> str:
        return self.task_names[self.current_task]

    @property
    def attempted_batches(self) -> dict[str, int]:
        """Training batches each task has seen (to tell "some skipped" from "never trained")."""
        return {n: int(self.counters.get(i)[0]) for i, n in enumerate(self.task_names)}

    @property
    def skipped_batches(self) -> dict[str, int]:
        """Training batches each task skipped because the loss was NaN, infinite or exploding."""
        return {n: int(self.counters.get(i)[1]) for i, n in enumerate(self.task_names)}

    # --------------------------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        features = batch[0]  # (B, H, W, D)
        counts = self.counters.get(self.current_task)  # [attempted, skipped], a buffer
        counts[0] += 1
        nll, logdet = self.model.nll(features, self.current_task)
        loss, parts = moleflow_loss(nll, logdet, self.loss_cfg)
        if is_unusable_loss(loss, self.loss_cfg.max_loss):
            counts[1] += 1
            log.warning(
                "Task %s, epoch %d, batch %d: loss %s unusable (NaN, inf or > %g); batch skipped (%d so far).",
                self.task_name,
                self.current_epoch,
                batch_idx,
                float(loss.detach()),
                self.loss_cfg.max_loss,
                int(counts[1]),
            )
            if (
                self._trainer is not None and self.trainer.world_size > 1
            ):  # every DDP rank must back-propagate: a zero, finite loss
                return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return None
        self.loss_history[self.task_name].append(float(loss.detach()))
        key = f"task/{self.task_name}"
        self.log(f"{key}/train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log(f"{key}/nll_mean", parts["nll_mean"], on_step=False, on_epoch=True)
        self.log(f"{key}/logdet_sq", parts["logdet_sq"], on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log(f"task/{self.task_name}/skipped_batches", float(self.counters.get(self.current_task)[1]))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model.parameters(), self.optimizer_cfg)
        # tasks after the first adapt a trained shared flow: warm up; a separated flow starts fresh like task 0
        adapting = self.current_task > 0 and self.model.config.base_sharing != "separate"
        if self.step_budget is not None:  # the schedule runs per optimizer step over the task's budget
            steps, per_epoch = self.step_budget
            scheduler = build_scheduler(optimizer, self.scheduler_cfg, steps, per_epoch, adapting)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, epochs, 1, adapting)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moleflow"] = {
            "task_names": list(self.task_names),
            "loss_history": {k: list(v) for k, v in self.loss_history.items()},
        }

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: str | torch.device | None = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        *,
        expected_sha256: str | None = None,
        allow_unverified: bool = False,
    ) -> MoLEFlowLitModule:
        """Lightning's loader, through moleflow's checked reader (:func:`read_checkpoint`).

        Lightning's own would unpickle the file and build what its hyper-parameters name; a checkpoint may come
        from elsewhere, so it is read with ``weights_only=True`` and checked before anything is built.
        """
        if weights_only is False:
            msg = (
                "moleflow reads checkpoints with weights_only=True only: weights_only=False would run code stored in "
                f"the file. For a file you made yourself with an older moleflow: {CONVERT_COMMAND} OLD NEW --trust"
            )
            raise ValueError(msg)
        if hparams_file is not None or strict is False:
            msg = "hparams_file and strict=False are not supported: a moleflow checkpoint carries its own settings."
            raise ValueError(msg)
        checkpoint = read_checkpoint(
            checkpoint_path, expected_sha256=expected_sha256, allow_unverified=allow_unverified
        )
        return cls.from_checked(checkpoint, checkpoint_path, map_location or "cpu")

    @classmethod
    def from_checked(
        cls, checkpoint: dict[str, Any], path: str | Path, map_location: str | torch.device = "cpu"
    ) -> MoLEFlowLitModule:
        """The module with every task's experts and router slots, from a dict :func:`read_checkpoint` returned."""
        if not checkpoint.get(VERIFIED_MARK):
            msg = "from_checked takes what read_checkpoint returned (checked), not a raw torch.load result."
            raise ValueError(msg)
        restored = restore_model(checkpoint, path, map_location)  # the model: one implementation, shared
        try:
            module = cls(**dict(checkpoint["hyper_parameters"]))
            module.model = restored.model
            for name in restored.task_names:
                module._track_task(name)
            prefix = "counters."
            counts = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
            module.counters.load_state_dict(counts)
            module.loss_history.update(checkpoint["moleflow"].get("loss_history", {}))
            module = module.to(map_location)
        except READ_ERRORS as err:
            msg = f"Cannot load checkpoint {path} ({type(err).__name__}: {err}): {NOT_A_CHECKPOINT}"
            raise CheckpointError(msg) from err
        module.eval()
        return module

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the content hash, then recreate the tasks' experts and router slots before the state dict loads.

        moleflow's reader verifies (naming the file) before it gets here; this check covers a checkpoint dict
        that reached Lightning some other way (e.g. ``Trainer.fit(ckpt_path=...)``).
        """
        if not checkpoint.get(VERIFIED_MARK):
            verify(checkpoint, "the checkpoint given to Lightning")
        info = checkpoint.get("moleflow", {})
        for name in info.get("task_names", [])[len(self.task_names) :]:
            self.add_task(name)
        self.model.router.resize(len(self.task_names))
        self.loss_history.update(info.get("loss_history", {}))
