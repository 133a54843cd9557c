"""The thresholds a model carries: per task, a score threshold and an unknown-category distance, and where
each comes from (held-out images, or the training images in-sample); stored in a checkpoint's ``moleflow``
section (``calibration``). How they are fitted is :mod:`moleflow.thresholds.fitting`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moleflow.thresholds.fitting import MIN_ROUTE_IMAGES

SECTION = "calibration"  # key in the checkpoint's ``moleflow`` section
FORMAT_VERSION = 1
SOURCE_TRAINING = "training"
SOURCE_HELD_OUT = "held_out"
IN_SAMPLE_NOTE = (
    "Score and pixel thresholds of tasks marked source=training were calibrated on the images the model was "
    "trained on (in-sample): their scores are lower than those of new normal images, so the thresholds are "
    "optimistic and the real false-positive rates (images and pixels) are above the target. Calibrate on "
    "held-out defect-free images (mode=calibrate calibration.normal_dir=FOLDER) for an honest rate."
)


@dataclass
class TaskCalibration:
    """Thresholds of one task and where they come from."""

    score_threshold: float
    score_source: str  # "training" (in-sample, optimistic) or "held_out"
    score_images: int
    calibration_fpr: float  # false-positive rate of the threshold on its own calibration images
    route_threshold: float  # squared Mahalanobis distance; inf: never flagged unknown
    route_source: str  # "training" (cross-validated) or "held_out"
    route_images: int
    test_report: dict[str, Any] | None = None  # F1-optimal threshold etc. when test labels exist
    held_out_routing: dict[str, int] | None = None  # held-out images routed elsewhere / flagged unknown
    score_median: float | None = None  # median score of the calibration images: 0 of the normalised score
    pixel_threshold: float | None = None  # anomaly-map value above which a pixel is marked defective
    pixel_fpr: float | None = None  # share of the calibration images' pixels above it
    pixel_images: int = 0  # images whose pixels it was fitted on (same source as the score threshold)


@dataclass
class Calibration:
    """Per-task thresholds, as stored in a checkpoint's ``moleflow.calibration`` section."""

    target_fpr: float
    unknown_rate: float
    score_top_k: int
    tasks: dict[str, TaskCalibration]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    source_checkpoint: str | None = None
    source_sha256: str | None = None
    version: int = FORMAT_VERSION

    @property
    def in_sample_tasks(self) -> list[str]:
        return [name for name, t in self.tasks.items() if t.score_source == SOURCE_TRAINING]

    def notes(self) -> list[str]:
        """Plain-language caveats to print and write next to the results."""
        notes = []
        if self.in_sample_tasks:
            notes.append(f"{IN_SAMPLE_NOTE} In-sample tasks: {self.in_sample_tasks}.")
        no_pixel = [name for name, t in self.tasks.items() if t.pixel_threshold is None]
        if no_pixel:
            notes.append(
                f"Tasks {no_pixel} have no pixel threshold or median score (calibrated by an older moleflow): no "
                "defect masks and no normalised scores for them; calibrate again (mode=calibrate) to get both."
            )
        never = [name for name, t in self.tasks.items() if not math.isfinite(t.route_threshold)]
        if never:
            notes.append(
                f"Tasks {never} had fewer than {MIN_ROUTE_IMAGES} calibration images for the routing distance: "
                "images near them are never flagged as unknown category."
            )
        return notes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        version = int(data.get("version", 0))
        if version != FORMAT_VERSION:
            msg = (
                f"Stored calibration has format version {version}, this moleflow reads version {FORMAT_VERSION}; "
                "recalibrate (mode=calibrate)."
            )
            raise ValueError(msg)
        values = dict(data)
        values["tasks"] = {name: TaskCalibration(**t) for name, t in data["tasks"].items()}
        return cls(**values)


def calibrated_path(path: Path | str) -> Path:
    """Where the calibrated copy of a checkpoint goes: ``run/checkpoints/last.ckpt`` -> ``last.calibrated.ckpt``.

    A calibrated checkpoint maps to itself (recalibrating it updates it).
    """
    path = Path(path)
    if path.stem.endswith(".calibrated"):
        return path
    return path.with_name(f"{path.stem}.calibrated{path.suffix or '.ckpt'}")


def read_calibration(info: dict[str, Any]) -> Calibration | None:
    """The calibration stored in a checkpoint's ``moleflow`` section, or None if it has none."""
    data = info.get(SECTION)
    return None if data is None else Calibration.from_dict(data)
