"""Evaluation: exact ranking metrics on raw scores, anomaly maps and continual-learning measures."""

from moleflow.evaluation.anomaly_map import (
    gaussian_blur2d,
    gaussian_kernel1d,
    image_scores_topk,
    pixel_anomaly_map,
    sanitize_nonfinite,
    sanitize_nonfinite_per_image,
)
from moleflow.evaluation.continual_metrics import (
    ResultMatrix,
    backward_transfer,
    backward_transfer_per_task,
    final_mean,
    forgetting_measure,
    forgetting_per_task,
    routing_accuracy,
    routing_confusion,
)
from moleflow.evaluation.metrics import (
    METRIC_NAMES,
    TaskMetrics,
    binary_auroc,
    binary_auroc_ap,
    binary_average_precision,
    compute_task_metrics,
)

__all__ = [
    "METRIC_NAMES",
    "ResultMatrix",
    "TaskMetrics",
    "backward_transfer",
    "backward_transfer_per_task",
    "binary_auroc",
    "binary_auroc_ap",
    "binary_average_precision",
    "compute_task_metrics",
    "final_mean",
    "forgetting_measure",
    "forgetting_per_task",
    "gaussian_blur2d",
    "gaussian_kernel1d",
    "image_scores_topk",
    "pixel_anomaly_map",
    "routing_accuracy",
    "routing_confusion",
    "sanitize_nonfinite",
    "sanitize_nonfinite_per_image",
]
