"""The training module to and from checkpoint files (:mod:`moleflow.assembly.checkpoint_files`).

:func:`save_checkpoint` writes the module (all tasks so far) after each task; :func:`load_checkpoint`
rebuilds it, every task's experts and router included, from a file that :func:`read_checkpoint` checked
first (no code runs while reading, nothing untrusted is built). ``MoLEFlowLitModule.load_from_checkpoint``
goes through the same reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from moleflow.assembly.checkpoint_files import read_checkpoint, write_checkpoint
from moleflow.training.lightning_module import MoLEFlowLitModule


def save_checkpoint(path: str | Path, module: MoLEFlowLitModule, extra: dict[str, Any] | None = None) -> Path:
    """Save ``module`` (all tasks so far) to ``path`` atomically, with its content hash."""
    path = Path(path)
    checkpoint: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["moleflow"].update(extra or {})
    write_checkpoint(checkpoint, path)
    return path


def module_from_checkpoint(
    checkpoint: dict[str, Any], path: str | Path, map_location: str | torch.device = "cpu"
) -> MoLEFlowLitModule:
    """Rebuild the module with every task's experts and router slots from a dict :func:`read_checkpoint` returned."""
    return MoLEFlowLitModule.from_checked(checkpoint, path, map_location)


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    expected_sha256: str | None = None,
    allow_unverified: bool = False,
) -> MoLEFlowLitModule:
    """Rebuild the module with every task's experts and router prototypes from a checkpoint file."""
    checkpoint = read_checkpoint(path, expected_sha256=expected_sha256, allow_unverified=allow_unverified)
    return MoLEFlowLitModule.from_checked(checkpoint, path, map_location)
