"""Decision thresholds made during training, on held-out defect-free images (issue 14).

With ``training.calibration_share = s > 0`` a seeded share s of each task's (defect-free) training images is
held out: the flow, the feature statistics and the router never see them. At the end of the task, from
their cached features:

* the **score threshold** is the ``calibration_fpr`` quantile of their image scores under the task's expert
  (:func:`moleflow.thresholds.fitting.fpr_threshold`, the rule ``predict`` uses);
* the **unknown-category threshold** is fitted to their routing distances to the task
  (:func:`moleflow.thresholds.fitting.tail_threshold`).

Both are out-of-sample (the honest false-positive rate that the in-sample calibration of ``predict`` on
training images is not) and neither changes when later tasks are added (experts and router statistics of an
earlier task never change). They are stored in every checkpoint as its calibration, so ``predict`` on it
needs no calibration pass, and metrics.json reports the test false-positive rate and recall they give.
``calibration_share = 0`` (the default, MAIN) holds nothing out and stores nothing: training is unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from moleflow.evaluation.anomaly_map import image_scores_topk, pixel_anomaly_map, sanitize_nonfinite_per_image
from moleflow.evaluation.evaluate import TaskEvaluation, router_inputs
from moleflow.thresholds.fitting import (
    MIN_ROUTE_IMAGES,
    fpr_threshold,
    outside_own_route,
    pixel_threshold,
    tail_threshold,
)
from moleflow.thresholds.records import SOURCE_HELD_OUT, Calibration, TaskCalibration

log = logging.getLogger(__name__)


def holdout_split(n: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``n`` training images into (kept for training, held out) index tensors, both sorted.

    ``floor(share * n)`` images are held out, but at least one image is always kept for training.
    """
    if not 0.0 <= share < 1.0:
        msg = f"training.calibration_share must be in [0, 1), got {share}."
        raise ValueError(msg)
    held = min(math.floor(share * n), n - 1)
    if held <= 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


@torch.no_grad()
def held_out_scores(
    model: Any,
    features: torch.Tensor,
    task: int,
    top_k: int,
    batch_size: int,
    device: torch.device,
    image_size: int | None = None,
    pixel_sigma: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image scores (N,) float64 of features (N, H, W, D) under ``task``'s expert, as evaluation computes them,
    and with ``image_size`` their pixel maps (N, S, S) float32 (else None)."""
    scores, maps = [], []
    for start in range(0, features.shape[0], batch_size):
        feats = features[start : start + batch_size].to(device)
        tasks = torch.full((feats.shape[0],), task, dtype=torch.int64, device=device)
        nll, _ = sanitize_nonfinite_per_image(model.nll_routed(feats, tasks).float())
        scores.append(image_scores_topk(nll.cpu(), top_k).double())
        if image_size is not None:
            maps.append(pixel_anomaly_map(nll.cpu(), image_size, pixel_sigma))
    return torch.cat(scores), (torch.cat(maps) if maps else None)


def fit_task_thresholds(
    scores: torch.Tensor,
    distances: torch.Tensor,
    floor: float,
    target_fpr: float,
    unknown_rate: float,
    maps: torch.Tensor | None = None,
) -> TaskCalibration:
    """Thresholds of one task from its held-out images' scores (N,), routing distances to it (N,) and pixel maps
    (N, S, S): score and pixel thresholds at ``target_fpr``, the median score, the unknown-category distance."""
    score_thr, fpr = fpr_threshold(scores.numpy(), target_fpr)
    pixel_thr, pixel_fpr = pixel_threshold(maps, target_fpr) if maps is not None else (None, None)
    route_thr = tail_threshold(distances.numpy(), unknown_rate, floor)
    if distances.numel() < MIN_ROUTE_IMAGES:
        log.warning(
            "Only %d held-out image(s): the unknown-category threshold needs %d; it is off for this task.",
            distances.numel(),
            MIN_ROUTE_IMAGES,
        )
    return TaskCalibration(
        score_threshold=score_thr,
        score_source=SOURCE_HELD_OUT,
        score_images=int(scores.numel()),
        calibration_fpr=fpr,
        route_threshold=route_thr,
        route_source=SOURCE_HELD_OUT,
        route_images=int(distances.numel()),
        score_median=float(scores.median()),
        pixel_threshold=pixel_thr,
        pixel_fpr=pixel_fpr,
        pixel_images=0 if maps is None else int(maps.shape[0]),
    )


def new_calibration(target_fpr: float, unknown_rate: float, top_k: int) -> Calibration:
    return Calibration(target_fpr=float(target_fpr), unknown_rate=float(unknown_rate), score_top_k=top_k, tasks={})


def verdict_report(
    evaluations: list[TaskEvaluation],
    calibration: Calibration,
    names: list[str],
    distances: dict[int, torch.Tensor],
    masks: dict[int, torch.Tensor | None] | None = None,
) -> dict[str, dict[str, Any]]:
    """What the stored thresholds decide on each task's labelled test images, as ``predict`` would.

    An image goes to its routed task; it is "unknown" when its routing distance exceeds that task's own route
    threshold, else "defective" when its routed score exceeds the routed task's score threshold. With masks,
    ``pixel_fpr`` / ``pixel_recall`` are the shares of defect-free / defective pixels of the task's test images
    above its pixel threshold (routed maps). Per task:
    the false-positive rate (defect-free images called defective), recall (defective images called
    defective), the unknown-category rate per label, both rates counting "unknown" as a finding too
    (``*_with_unknown``: what needs a look), the rates with the true task's expert and threshold
    (oracle routing: the threshold alone), and the counts of images sent to another task's expert without an
    unknown-category flag (``misrouted_not_unknown_*``).
    """
    seen = [n for n in names if n in calibration.tasks]
    if seen != names[: len(evaluations)]:  # e.g. a run resumed from one made without held-out images
        log.warning("Stored thresholds cover tasks %s, not every evaluated task: no verdict report.", seen)
        return {}
    score_thr = torch.tensor([calibration.tasks[n].score_threshold for n in seen], dtype=torch.float64)
    route_thr = torch.tensor([calibration.tasks[n].route_threshold for n in seen], dtype=torch.float64)
    out: dict[str, dict[str, Any]] = {}
    for ev in evaluations:
        if ev.name not in calibration.tasks:
            continue
        d = distances[ev.task][:, : len(seen)].double()
        unknown = outside_own_route(d, route_thr)
        defective = (ev.routed_image_scores.double() > score_thr[ev.routed_tasks]) & ~unknown
        oracle = ev.oracle_image_scores.double() > score_thr[ev.task]
        normal, bad = ev.labels == 0, ev.labels == 1
        misrouted = (ev.routed_tasks != ev.task) & ~unknown

        def rate(flags: torch.Tensor, keep: torch.Tensor) -> float | None:
            return float(flags[keep].double().mean()) if bool(keep.any()) else None

        out[ev.name] = {
            "score_threshold": float(score_thr[ev.task]),
            "route_threshold": float(route_thr[ev.task]),
            "test_normal": int(normal.sum()),
            "test_defective": int(bad.sum()),
            "fpr": rate(defective, normal),
            "recall": rate(defective, bad),
            "unknown_rate_normal": rate(unknown, normal),
            "unknown_rate_defective": rate(unknown, bad),
            "fpr_with_unknown": rate(defective | unknown, normal),  # "needs a look": defective or unknown
            "recall_with_unknown": rate(defective | unknown, bad),
            "oracle_fpr": rate(oracle, normal),
            "oracle_recall": rate(oracle, bad),
            # judged by another task's expert and threshold with no "unknown" warning: the silent routing failure
            "misrouted_not_unknown_normal": int((misrouted & normal).sum()),
            "misrouted_not_unknown_defective": int((misrouted & bad).sum()),
            **_pixel_rates(ev, calibration.tasks[ev.name].pixel_threshold, (masks or {}).get(ev.task)),
        }
    return out


def _pixel_rates(ev: TaskEvaluation, threshold: float | None, masks: torch.Tensor | None) -> dict[str, Any]:
    """Pixel false-positive rate and recall of the task's routed maps at its pixel threshold (None without)."""
    if threshold is None or masks is None or not ev.has_masks:
        return {"pixel_threshold": threshold, "pixel_fpr": None, "pixel_recall": None}
    above, truth = ev.routed_pixel_maps > threshold, masks > 0.5
    negatives, positives = int((~truth).sum()), int(truth.sum())
    return {
        "pixel_threshold": threshold,
        "pixel_fpr": float((above & ~truth).sum() / negatives) if negatives else None,
        "pixel_recall": float((above & truth).sum() / positives) if positives else None,
    }


def thresholds_from_held_out(
    model: Any,
    features: torch.Tensor,
    router_in: torch.Tensor,
    t: int,
    top_k: int,
    batch_size: int,
    device: Any,
    target_fpr: float,
    unknown_rate: float,
    image_size: int | None = None,
    pixel_sigma: float = 4.0,
) -> TaskCalibration:
    """Task t's score, pixel and unknown-category thresholds from its held-out images' features (N, H, W, D).

    ``router_in`` holds the same images' router inputs; scores and pixel maps (at ``image_size``, smoothed with
    ``pixel_sigma``, as evaluation makes them) come from task t's expert, distances from t's router statistics
    (fitted without these images).
    """
    scores, maps = held_out_scores(model, features, t, top_k, batch_size, device, image_size, pixel_sigma)
    distances = model.router.distances(router_in.to(device), t + 1)[:, t].cpu()
    floor = float(model.router.floors(t + 1)[t])
    result = fit_task_thresholds(scores, distances, floor, target_fpr, unknown_rate, maps)
    log.info(
        "Task %d: thresholds from %d held-out images: score %.4g, unknown-category distance %.4g",
        t,
        len(features),
        result.score_threshold,
        result.route_threshold,
    )
    return result


def threshold_report(
    model: Any,
    test_sets: dict[int, Any],
    evaluations: list[TaskEvaluation],
    calibration: Calibration,
    names: list[str],
    share: float,
) -> dict[str, Any]:
    """metrics.json's ``thresholds``: the stored thresholds and what they decide on every seen task's test set."""
    distances = {}
    for ev in evaluations:
        inputs = router_inputs(model.router, test_sets[ev.task])
        distances[ev.task] = model.router.distances(inputs.to(model.router.train_counts.device), len(evaluations)).cpu()
    return {
        "calibration_share": share,
        "target_fpr": calibration.target_fpr,
        "unknown_rate": calibration.unknown_rate,
        "held_out_images": {n: c.score_images for n, c in calibration.tasks.items()},
        "per_task": verdict_report(
            evaluations, calibration, names, distances, {t: getattr(s, "masks", None) for t, s in test_sets.items()}
        ),
        "note": "thresholds fitted at the end of each task on its held-out defect-free training images; "
        "fpr/recall: verdicts as predict gives them (routed, unknown category excluded); oracle_*: the true "
        "task's expert and threshold",
    }
