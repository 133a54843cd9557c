"""MoLE-Flow: continual anomaly detection with a normalizing flow whose coupling subnets are a shared base plus
one LoRA expert per task, and a router that picks the expert.

The public names, imported on first use (``import moleflow`` loads neither torch nor Lightning):

- :class:`MoLEFlowDetector` (``moleflow.inference``): load a trained checkpoint, predict, calibrate, export;
- :func:`load_exported`: run an exported model;
- :class:`MoLEFlowModel` and :class:`MoLEFlowConfig`: the flow as a plain ``nn.Module`` and its settings;
- :class:`ContinualDataModule`: the continual-task data; :class:`FeatureExtractor`: the frozen backbone;
- :func:`train_job`: one training job from a composed config; :func:`compose_config`: compose one from Python;
- :func:`register`: the configs' resolvers and schema, before Hydra composes (entry points call it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from moleflow.config import register
    from moleflow.config.compose import compose_config
    from moleflow.config.flow import MoLEFlowConfig
    from moleflow.data.datamodule import ContinualDataModule
    from moleflow.inference.detector import MoLEFlowDetector
    from moleflow.inference.export import load_exported
    from moleflow.models.feature_extractor import FeatureExtractor
    from moleflow.models.moleflow import MoLEFlowModel
    from moleflow.training.job import train_job

_EXPORTS: dict[str, str] = {
    "register": "moleflow.config",
    "compose_config": "moleflow.config.compose",
    "MoLEFlowConfig": "moleflow.config.flow",
    "ContinualDataModule": "moleflow.data.datamodule",
    "MoLEFlowDetector": "moleflow.inference.detector",
    "load_exported": "moleflow.inference.export",
    "FeatureExtractor": "moleflow.models.feature_extractor",
    "MoLEFlowModel": "moleflow.models.moleflow",
    "train_job": "moleflow.training.job",
}
__all__ = [
    "ContinualDataModule",
    "FeatureExtractor",
    "MoLEFlowConfig",
    "MoLEFlowDetector",
    "MoLEFlowModel",
    "__version__",
    "compose_config",
    "load_exported",
    "register",
    "train_job",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    msg = f"module 'moleflow' has no attribute {name!r}"
    raise AttributeError(msg)
