"""The objects a run is made of, from its settings: the data module and the frozen backbone.

From the user's own composed config they are built with Hydra's ``instantiate``; from a config read out of a
file (a checkpoint's run config) only through trusted ``_target_`` entries, without Hydra
(:mod:`moleflow.assembly.trusted_targets`). The Lightning parts (module, trainer, loggers, callbacks) are
built in :mod:`moleflow.training.trainer_parts`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from moleflow.assembly.trusted_targets import build_stored
from moleflow.config.instantiation import build_entry, to_dict
from moleflow.data.datamodule import ContinualDataModule
from moleflow.models.feature_extractor import FeatureExtractor

log = logging.getLogger(__name__)


def resolve_device(accelerator: str) -> torch.device:
    """The device of a trainer accelerator or a ``device`` setting: ``auto`` takes a GPU when there is one;
    ``gpu`` is CUDA; anything else (``cpu``, ``cuda:1``, ``mps``) names a torch device."""
    if accelerator == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    if accelerator == "gpu":
        return torch.device("cuda")
    try:
        return torch.device(accelerator)
    except RuntimeError as err:
        msg = f"Unknown device {accelerator!r}: use auto, cpu, cuda, cuda:N or mps."
        raise ValueError(msg) from err


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

    Built without Hydra from a trusted ``_target_`` only (:mod:`moleflow.assembly.trusted_targets`): a stored
    config must not choose the code that runs.
    """
    dm = build_stored(data, "data", DATAMODULE_TARGET, source)
    dm.prepare_data()
    dm.setup()
    return dm


def extractor_from_stored(backbone: dict[str, Any], embed_dim: int, source: str) -> FeatureExtractor:
    """The frozen backbone of a config read from a file, built from a trusted ``_target_`` without Hydra."""
    return build_stored(backbone, "model.backbone", EXTRACTOR_TARGET, source, embed_dim=embed_dim)
