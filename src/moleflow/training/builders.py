"""Build the run's pieces from the Hydra config (kept apart so tests and scripts can reuse them)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from omegaconf import DictConfig, ListConfig, OmegaConf

from moleflow.data.datamodule import ContinualDataModule
from moleflow.data.synthetic import generate_synthetic_mvtec
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.training.lightning_module import MoLEFlowLitModule

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


def build_datamodule(data_cfg: DictConfig) -> ContinualDataModule:
    """The continual DataModule; ``data.generate`` (generated data) writes the tree first."""
    gen = data_cfg.get("generate")
    if gen:
        generate_synthetic_mvtec(root=data_cfg.root, categories=list(data_cfg.categories), **to_dict(gen))
    categories = data_cfg.get("categories")
    dm = ContinualDataModule(
        root=data_cfg.root,
        categories=list(categories) if categories is not None else None,
        image_size=int(data_cfg.image_size),
        train_batch_size=int(data_cfg.train_batch_size),
        eval_batch_size=int(data_cfg.eval_batch_size),
        num_workers=int(data_cfg.num_workers),
        pin_memory=bool(data_cfg.get("pin_memory", False)),
        source=str(data_cfg.get("source", "mvtec")),
        source_options=to_dict(data_cfg.get("source_options")),
        task_groups=to_dict_or_value(data_cfg.get("task_groups")),
        dataset_name=data_cfg.get("name"),
        sources=to_dict_or_value(data_cfg.get("sources")),
        max_train_per_task=data_cfg.get("max_train_per_task"),
        max_test_per_task=data_cfg.get("max_test_per_task"),
        subset_seed=int(data_cfg.get("subset_seed", 0)),
    )
    dm.setup()
    return dm


def build_extractor(backbone_cfg: DictConfig, embed_dim: int) -> FeatureExtractor:
    b = to_dict(backbone_cfg)
    return FeatureExtractor(
        name=b["name"],
        layers=b["layers"],
        embed_dim=embed_dim,
        neighbourhood=int(b.get("neighbourhood", 3)),
        pretrained=bool(b.get("pretrained", True)),
        weights=b.get("weights"),
        embedding=str(b.get("embedding", "bins_mean")),
    )


def build_module(model_cfg: DictConfig) -> MoLEFlowLitModule:
    return MoLEFlowLitModule(
        flow=to_dict(model_cfg.flow), loss=to_dict(model_cfg.loss), optimizer=to_dict(model_cfg.optimizer)
    )


def build_loggers(logger_cfg: DictConfig | None) -> list:
    """Instantiate every logger under ``logger`` (wandb, csv; ``logger=none`` gives none)."""
    loggers = []
    for name, conf in to_dict(logger_cfg).items():
        if isinstance(conf, dict) and "_target_" in conf:
            log.info("Logger %s: %s", name, conf["_target_"])
            loggers.append(instantiate(conf))
    return loggers


def build_trainer(
    trainer_cfg: DictConfig,
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
    callbacks: list = [RichProgressBar(leave=True), *(extra_callbacks or [])]
    if first_task and t.pop("model_summary", True):
        callbacks.append(RichModelSummary(max_depth=3))
    t.pop("model_summary", None)
    return pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        logger=loggers if loggers else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=first_task,
        num_sanity_val_steps=0,
        default_root_dir=str(output_dir),
        **t,
    )
