"""Checkpoints after each task, in Lightning's format, written atomically.

The file holds ``state_dict`` and ``hyper_parameters`` (so ``MoLEFlowLitModule.load_from_checkpoint``
works), plus a ``moleflow`` section with the task names and the results so far. It is written to a
temporary file and renamed, so a kill while saving never leaves a broken checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from moleflow.training.lightning_module import MoLEFlowLitModule


def save_checkpoint(path: str | Path, module: MoLEFlowLitModule, extra: dict[str, Any] | None = None) -> Path:
    """Save ``module`` (all tasks so far) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["moleflow"].update(extra or {})
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def link_checkpoint(source: str | Path, link: str | Path) -> Path:
    """Point ``link`` (e.g. last.ckpt) at ``source`` atomically: a hard link, or a copy where links fail."""
    source, link = Path(source), Path(link)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, link)
    return link


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The ``moleflow`` section of a checkpoint (task names, run config, results so far)."""
    path = Path(path)
    if not path.is_file():
        msg = f"Checkpoint {path} does not exist."
        raise FileNotFoundError(msg)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except (RuntimeError, EOFError, OSError) as err:
        msg = f"Could not read checkpoint {path} (corrupt or truncated?): {err}"
        raise RuntimeError(msg) from err
    if "moleflow" not in checkpoint:
        msg = f"{path} is not a moleflow checkpoint (no 'moleflow' section)."
        raise ValueError(msg)
    return checkpoint["moleflow"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MoLEFlowLitModule:
    """Rebuild the module with every task's experts and router prototypes from a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        msg = f"Checkpoint {path} does not exist."
        raise FileNotFoundError(msg)
    try:
        module = MoLEFlowLitModule.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, KeyError) as err:
        msg = f"Could not load checkpoint {path} (corrupt, truncated or not a moleflow checkpoint): {err}"
        raise RuntimeError(msg) from err
    module.eval()
    return module
