"""The flow model of a checkpoint, without Lightning: what inference (and the training module) rebuild from.

A checkpoint's ``state_dict`` holds the training module's tensors: the model's under ``model.`` and the batch
counters under ``counters.``. :func:`restore_model` builds :class:`~moleflow.models.moleflow.MoLEFlowModel`
from the stored flow settings, adds one task per stored task name (experts, adapters, router slots), and
loads the model's tensors strictly, from a dict that :func:`moleflow.assembly.checkpoint_files.read_checkpoint`
checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moleflow.assembly.checkpoint_files import NOT_A_CHECKPOINT, READ_ERRORS, VERIFIED_MARK, CheckpointError
from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.moleflow import MoLEFlowModel

MODEL_PREFIX = "model."


@dataclass
class RestoredModel:
    """A checkpoint's flow model (eval mode, every task added) and its task names in training order."""

    model: MoLEFlowModel
    task_names: list[str]


def restore_model(
    checkpoint: dict[str, Any], path: str | Path, map_location: str | torch.device = "cpu"
) -> RestoredModel:
    """The model with every task's experts and router statistics, from a checked checkpoint dict.

    Raises:
        ValueError: ``checkpoint`` did not come from ``read_checkpoint`` (it was not checked).
        CheckpointError: the stored settings and tensors do not make a model (naming ``path``).
    """
    if not checkpoint.get(VERIFIED_MARK):
        msg = "restore_model takes what read_checkpoint returned (checked), not a raw torch.load result."
        raise ValueError(msg)
    try:
        model = MoLEFlowModel(MoLEFlowConfig.from_dict(dict(checkpoint["hyper_parameters"]["flow"])))
        names = [str(n) for n in checkpoint["moleflow"].get("task_names", [])]
        for _ in names:
            model.add_task()
        model.router.resize(len(names))
        state = {k[len(MODEL_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
        model.load_state_dict(state)
        model = model.to(map_location)
    except torch.cuda.OutOfMemoryError:
        raise  # the file is fine: the device is full (map_location="cpu" avoids it)
    except READ_ERRORS as err:
        msg = f"Cannot load checkpoint {path} ({type(err).__name__}: {err}): {NOT_A_CHECKPOINT}"
        raise CheckpointError(msg) from err
    model.eval()
    return RestoredModel(model, names)
