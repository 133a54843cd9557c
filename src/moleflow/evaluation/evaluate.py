"""Task-agnostic evaluation of one task's test set: routing, NLL maps, scores, metrics.

Each test image is routed to the nearest prototype among the tasks seen so far; its NLL map comes
from the routed task's expert. The same images are also scored with the true task's expert
(oracle routing) for comparison. Oracle maps are computed for every image in fixed batches (so
they are bit-reproducible); routed maps reuse them where routing is right and score only the
misrouted images again, with one pass per routed task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moleflow.evaluation.anomaly_map import image_scores_topk, pixel_anomaly_map, sanitize_nonfinite_per_image
from moleflow.evaluation.metrics import TaskMetrics, compute_task_metrics
from moleflow.models.feature_extractor import FeatureSet
from moleflow.models.moleflow import MoLEFlowModel


@dataclass
class EvaluationSpec:
    """How a test set is scored (docs/method.md 7): the run's ``model.score`` (image-score top-k, pixel sigma) and
    the data's output size and evaluation batch."""

    top_k: int
    pixel_sigma: float
    image_size: int
    batch_size: int


@dataclass
class TaskEvaluation:
    """Everything measured on one task's test set after some training task."""

    task: int
    name: str
    labels: torch.Tensor  # (N,) int64: 0 normal, 1 anomalous
    routed_tasks: torch.Tensor  # (N,) int64
    route_distances: torch.Tensor  # (N,) float64 squared Mahalanobis distance to the chosen prototype
    oracle_image_scores: torch.Tensor  # (N,)
    routed_image_scores: torch.Tensor  # (N,)
    oracle_pixel_maps: torch.Tensor  # (N, S, S) float32
    routed_pixel_maps: torch.Tensor  # (N, S, S) float32
    oracle_nll: torch.Tensor  # (N, H, W) raw patch NLL maps (non-finite values replaced image by image)
    routed_nll: torch.Tensor  # (N, H, W)
    oracle: TaskMetrics
    routed: TaskMetrics
    nonfinite_oracle: int  # patch scores that were NaN/inf and replaced
    nonfinite_routed: int
    has_masks: bool = True  # False: image-level labels only, pixel metrics are not available (NaN)

    @property
    def routing_accuracy(self) -> float:
        return float((self.routed_tasks == self.task).double().mean()) if len(self.routed_tasks) else float("nan")

    def routing_accuracy_of(self, label: int) -> float:
        """Share of this task's test images with ``label`` (0 defect-free, 1 defective) routed to this task.

        NaN when the test set has no image with that label (nothing to count, never a silent 0 or 1).
        """
        keep = self.labels == label
        if not bool(keep.any()):
            return float("nan")
        return float((self.routed_tasks[keep] == self.task).double().mean())


def _score_batches(
    model: MoLEFlowModel, features: torch.Tensor, tasks: torch.Tensor, cfg: EvaluationSpec, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """NLL maps (N, H, W), pixel maps (N, S, S), per-image non-finite patch counts (N,) of F (N, H, W, D)."""
    nlls, maps, nonfinite = [], [], []
    for start in range(0, features.shape[0], cfg.batch_size):
        feats = features[start : start + cfg.batch_size].to(device)
        nll = model.nll_routed(feats, tasks[start : start + cfg.batch_size])
        nll, replaced = sanitize_nonfinite_per_image(nll.float())  # image by image: batch size cannot matter
        nonfinite.append(replaced.cpu())
        nlls.append(nll.cpu())
        with torch.autocast(feats.device.type, enabled=False):  # maps and metrics always in float32
            maps.append(pixel_anomaly_map(nll, cfg.image_size, cfg.pixel_sigma).cpu())
    return torch.cat(nlls), torch.cat(maps), torch.cat(nonfinite)


def router_inputs(router: torch.nn.Module, features: FeatureSet) -> torch.Tensor:
    """What ``router`` routes by for a cached feature set: the cached global means for the prototype and nearest
    routers (exactly what MAIN used), else the router's own summary of the patch features."""
    if getattr(router, "kind", "prototype") in ("prototype", "nearest"):
        return features.router
    return router.summarize(features.features)


@torch.no_grad()
def evaluate_task(
    model: MoLEFlowModel,
    test: FeatureSet,
    task: int,
    name: str,
    num_seen: int,
    cfg: EvaluationSpec,
    device: torch.device,
    has_masks: bool = True,
) -> TaskEvaluation:
    """Route, score and measure ``test`` (the test set of ``task``) with the first ``num_seen`` tasks.

    With ``has_masks=False`` (a data set with image-level labels only) the pixel metrics are NaN,
    reported as "not available", never computed against empty masks.
    """
    model.eval()
    n = len(test)
    routed, dist = model.router.route(router_inputs(model.router, test).to(device), num_seen)
    routed, dist = routed.cpu(), dist.cpu()
    oracle_tasks = torch.full((n,), task, dtype=torch.int64)
    o_nll, o_maps, o_bad = _score_batches(model, test.features, oracle_tasks, cfg, device)

    r_nll, r_maps, r_bad = o_nll.clone(), o_maps.clone(), o_bad.clone()
    wrong = (routed != task).nonzero(as_tuple=True)[0]
    if len(wrong):
        w_nll, w_maps, w_bad = _score_batches(model, test.features[wrong], routed[wrong], cfg, device)
        r_nll[wrong], r_maps[wrong], r_bad[wrong] = w_nll, w_maps, w_bad
    o_scores, r_scores = image_scores_topk(o_nll, cfg.top_k), image_scores_topk(r_nll, cfg.top_k)

    masks = test.masks if has_masks else None
    pixel = (o_maps, r_maps) if masks is not None else (None, None)
    oracle = compute_task_metrics(o_scores, test.labels, pixel[0], masks)
    routed_metrics = compute_task_metrics(r_scores, test.labels, pixel[1], masks)
    return TaskEvaluation(
        task=task,
        name=name,
        labels=test.labels,
        routed_tasks=routed,
        route_distances=dist,
        oracle_image_scores=o_scores,
        routed_image_scores=r_scores,
        oracle_pixel_maps=o_maps,
        routed_pixel_maps=r_maps,
        oracle_nll=o_nll,
        routed_nll=r_nll,
        oracle=oracle,
        routed=routed_metrics,
        nonfinite_oracle=int(o_bad.sum()),
        nonfinite_routed=int(r_bad.sum()),
        has_masks=has_masks,
    )


def routing_by_defect_type(ev: TaskEvaluation, defect_types: list[str | None]) -> dict[str, dict[str, Any]]:
    """Routing of one task's test images per defect type (the data set's ``Sample.defect_type``, in test order).

    Returns ``{defect_type: {"images", "routed_here", "accuracy", "label"}}``; ``label`` is 0 for the defect-free
    type(s) and 1 otherwise. Images without a type are counted under ``"unknown"``.
    """
    if len(defect_types) != len(ev.routed_tasks):
        msg = f"{len(defect_types)} defect types for {len(ev.routed_tasks)} test images of task {ev.name}."
        raise ValueError(msg)
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(str(d) if d is not None else "unknown" for d in defect_types):
        idx = torch.tensor([i for i, d in enumerate(defect_types) if (str(d) if d is not None else "unknown") == kind])
        right = int((ev.routed_tasks[idx] == ev.task).sum())
        out[kind] = {
            "images": len(idx),
            "routed_here": right,
            "accuracy": right / len(idx),
            "label": int(ev.labels[idx].max()),
        }
    return out


def category_breakdown(ev: TaskEvaluation, categories: list[str], masks: torch.Tensor | None) -> dict[str, dict]:
    """Metrics per category inside a task that groups several categories (routed scores).

    ``categories``: the category of each test image, in test order; ``masks`` (N, S, S) or None.
    Routing accuracy per category is the share of its images sent to this task's expert.
    """
    out: dict[str, dict] = {}
    labels = ev.labels
    for name in dict.fromkeys(categories):
        idx = torch.tensor([i for i, c in enumerate(categories) if c == name])
        pixel_masks = masks[idx] if (masks is not None and ev.has_masks) else None
        metrics = compute_task_metrics(
            ev.routed_image_scores[idx],
            labels[idx],
            ev.routed_pixel_maps[idx] if pixel_masks is not None else None,
            pixel_masks,
        )
        out[name] = {
            "task": ev.name,
            "routed": metrics.as_dict(),
            "routing_accuracy": float((ev.routed_tasks[idx] == ev.task).double().mean()),
            "routing_accuracy_normal": _share_routed(ev, idx, 0),
            "routing_accuracy_defective": _share_routed(ev, idx, 1),
            "num_test_images": len(idx),
        }
    return out


def _share_routed(ev: TaskEvaluation, idx: torch.Tensor, label: int) -> float:
    """Share of the images ``idx`` with ``label`` routed to ev's task (NaN if there are none)."""
    keep = idx[ev.labels[idx] == label]
    return float((ev.routed_tasks[keep] == ev.task).double().mean()) if len(keep) else float("nan")
