"""``predict`` on an exported model: the same verdicts, files and CSV from a ``.pt``, ``.pt2``, ``.onnx`` or
OpenVINO ``.xml`` as from a checkpoint, with the model's own runtime and the thresholds baked into it.

An exported file carries its preprocessing (image size, mean, std) and thresholds as metadata, so nothing
else is needed: no checkpoint, no run config, no data. It is a program: load only files from a source you
trust (``docs/checkpoints.md``). Calibrating or re-exporting needs the checkpoint it came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD
from moleflow.data.inputs import LoadedImage, to_model_inputs
from moleflow.inference.export import EXPORT_SUFFIXES, load_exported
from moleflow.inference.prediction import Prediction, predictions_from_outputs

DEFAULT_BATCH = 16


def is_exported_model(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (by its suffix) rather than a training checkpoint (``.ckpt``)."""
    return Path(path).suffix in EXPORT_SUFFIXES.values()


class ExportedDetector:
    """The part of :class:`~moleflow.inference.detector.MoLEFlowDetector` that judges images, over an exported
    model: ``predict``, ``predict_loaded``, the thresholds in use, ``image_size``, ``task_names``."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = Path(path)
        self.model, self.metadata = load_exported(self.path, device)
        meta = self.metadata
        missing = [k for k in ("task_names", "input", "score_thresholds", "route_thresholds") if k not in meta]
        if missing:
            msg = f"{self.path} carries no moleflow metadata ({missing} missing): export it again with mode=export."
            raise ValueError(msg)
        self.task_names: list[str] = list(meta["task_names"])
        self.image_size = int(meta["input"]["size"])
        stats = (meta["input"].get("mean"), meta["input"].get("std"))
        expected = (IMAGENET_MEAN, IMAGENET_STD)
        if not all(got is not None and np.allclose(got, want) for got, want in zip(stats, expected, strict=True)):
            msg = f"{self.path} expects other input statistics {stats} than moleflow's reader (ImageNet's)."
            raise ValueError(msg)
        self.device = torch.device(device) if str(self.path.suffix) in (".pt", ".pt2") else torch.device("cpu")
        self.checkpoint = self.path
        self.calibration = None  # the thresholds are baked into the file (see ``thresholds``)
        self.thresholds = _per_task(meta["score_thresholds"], self.task_names)
        self.route_thresholds = _per_task(meta["route_thresholds"], self.task_names)
        self.pixel_thresholds = _per_task(meta.get("pixel_thresholds") or {}, self.task_names)
        self.score_medians = _per_task(meta.get("score_medians") or {}, self.task_names)

    def require_thresholds(self) -> None:
        """Raise if some task has no score threshold in the file (nothing to decide normal vs defective with)."""
        missing = [n for n, v in self.thresholds.items() if v is None]
        if missing:
            msg = f"{self.path} was exported without score thresholds for tasks {missing}: calibrate, then export."
            raise RuntimeError(msg)

    @torch.no_grad()
    def predict_loaded(self, loaded: list[LoadedImage]) -> list[Prediction]:
        """Predictions for already-loaded images (one batch)."""
        if not loaded:
            return []
        self.require_thresholds()
        batch = torch.stack([item.tensor for item in loaded]).to(self.device, torch.float32)
        out = {k: _tensor(v) for k, v in self.model(batch).items()}
        sources = [(item.source, item.original_hw) for item in loaded]
        return predictions_from_outputs(
            out, sources, self.task_names, self.thresholds, self.route_thresholds, self.pixel_thresholds
        )

    def predict(self, images: Any, batch_size: int = DEFAULT_BATCH) -> list[Prediction]:
        """Judge images: file paths, PIL images, numpy arrays (H, W[, C], RGB), or a (B, 3, S, S) tensor."""
        items = to_model_inputs(images, self.image_size)
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            results += self.predict_loaded(items[start : start + batch_size])
        return results


def _per_task(values: dict[str, Any], names: list[str]) -> dict[str, float | None]:
    """Metadata thresholds by task: None where there is none (null, missing or infinite)."""
    out = {}
    for name in names:
        v = values.get(name)
        out[name] = None if v is None or not math.isfinite(float(v)) else float(v)
    return out


def _tensor(value: Any) -> torch.Tensor:
    """A runtime's output (tensor or numpy array) as a tensor."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
