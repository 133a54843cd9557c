"""Using a trained model: ``MoLEFlowDetector.load(ckpt).predict(images)``.

The detector rebuilds the backbone from the run's configuration (a checkpoint holds no backbone
weights), routes every image to its nearest task (Mahalanobis distance to the task prototypes),
scores it with that task's expert, and turns the score into a verdict with per-task thresholds:

* ``normal`` / ``defective``: image score above the routed task's score threshold;
* ``unknown category``: the image's routing distance exceeds *every* task's route threshold, so it is
  not forced onto the nearest task (its score against the nearest task is still reported).

Thresholds come from a calibration (see :mod:`moleflow.thresholds.records`) stored in the
checkpoint. ``calibrate(save=True)`` writes a *new* checkpoint next to the original,
``<name>.calibrated.ckpt``, atomically, instead of rewriting the run's own files: the training
checkpoints (and the ``last.ckpt`` hard link a resumed run updates) stay untouched, and the calibrated
copy is a complete checkpoint that loads wherever the original does. Loading the original finds its
calibrated copy automatically when the copy was made from exactly that file (content hash).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.assembly.builders import extractor_from_stored
from moleflow.assembly.checkpoint_files import read_checkpoint
from moleflow.assembly.model_files import restore_model
from moleflow.config.score import ScoreConfig
from moleflow.data.inputs import LoadedImage, to_model_inputs
from moleflow.inference.calibrated_copies import calibrated_copy_of, thresholds_in_use
from moleflow.inference.export import ExportableMoLEFlow, export_metadata, write_export
from moleflow.inference.pipeline import RoutedPipeline
from moleflow.inference.prediction import Prediction, predictions_from_outputs
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.thresholds.calibrator import (
    DEFAULT_BATCH,
    CalibrationDataError,
    CalibrationMixin,
    chunks,
)
from moleflow.thresholds.records import Calibration, read_calibration
from moleflow.utils.prefetch import overlap_pays_off, prefetch

log = logging.getLogger(__name__)


class MoLEFlowDetector(CalibrationMixin):
    """A trained MoLE-Flow model ready to judge new images of its categories.

    Build it with :meth:`load`; the constructor takes already-built parts (tests, custom pipelines).

    Args:
        extractor: the frozen backbone + patch embedding the model was trained on.
        model: the trained flow with its router prototypes.
        task_names: names of the model's tasks, in order.
        image_size: side S the images are resized to.
        score_top_k: image score = mean of the top-k patch NLLs.
        pixel_sigma: Gaussian smoothing of the pixel maps.
        calibration: stored thresholds, or None.
        checkpoint: the file the model came from (where ``calibrate(save=True)`` writes next to).
        run_config: the training run's resolved config (to find its training and test images).
        device: where to run.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        model: MoLEFlowModel,
        task_names: list[str],
        image_size: int,
        score_top_k: int = 3,
        pixel_sigma: float = 4.0,
        calibration: Calibration | None = None,
        checkpoint: Path | None = None,
        run_config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if len(task_names) != model.num_tasks or model.router.num_tasks < model.num_tasks:
            msg = (
                f"The model has {model.num_tasks} task(s) and {model.router.num_tasks} router prototype(s) but "
                f"{len(task_names)} task name(s); a checkpoint is only usable once its task's prototype is fitted."
            )
            raise ValueError(msg)
        self.device = torch.device(device)
        self.extractor = extractor.to(self.device).eval()
        self.model = model.to(self.device).eval()
        self.task_names = list(task_names)
        self.image_size = int(image_size)
        self.grid = extractor.grid_size(self.image_size)
        patches = self.grid[0] * self.grid[1]
        if not 1 <= int(score_top_k) <= patches:
            msg = f"score_top_k={score_top_k} must be between 1 and the patches per image ({patches})."
            raise ValueError(msg)
        self.score_top_k = int(score_top_k)
        self.pixel_sigma = float(pixel_sigma)
        self.pipeline = RoutedPipeline(self.extractor, self.model, self.image_size, self.score_top_k, self.pixel_sigma)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.allow_unverified = False  # set by load(): the checkpoint had no integrity record and the user allowed it
        self.run_config = run_config
        self.calibration = calibration
        self._score_override: dict[str, float] = {}
        self._route_override: dict[str, float] = {}
        if calibration is not None:
            self._check_calibration(calibration)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        backbone_weights: str | Path | None = None,
        data_root: str | Path | None = None,
        auto_calibrate: bool = True,
        save_calibration: bool = False,
        recalibrate: bool = False,
        expected_sha256: str | None = None,
        allow_unverified: bool = False,
    ) -> MoLEFlowDetector:
        """Load a training checkpoint (``run/checkpoints/*.ckpt``) or its calibrated copy.

        The file is read without running code and refused, before anything is built, if it is not a moleflow
        checkpoint, has no integrity record, fails it, or its stored config names code moleflow does not
        build from files (:func:`moleflow.assembly.checkpoint_files.read_checkpoint`).

        Args:
            path: the checkpoint.
            device: "cpu", "cuda", ...
            backbone_weights: local weights file for a pretrained backbone when the model hub is unreachable.
            data_root: where the run's data set is now, if it moved since training.
            auto_calibrate: with no stored calibration, calibrate on the training images (in-sample: optimistic
                thresholds, see :mod:`moleflow.thresholds.records`); a warning, not an error, if they are gone.
            save_calibration: write that calibration to ``<name>.calibrated.ckpt`` next to ``path``.
            recalibrate: a calibrated copy next to ``path`` that cannot be read, fails its content hash or was
                made for another checkpoint is ignored (and replaced if ``save_calibration``). Without it
                such a copy is an error: it may hold thresholds from held-out images that must not be lost.
            expected_sha256: the file's SHA-256 as published by whoever made it (``sha256sum`` output); a file
                that does not match is refused before it is read.
            allow_unverified: load a checkpoint without an integrity record (an older moleflow's), with a warning.

        Raises:
            CalibratedCopyError: the calibrated copy next to ``path`` is unusable and ``recalibrate`` is False.
        """

        path = Path(path).expanduser()
        checkpoint = read_checkpoint(path, expected_sha256=expected_sha256, allow_unverified=allow_unverified)
        info = checkpoint["moleflow"]
        run_config = info.get("run_config")
        if run_config is None:
            msg = f"{path} holds no run configuration (made by an older moleflow): the backbone cannot be rebuilt."
            raise ValueError(msg)
        restored = restore_model(checkpoint, path)
        backbone = dict(run_config["model"]["backbone"])
        if backbone_weights is not None:
            backbone["weights"] = str(backbone_weights)
        extractor = extractor_from_stored(
            backbone, int(run_config["model"]["flow"]["embed_dim"]), f"The run config of checkpoint {path}"
        )
        calibration = thresholds_in_use(path, read_calibration(info), calibrated_copy_of(path, recalibrate))
        score = run_config["model"].get("score", {})
        detector = cls(
            extractor,
            restored.model,
            restored.task_names,
            int(run_config["data"]["image_size"]),
            score_top_k=int(score.get("top_k", ScoreConfig.top_k)),
            pixel_sigma=float(score.get("pixel_sigma", ScoreConfig.pixel_sigma)),
            calibration=calibration,
            checkpoint=path,
            run_config=run_config,
            device=device,
        )
        detector.allow_unverified = allow_unverified  # the user's word on this file, for its calibrated copy
        if detector.calibration is None and auto_calibrate:
            log.warning("%s has no stored thresholds: calibrating on the training images (in-sample).", path)
            try:
                detector.calibrate(data_root=data_root, save=save_calibration)
            except CalibrationDataError as err:
                log.warning("Could not calibrate automatically: %s", err)
        return detector

    def _check_calibration(self, calibration: Calibration) -> None:
        missing = [n for n in self.task_names if n not in calibration.tasks]
        if missing:
            msg = f"The stored calibration has no thresholds for tasks {missing}; recalibrate (calibrate())."
            raise ValueError(msg)
        if calibration.score_top_k != self.score_top_k:
            msg = (
                f"The stored thresholds were calibrated for score_top_k={calibration.score_top_k}, but scores use "
                f"top-k {self.score_top_k}; recalibrate."
            )
            raise ValueError(msg)

    # -------------------------------------------------------------------------------- thresholds
    @property
    def thresholds(self) -> dict[str, float | None]:
        """Score threshold per task in use: override, else stored calibration, else None."""
        return {n: self._threshold(n, self._score_override, "score_threshold") for n in self.task_names}

    @property
    def route_thresholds(self) -> dict[str, float | None]:
        """Unknown-category (routing distance) threshold per task in use; None: never unknown."""
        out = {n: self._threshold(n, self._route_override, "route_threshold") for n in self.task_names}
        return {n: None if v is None or not math.isfinite(v) else v for n, v in out.items()}

    def _threshold(self, name: str, override: dict[str, float], key: str) -> float | None:
        if name in override:
            return override[name]
        if self.calibration is not None:
            return float(getattr(self.calibration.tasks[name], key))
        return None

    def set_thresholds(
        self,
        score: float | Mapping[str, float] | None = None,
        route: float | Mapping[str, float] | None = None,
    ) -> None:
        """Override the stored thresholds (a number for every task, or {task: value}); None leaves them.

        ``route=math.inf`` turns unknown-category detection off. Overrides are not saved in the checkpoint.
        """
        for values, target, what in ((score, self._score_override, "score"), (route, self._route_override, "route")):
            if values is None:
                continue
            if isinstance(values, Mapping):
                unknown = sorted(set(values) - set(self.task_names))
                if unknown:
                    msg = f"{what} thresholds given for unknown tasks {unknown}; the model's tasks: {self.task_names}."
                    raise ValueError(msg)
                items = dict(values)
            else:
                items = dict.fromkeys(self.task_names, values)
            for name, value in items.items():
                v = float(value)
                if math.isnan(v) or (what == "score" and math.isinf(v)):
                    msg = f"{what} threshold for task {name!r} must be a finite number, got {value!r}."
                    raise ValueError(msg)
                target[name] = v

    def clear_overrides(self) -> None:
        """Back to the stored thresholds."""
        self._score_override.clear()
        self._route_override.clear()

    @property
    def score_medians(self) -> dict[str, float | None]:
        """Median score of each task's calibration images (0 of the normalised score); None: not stored."""
        return {n: self._stored(n, "score_median") for n in self.task_names}

    @property
    def pixel_thresholds(self) -> dict[str, float | None]:
        """Pixel threshold per task (where a pixel is marked defective); None: not stored (no defect masks)."""
        return {n: self._stored(n, "pixel_threshold") for n in self.task_names}

    def _stored(self, name: str, key: str) -> float | None:
        if self.calibration is None:
            return None
        value = getattr(self.calibration.tasks[name], key)
        return None if value is None else float(value)

    def _threshold_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-task (T,) float64: score thresholds and route thresholds (inf: none), median scores (NaN: none),
        pixel thresholds (inf: none), in task order."""

        def tensor(values: dict[str, float | None], missing: float) -> torch.Tensor:
            items = [missing if v is None else v for v in values.values()]
            return torch.tensor(items, dtype=torch.float64, device=self.device)

        return (
            tensor(self.thresholds, math.inf),
            tensor(self.route_thresholds, math.inf),
            tensor(self.score_medians, math.nan),
            tensor(self.pixel_thresholds, math.inf),
        )

    # -------------------------------------------------------------------------------- prediction
    @torch.no_grad()
    def run_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (B, 3, S, S) -> the same tensors the exported model returns (see pipeline.OUTPUTS)."""
        return self.pipeline(images.to(self.device, torch.float32), *self._threshold_tensors())

    def require_thresholds(self) -> None:
        """Raise if some task has no score threshold (nothing to decide normal vs defective with)."""
        missing = [n for n, v in self.thresholds.items() if v is None]
        if missing:
            msg = (
                f"No score threshold for tasks {missing}: calibrate first (detector.calibrate(), or "
                "calibrate(normal_dir=FOLDER) with held-out defect-free images per task), or set one with "
                "set_thresholds(score=...)."
            )
            raise RuntimeError(msg)

    def predict_loaded(self, loaded: list[LoadedImage]) -> list[Prediction]:
        """Predictions for already-loaded images (one batch)."""
        if not loaded:
            return []
        self.require_thresholds()
        out = self.run_batch(torch.stack([item.tensor for item in loaded]))
        sources = [(item.source, item.original_hw) for item in loaded]
        return predictions_from_outputs(
            out, sources, self.task_names, self.thresholds, self.route_thresholds, self.pixel_thresholds
        )

    def predict(self, images: Any, batch_size: int = DEFAULT_BATCH) -> list[Prediction]:
        """Judge images: file paths, PIL images, numpy arrays (H, W[, C], RGB), or a (B, 3, S, S) tensor.

        Files and in-memory images are converted like the training data (RGB, resized to S, ImageNet
        mean/std); a tensor must already be that. Images are processed ``batch_size`` at a time.

        Raises:
            FileNotFoundError, moleflow.data.images.ImageReadError: a file is missing or unreadable.
            RuntimeError: no thresholds (not calibrated).
        """
        self.require_thresholds()
        if isinstance(images, torch.Tensor):
            items: list[Any] = [images] if images.ndim == 3 else list(images.unbind(0))
        elif isinstance(images, str | Path | np.ndarray) or not isinstance(images, Iterable):
            items = [images]
        else:
            items = list(images)
        results: list[Prediction] = []
        batches = chunks(items, max(1, int(batch_size)))
        # the next batch is decoded while this one runs through the model, where that pays off
        load = lambda chunk: to_model_inputs(chunk, self.image_size)  # noqa: E731
        for _, loaded in prefetch(batches, load, enabled=overlap_pays_off(self.device)):
            results.extend(self.predict_loaded(loaded))
        return results

    # ------------------------------------------------------------------------------------ export
    def export(self, path: str | Path, format: str = "torchscript", check_images: Any = None) -> Path:  # noqa: A002
        """Export the whole routed model (backbone to verdicts) to one file; see :mod:`moleflow.inference.export`.

        ``format``: torchscript | pt2 | onnx | openvino (``EXPORT_FORMATS``); a ``path`` without a suffix gets
        the format's (``.pt``, ``.pt2``, ``.onnx``, ``.xml``). The current thresholds (overrides included) are
        baked in. ``check_images`` (anything ``predict`` accepts) are used for the parity check; default:
        seeded noise. Returns the written file.
        """
        batch = None
        if check_images is not None:
            batch = torch.stack([x.tensor for x in to_model_inputs(check_images, self.image_size)])
        pipeline = RoutedPipeline(
            self.extractor, self.model, self.image_size, self.score_top_k, self.pixel_sigma, every_task=True
        )
        scores, routes, medians, pixels = (t.tolist() for t in self._threshold_tensors())
        module = ExportableMoLEFlow(pipeline, scores, routes, medians, pixels).eval()
        fmt = format.lower()
        metadata = export_metadata(
            fmt,
            source_checkpoint=str(self.checkpoint) if self.checkpoint else None,
            task_names=self.task_names,
            image_size=self.image_size,
            score_top_k=self.score_top_k,
            pixel_sigma=self.pixel_sigma,
            score_thresholds=self.thresholds,
            route_thresholds=self.route_thresholds,
            score_medians=self.score_medians,
            pixel_thresholds=self.pixel_thresholds,
            calibration_notes=(
                self.calibration.notes()
                if self.calibration is not None
                else ["not calibrated: no verdicts (threshold inf)"]
            ),
        )
        return write_export(module, path, metadata, self.run_batch, format=format, check_images=batch)
