"""What the detector says about one image: the verdict, its task, scores, thresholds and anomaly map."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

VERDICT_NORMAL = "normal"
VERDICT_DEFECTIVE = "defective"
VERDICT_UNKNOWN = "unknown category"


@dataclass
class Prediction:
    """The detector's answer for one image.

    Attributes:
        task: name of the routed (nearest) task. When ``is_unknown`` it is only the nearest known task.
        task_index: its index in the checkpoint's task order.
        routing_distance: the router's distance to that task (squared Mahalanobis for the prototype router, the
            mean NLL of the best-fitting cells for the positional one).
        score: image score (mean of the top-k patch NLLs under the routed task's expert).
        threshold: the routed task's score threshold (None when not calibrated).
        is_defective: ``score > threshold`` for an image of a known category (False when unknown).
        is_unknown: the routing distance to the routed task exceeds that task's own route threshold.
        anomaly_map: (S, S) pixel anomaly map at the model's input size (NLL, smoothed).
        route_threshold: the routed task's unknown-category threshold (None: never unknown).
        source: the file path, or a description of an in-memory image.
        original_size: (H, W) of the image before resizing (None for tensors).
        nonfinite_patches: patch NLLs that were NaN/inf and replaced (non-zero: the model diverged).
        normalized_score: the score in [0, 1], 0.5 exactly at the threshold, 0 at or below the median score of the
            task's defect-free calibration images, linear, clipped (None without a stored median or threshold).
        pixel_threshold: the routed task's pixel threshold (None: no defect mask).
        defect_mask: (S, S) bool, pixels of ``anomaly_map`` above ``pixel_threshold`` (None without one; all
            false for an unknown category).
    """

    task: str
    task_index: int
    routing_distance: float
    score: float
    threshold: float | None
    is_defective: bool
    is_unknown: bool
    anomaly_map: torch.Tensor
    route_threshold: float | None = None
    source: str = ""
    original_size: tuple[int, int] | None = None
    nonfinite_patches: int = 0
    normalized_score: float | None = None
    pixel_threshold: float | None = None
    defect_mask: torch.Tensor | None = None

    @property
    def decided_by(self) -> str:
        """Which threshold decided the verdict, in words (the CSV's ``decided_by``)."""
        if self.is_unknown:
            return f"route threshold of {self.task}: distance {self.routing_distance:.6g} > {self.route_threshold:.6g}"
        if self.threshold is None or not math.isfinite(self.threshold):
            return f"no score threshold for {self.task} (not calibrated)"
        sign = ">" if self.is_defective else "<="
        return f"score threshold of {self.task}: score {self.score:.6g} {sign} {self.threshold:.6g}"

    @property
    def verdict(self) -> str:
        """ "normal", "defective" or "unknown category"."""
        if self.is_unknown:
            return VERDICT_UNKNOWN
        return VERDICT_DEFECTIVE if self.is_defective else VERDICT_NORMAL

    def as_dict(self) -> dict[str, Any]:
        """Everything but the map, JSON-ready (inf thresholds as None)."""

        def finite(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else float(v)

        return {
            "source": self.source,
            "verdict": self.verdict,
            "task": self.task,
            "task_index": self.task_index,
            "routing_distance": self.routing_distance,
            "route_threshold": finite(self.route_threshold),
            "score": self.score,
            "normalized_score": finite(self.normalized_score),
            "threshold": finite(self.threshold),
            "pixel_threshold": finite(self.pixel_threshold),
            "is_defective": self.is_defective,
            "is_unknown": self.is_unknown,
            "decided_by": self.decided_by,
            "original_size": list(self.original_size) if self.original_size else None,
            "nonfinite_patches": self.nonfinite_patches,
        }


def predictions_from_outputs(
    out: Mapping[str, Any],
    sources: Sequence[tuple[str, tuple[int, int] | None]],
    task_names: Sequence[str],
    thresholds: Mapping[str, float | None],
    route_thresholds: Mapping[str, float | None],
    pixel_thresholds: Mapping[str, float | None],
) -> list[Prediction]:
    """One :class:`Prediction` per image from the routed pipeline's outputs (tensors or arrays, keyed as
    ``pipeline.OUTPUTS``), as the Python detector and an exported model give them; ``sources`` are each image's
    (source, original (H, W)). The per-task thresholds say what is known (None: none)."""
    results = []
    for i, (source, original_hw) in enumerate(sources):
        t = int(out["task"][i])
        name = task_names[t]
        normalized = float(out["normalized_score"][i])
        results.append(
            Prediction(
                task=name,
                task_index=t,
                routing_distance=float(out["routing_distance"][i]),
                score=float(out["score"][i]),
                threshold=thresholds[name],
                is_defective=bool(out["is_defective"][i]),
                is_unknown=bool(out["is_unknown"][i]),
                anomaly_map=torch.as_tensor(out["anomaly_map"][i]).cpu(),
                route_threshold=route_thresholds[name],
                source=source,
                original_size=original_hw,
                nonfinite_patches=int(out["nonfinite"][i]),
                normalized_score=None if thresholds[name] is None or math.isnan(normalized) else normalized,
                pixel_threshold=pixel_thresholds[name],
                defect_mask=None
                if pixel_thresholds[name] is None
                else torch.as_tensor(out["defect_mask"][i]).to(torch.bool).cpu(),
            )
        )
    return results
