"""Routing counted per test label (defect-free / defective), per task, overall and per defect type: hand counts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from moleflow.evaluation.evaluate import TaskEvaluation, routing_by_defect_type
from moleflow.evaluation.metrics import TaskMetrics
from moleflow.evaluation.plots import save_confusion_matrix
from moleflow.evaluation.report import ContinualTracker, table_rows


def _evaluation(task: int, name: str, labels: list[int], routed: list[int]) -> TaskEvaluation:
    n = len(labels)
    zeros = torch.zeros(n)
    maps = torch.zeros(n, 4, 4)
    metrics = TaskMetrics(0.5, 0.5, math.nan, math.nan)
    return TaskEvaluation(
        task=task,
        name=name,
        labels=torch.tensor(labels),
        routed_tasks=torch.tensor(routed),
        route_distances=torch.zeros(n, dtype=torch.float64),
        oracle_image_scores=zeros,
        routed_image_scores=zeros,
        oracle_pixel_maps=maps,
        routed_pixel_maps=maps,
        oracle_nll=maps,
        routed_nll=maps,
        oracle=metrics,
        routed=metrics,
        nonfinite_oracle=0,
        nonfinite_routed=0,
        has_masks=False,
    )


# Task 0 "mono": 3 normal (all routed home), 5 defective of which 2 go to task 1.
# Task 1 "poly": 2 normal (1 goes to task 0), 2 defective (both home).
MONO = _evaluation(0, "mono", [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 1, 0])
POLY = _evaluation(1, "poly", [0, 0, 1, 1], [1, 0, 1, 1])


def test_per_label_routing_matches_a_hand_count(tmp_path: Path) -> None:
    assert MONO.routing_accuracy_of(0) == 1.0
    assert MONO.routing_accuracy_of(1) == 3 / 5
    assert POLY.routing_accuracy_of(0) == 1 / 2
    assert POLY.routing_accuracy_of(1) == 1.0
    assert math.isnan(_evaluation(0, "x", [0, 0], [0, 0]).routing_accuracy_of(1))  # no defective image: undefined

    tracker = ContinualTracker(["mono", "poly"])
    tracker.record_round(0, [_evaluation(0, "mono", [0, 1], [0, 0])])
    tracker.record_round(1, [MONO, POLY])
    summary = tracker.summary()
    assert summary["per_task"]["mono"]["routing_accuracy_normal"] == 1.0
    assert summary["per_task"]["mono"]["routing_accuracy_defective"] == 0.6
    assert summary["per_task"]["poly"]["routing_accuracy_normal"] == 0.5
    assert summary["per_task"]["poly"]["routing_accuracy_defective"] == 1.0
    by_label = summary["routing"]["by_label"]
    # overall: normal 3 + 1 of 5 images, defective 3 + 2 of 7 images (counted over images, not tasks)
    assert by_label["normal"]["images"] == 5 and by_label["normal"]["accuracy"] == 4 / 5
    assert by_label["defective"]["images"] == 7 and by_label["defective"]["accuracy"] == 5 / 7
    np.testing.assert_array_equal(by_label["defective"]["confusion"], [[3, 2], [0, 2]])
    np.testing.assert_array_equal(by_label["normal"]["confusion"], [[3, 0], [1, 1]])
    assert summary["routing"]["accuracy"] == 9 / 12
    # the round metrics that go to W&B, and the matrices after each task
    metrics = tracker.round_metrics(1)
    assert metrics["task/mono/routing_accuracy_defective"] == 0.6
    assert metrics["mean/routing_accuracy_defective"] == (0.6 + 1.0) / 2
    assert metrics["routing/accuracy_defective"] == 5 / 7
    assert tracker.routing_by_label["defective"].as_array()[0, 0] == 1.0

    columns, rows = table_rows(summary)
    assert columns[-3:] == ["Rt Acc", "Rt Nrm", "Rt Def"]
    assert rows[0][-3:] == [75.0, 100.0, 60.0]  # mono: 6 of 8, 3 of 3, 3 of 5
    assert rows[-1][-3:] == [75.0, 80.0, round(100 * 5 / 7, 2)]

    restored = ContinualTracker(["mono", "poly"])  # a resumed run continues the same numbers
    restored.load_state_dict(tracker.state_dict())
    assert restored.summary()["routing"]["by_label"]["defective"]["accuracy"] == 5 / 7
    assert restored.summary()["per_task"]["mono"]["routing_accuracy_defective"] == 0.6

    path = save_confusion_matrix(
        summary["routing"]["confusion"], ["mono", "poly"], tmp_path / "c.png", tracker.confusion_by_label
    )
    assert path.stat().st_size > 0


def test_routing_per_defect_type_matches_a_hand_count() -> None:
    kinds = ["good", "good", "good", "crack", "crack", "dark", "dark", None]
    out = routing_by_defect_type(MONO, kinds)
    assert out["good"] == {"images": 3, "routed_here": 3, "accuracy": 1.0, "label": 0}
    assert out["crack"] == {"images": 2, "routed_here": 1, "accuracy": 0.5, "label": 1}
    assert out["dark"] == {"images": 2, "routed_here": 1, "accuracy": 0.5, "label": 1}
    assert out["unknown"] == {"images": 1, "routed_here": 1, "accuracy": 1.0, "label": 1}


def test_calibration_report_counts_unknown_and_misrouted_per_label() -> None:
    from moleflow.thresholds.fitting import routing_report

    # 5 test images of task 0 (labels 0, 0, 1, 1, 1), distances to tasks 0 and 1, thresholds (10, 10)
    dists = torch.tensor([[1.0, 20.0], [12.0, 11.0], [3.0, 2.0], [50.0, 40.0], [5.0, 30.0]], dtype=torch.float64)
    out = routing_report(dists, 0, np.array([0, 0, 1, 1, 1]), torch.tensor([10.0, 10.0]))
    # image 1: nearest task 1, above both thresholds -> misrouted and unknown; image 2: misrouted only;
    # image 3: misrouted and unknown
    assert out["normal"] == {
        "images": 2,
        "routed_to_other_task": 1,
        "flagged_unknown": 1,
        "routed_to_other_task_rate": 0.5,
        "unknown_rate": 0.5,
        "misrouted_not_unknown": 0,
    }
    assert out["defective"]["images"] == 3
    assert out["defective"]["routed_to_other_task"] == 2 and out["defective"]["flagged_unknown"] == 1
    assert out["defective"]["misrouted_not_unknown"] == 1  # image 2 only: image 3 is flagged unknown
    assert out["defective"]["unknown_rate"] == 1 / 3
    empty = routing_report(dists[:2], 0, np.array([0, 0]), torch.tensor([10.0, 10.0]))
    assert empty["defective"]["images"] == 0 and empty["defective"]["unknown_rate"] is None
