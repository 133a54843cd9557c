"""The Lightning parts of a run, built from its settings: the module, and a fresh Trainer per task with its
loggers and callbacks (each a ``_target_`` entry of the user's config, built with Hydra's ``instantiate``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary
from omegaconf import DictConfig

from moleflow.config.instantiation import build_entry, to_dict
from moleflow.config.schema import ModelConfig
from moleflow.training.lightning_module import MoLEFlowLitModule

log = logging.getLogger(__name__)


def build_module(model_cfg: ModelConfig | DictConfig) -> MoLEFlowLitModule:
    """The training module of ``model`` settings (flow, loss, optimizer, schedule), with no task yet."""
    return MoLEFlowLitModule(
        flow=to_dict(model_cfg.flow),
        loss=to_dict(model_cfg.loss),
        optimizer=to_dict(model_cfg.optimizer),
        scheduler=to_dict(model_cfg.scheduler),
    )


def _instantiate_entries(group_cfg: dict[str, Any] | DictConfig | None, key: str) -> list[tuple[str, Any]]:
    """(name, object) for every ``_target_`` entry of a config group; null entries are switched off."""
    built = []
    for name, conf in to_dict(group_cfg).items():
        if conf is None:
            continue
        if not isinstance(conf, dict) or "_target_" not in conf:
            msg = f"{key}.{name} must be a mapping with a _target_ (or null to switch it off), got {conf!r}."
            raise ValueError(msg)
        log.info("%s %s: %s", key, name, conf["_target_"])
        built.append((name, build_entry(conf, f"{key}.{name}")))
    return built


def build_loggers(logger_cfg: dict[str, Any] | DictConfig | None) -> list:
    """Instantiate every logger under ``logger`` (wandb, csv; ``logger=none`` gives none)."""
    return [obj for _, obj in _instantiate_entries(logger_cfg, "logger")]


def build_callbacks(callbacks_cfg: dict[str, Any] | DictConfig | None, first_task: bool) -> list[pl.Callback]:
    """Instantiate every callback under ``callbacks``; a model summary only for the first task."""
    callbacks = [obj for _, obj in _instantiate_entries(callbacks_cfg, "callbacks")]
    return [c for c in callbacks if first_task or not isinstance(c, ModelSummary)]


def build_trainer(
    trainer_cfg: dict[str, Any] | DictConfig,
    callbacks_cfg: dict[str, Any] | DictConfig | None,
    epochs: int,
    loggers: list,
    output_dir: Path,
    first_task: bool,
    extra_callbacks: list | None = None,
    max_steps: int = -1,
) -> pl.Trainer:
    """A fresh Trainer for one task (a finished Trainer would silently train nothing on a second fit)."""
    t = to_dict(trainer_cfg)
    if "spawn" in str(t.get("strategy", "")):
        # spawned workers receive the model and features through shared memory; the file-descriptor
        # strategy fails on some hosts ("unable to resize file"), the file-system one works everywhere
        torch.multiprocessing.set_sharing_strategy("file_system")
    callbacks = [*build_callbacks(callbacks_cfg, first_task), *(extra_callbacks or [])]
    return pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        logger=loggers if loggers else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=any(isinstance(c, ModelSummary) for c in callbacks),
        num_sanity_val_steps=0,
        default_root_dir=str(output_dir),
        **t,
    )
