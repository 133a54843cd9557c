"""What the steps of a continual run share (:class:`ContinualRun`) and one task's pass (:class:`TaskRound`).

Kept apart from the loop (:mod:`moleflow.training.continual`) and its last step
(:mod:`moleflow.training.run_finish`), which both work on these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moleflow.config.schema import JobConfig
from moleflow.evaluation.evaluate import EvaluationSpec
from moleflow.evaluation.report import ContinualTracker
from moleflow.models.feature_extractor import FeatureSet
from moleflow.thresholds.held_out import threshold_report
from moleflow.thresholds.records import Calibration
from moleflow.training.feature_cache import FeatureCache
from moleflow.training.run_record import run_payload


@dataclass
class ContinualRun:
    """What the steps of a run share: its parts, its results so far, and where it writes."""

    cfg: JobConfig
    output_dir: Path
    overrides: list[str] | None
    device: torch.device
    dm: Any
    extractor: Any
    module: Any
    names: list[str]
    tracker: ContinualTracker
    cache: FeatureCache
    score_cfg: EvaluationSpec
    loggers: list
    amp_dtype: torch.dtype | None
    started: float
    timings: dict[str, Any]
    run_log: dict[str, Any]
    calibration: Calibration
    calibration_share: float = 0.0
    start_task: int = 0
    payload: dict[str, Any] = field(default_factory=dict)
    evaluations: list = field(default_factory=list)

    @property
    def runtime(self) -> Any:
        return self.cfg.runtime

    def make_payload(self) -> dict[str, Any]:
        """The metrics.json payload of the results so far (status "running")."""
        payload = run_payload(
            self.cfg,
            self.overrides,
            self.tracker,
            self.module,
            self.timings,
            self.started,
            self.output_dir,
            self.extractor.images_seen,
        )
        payload["run"].update(self.run_log)
        if self.calibration.tasks and self.evaluations:
            payload["thresholds"] = threshold_payload(self, self.evaluations)
        return payload


@dataclass
class TaskRound:
    """One task's pass through the loop: its id, name, stage times, training features and training problems."""

    t: int
    name: str
    times: dict[str, float] = field(default_factory=dict)
    train_set: FeatureSet | None = None
    untrainable: list[tuple[str, str]] = field(default_factory=list)
    kept: torch.Tensor | None = None  # (N_kept,) indices of the training images the task learns from
    held: torch.Tensor | None = None  # (N_held,) indices held out for its thresholds (empty: none)
    router_in: torch.Tensor | None = None  # the router's inputs of every training image
    copies: torch.Tensor | None = None  # (copies * N_kept, H, W, D) photometric copies' features (None: none)


def threshold_payload(run: ContinualRun, evaluations: list) -> dict[str, Any]:
    """metrics.json's ``thresholds`` (:func:`held_out.threshold_report`) on every seen task's cached test set."""
    test_sets = {ev.task: run.cache.test_set(run.dm, ev.task, ev.name) for ev in evaluations}
    return threshold_report(run.module.model, test_sets, evaluations, run.calibration, run.names, run.calibration_share)
