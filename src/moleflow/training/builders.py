"""Build the run's pieces from the Hydra config (kept apart so tests and scripts can reuse them)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelSummary
from omegaconf import DictConfig, ListConfig, OmegaConf

from moleflow.data.datamodule import ContinualDataModule
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.training.lightning_module import MoLEFlowLitModule
from moleflow.utils.instantiation import build_entry
from moleflow.utils.trusted_targets import build_stored

log = logging.getLogger(__name__)


def to_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def to_dict_or_value(value: Any) -> Any:
    """Plain Python for a config node (lists of lists stay lists), scalars unchanged."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def resolve_device(accelerator: str) -> torch.device:
    """Device for feature extraction and evaluation, consistent with the trainer's accelerator."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


DATAMODULE_TARGET = "moleflow.data.datamodule.ContinualDataModule"
EXTRACTOR_TARGET = "moleflow.models.feature_extractor.FeatureExtractor"


def _with_target(cfg: DictConfig | dict, default: str) -> dict[str, Any]:
    """The entry as a plain dict; run configs saved before their group named a ``_target_`` get ``default``."""
    values = to_dict(cfg)
    values.setdefault("_target_", default)
    return values


def build_datamodule(data_cfg: DictConfig | dict) -> ContinualDataModule:
    """The continual DataModule from ``data._target_``, prepared (a generated tree is written) and scanned."""
    dm = build_entry(_with_target(data_cfg, DATAMODULE_TARGET), "data", _convert_="all")
    if not isinstance(dm, ContinualDataModule):
        msg = f"data._target_ built a {type(dm).__name__}, not a ContinualDataModule."
        raise TypeError(msg)
    dm.prepare_data()
    dm.setup()
    return dm


def build_extractor(backbone_cfg: DictConfig | dict, embed_dim: int) -> FeatureExtractor:
    """The frozen backbone from ``model.backbone._target_``; D (``model.flow.embed_dim``) comes from the flow."""
    extractor = build_entry(
        _with_target(backbone_cfg, EXTRACTOR_TARGET), "model.backbone", embed_dim=embed_dim, _convert_="all"
    )
    if not isinstance(extractor, FeatureExtractor):
        msg = f"model.backbone._target_ built a {type(extractor).__name__}, not a FeatureExtractor."
        raise TypeError(msg)
    return extractor


def datamodule_from_stored(data: dict[str, Any], source: str) -> ContinualDataModule:
    """The DataModule of a config read from a file (a checkpoint's run config), prepared and scanned.

    Built without Hydra from a trusted ``_target_`` only (:mod:`moleflow.utils.trusted_targets`): a stored
    config must not choose the code that runs.
    """
    dm = build_stored(data, "data", DATAMODULE_TARGET, source)
    dm.prepare_data()
    dm.setup()
    return dm


def extractor_from_stored(backbone: dict[str, Any], embed_dim: int, source: str) -> FeatureExtractor:
    """The frozen backbone of a config read from a file, built from a trusted ``_target_`` without Hydra."""
    return build_stored(backbone, "model.backbone", EXTRACTOR_TARGET, source, embed_dim=embed_dim)


def build_module(model_cfg: DictConfig) -> MoLEFlowLitModule:
    return MoLEFlowLitModule(
        flow=to_dict(model_cfg.flow),
        loss=to_dict(model_cfg.loss),
        optimizer=to_dict(model_cfg.optimizer),
        scheduler=to_dict(model_cfg.scheduler),
    )


def _instantiate_entries(group_cfg: DictConfig | None, key: str) -> list[tuple[str, Any]]:
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


def build_loggers(logger_cfg: DictConfig | None) -> list:
    """Instantiate every logger under ``logger`` (wandb, csv; ``logger=none`` gives none)."""
    return [obj for _, obj in _instantiate_entries(logger_cfg, "logger")]


def build_callbacks(callbacks_cfg: DictConfig | None, first_task: bool) -> list[pl.Callback]:
    """Instantiate every callback under ``callbacks``; a model summary only for the first task."""
    callbacks = [obj for _, obj in _instantiate_entries(callbacks_cfg, "callbacks")]
    return [c for c in callbacks if first_task or not isinstance(c, ModelSummary)]


def build_trainer(
    trainer_cfg: DictConfig,
    callbacks_cfg: DictConfig | None,
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
