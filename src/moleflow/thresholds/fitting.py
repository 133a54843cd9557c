"""Decision thresholds for a trained model: image-score thresholds and unknown-category distances per task.

**Score threshold (normal / defective).** Calibrated without defect labels, on defect-free images at a
chosen false-positive rate alpha (default 1 %): with n normal scores, the threshold is the
``(n - floor(alpha * n))``-th smallest, so at most ``floor(alpha * n)`` calibration images score strictly
above it (an image is defective when ``score > threshold``). With fewer than ``1 / alpha`` images that
is the largest calibration score. Sources:

* held-out defect-free images of each task (``FOLDER/<task>/*.png``): the recommended way, an
  honest estimate of the false-positive rate on new images;
* by default, the task's own *training* images. The flow was fitted to exactly these images, so
  their scores are lower than those of new normal images: the threshold is optimistic and the real
  false-positive rate is *above* the target. Every output says so.

When test labels exist, the threshold that maximises F1 on the test set is reported per task, with
the test set's false-positive rate and recall at the calibrated threshold. It is a report (it was
chosen on the test labels), never the stored default.

**Unknown-category threshold (routing distance).** Each task's router prototype is a Gaussian fitted
to its training images' router features; an image whose squared Mahalanobis distance to *every* task
exceeds that task's threshold is an unknown category rather than forced onto the nearest task.

Why neither the training images' own distances nor a chi-square bound: with n training images in D
dimensions and typically n < D (MVTec: ~200-400 images, D = 768), the covariance is rank-deficient
plus a tiny ridge. In-sample distances are then bounded (about (n-1)^2 / n) while any *new* image,
even a normal one, has a component outside the span of the training images that the ridge inflates:
a quantile of in-sample distances would flag every new image, and a chi-square(D) bound assumes a
well-estimated full-rank covariance that does not exist. Instead the training images' distances are
*cross-validated*: each image's distance to a prototype fitted without it (K folds, K = min(n, 10)),
which is how a new normal image of the task behaves (slightly farther even, since each fold fits on
fewer images: the safe direction). Held-out normal images, when given, are used directly.

From those n out-of-sample distances d the threshold is ``max(max(d), (m + z * s) ** 3)``, with m, s
the mean and standard deviation of ``d ** (1/3)`` and z the standard-normal quantile of
``1 - unknown_rate`` (default 1 %). Squared Mahalanobis distances of Gaussian data are (scaled)
chi-square / Hotelling-like, whose cube root is close to normal (Wilson-Hilferty), so this extrapolates
the tail from few images without assuming the degrees of freedom or the scale; taking at least the
largest observed distance means no calibration image is ever flagged. A task with fewer than 3
training images cannot be cross-validated: its threshold is infinite (never unknown), with a warning.
"""

from __future__ import annotations

import logging
import math
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from moleflow.models.router import PrototypeRouter

log = logging.getLogger(__name__)

MAX_CV_FOLDS = 10  # more folds than this barely changes the distances and costs one D x D inverse each
MIN_ROUTE_IMAGES = 3  # cross-validation needs >= 2 images to fit each fold's covariance, plus one held out


def check_rate(name: str, value: float) -> float:
    """A rate strictly between 0 and 1 (the thresholds are quantiles)."""
    value = float(value)
    if not 0.0 < value < 1.0:
        msg = f"{name} must be a fraction strictly between 0 and 1 (e.g. 0.01 for 1 %), got {value}."
        raise ValueError(msg)
    return value


def fpr_threshold(scores: np.ndarray | torch.Tensor, target_fpr: float) -> tuple[float, float]:
    """Threshold at which at most ``floor(target_fpr * n)`` of the normal ``scores`` are above it.

    Returns:
        (threshold, the false-positive rate it gives on these scores).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0:
        msg = "No normal images to calibrate a score threshold on; give at least one defect-free image per task."
        raise ValueError(msg)
    if not np.all(np.isfinite(s)):
        msg = "Some calibration scores are not finite (training diverged?): the threshold would be meaningless."
        raise ValueError(msg)
    allowed = math.floor(check_rate("target_fpr", target_fpr) * s.size)
    threshold = float(s[s.size - 1 - allowed])
    return threshold, float(np.mean(s > threshold))


def pixel_threshold(maps: torch.Tensor, target_fpr: float) -> tuple[float, float]:
    """Pixel threshold from defect-free images' pixel maps (N, S, S): at most ``target_fpr`` of their pixels above
    it (the score threshold's rule, per pixel). Returns (threshold, the pixel false-positive rate it gives)."""
    values = maps.detach().float().reshape(-1).cpu().numpy()
    return fpr_threshold(values, target_fpr)


def normalized_score(scores: torch.Tensor, thresholds: torch.Tensor, medians: torch.Tensor) -> torch.Tensor:
    """Image scores as a number in [0, 1] a person can read: 0.5 exactly at the task's threshold, 0 at or below
    the median score of its defect-free calibration images, linear in between and above (1 at threshold +
    (threshold - median)), clipped. Monotone in the score. (B,) scores and the (B,) routed task's threshold and
    median -> (B,); NaN where there is none (no threshold: inf, or no stored median: NaN). Tensor ops only, and
    no NaN goes through an arithmetic op (runtimes clip NaN differently), so it exports as it is."""
    scores, thresholds, medians = scores.double(), thresholds.double(), medians.double()
    known = torch.isfinite(thresholds) & torch.isfinite(medians)
    thr = torch.where(known, thresholds, torch.ones_like(thresholds))
    med = torch.where(known, medians, torch.zeros_like(medians))
    scaled = (0.5 * (scores - med) / (thr - med).clamp_min(1e-12)).clamp(0.0, 1.0)
    return torch.where(known, scaled, torch.full_like(scaled, math.nan))


def tail_threshold(distances: np.ndarray | torch.Tensor, rate: float, floor: float = 0.0) -> float:
    """Unknown-category threshold from out-of-sample distances of normal images (see the module docstring).

    ``floor``: a value no distance of this task goes below (0 for squared Mahalanobis distances; the positional
    router's log-likelihood distances have a negative one); the tail is fitted to ``distance - floor``.
    """
    d = np.asarray(distances, dtype=np.float64).ravel() - floor
    if d.size < MIN_ROUTE_IMAGES:
        return math.inf
    roots = np.cbrt(np.clip(d, 0.0, None))
    z = NormalDist().inv_cdf(1.0 - check_rate("unknown_rate", rate))
    fitted = float(roots.mean() + z * roots.std(ddof=1)) ** 3
    return float(max(float(d.max()), fitted)) + floor


def cross_validated_distances(
    features: torch.Tensor, router: float | torch.nn.Module, folds: int = MAX_CV_FOLDS
) -> torch.Tensor:
    """Each row's routing distance to a task fitted on the other folds: (N, ...) -> (N,) float64.

    ``router``: a router whose kind and settings the folds use (``empty_copy()``), or a ridge (float) for the
    prototype router's squared Mahalanobis distances. Folds are interleaved (image i in fold i mod K), so the
    result does not depend on any random draw.
    """
    n = features.shape[0]
    if n < MIN_ROUTE_IMAGES:
        msg = f"Cross-validated routing distances need at least {MIN_ROUTE_IMAGES} images, got {n}."
        raise ValueError(msg)
    k = min(n, folds)
    idx = torch.arange(n)
    out = torch.empty(n, dtype=torch.float64)
    for fold in range(k):
        held, fit = idx[idx % k == fold], idx[idx % k != fold]
        fold_router = (
            PrototypeRouter(features.shape[1], ridge=float(router))
            if isinstance(router, int | float)
            else router.empty_copy()
        )
        fold_router.fit_task(0, features[fit])
        out[held] = fold_router.distances(features[held], 1)[:, 0].cpu()
    return out


def f1_report(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """F1-optimal threshold on labelled test scores (``score > t`` is defective), and the rates at ``threshold``.

    Returns a dict with ``available=False`` and a reason when the labels hold one class only.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_def, n_norm = int(y.sum()), int((~y).sum())
    report: dict[str, Any] = {"test_normal": n_norm, "test_defective": n_def}
    if n_def == 0 or n_norm == 0:
        return {**report, "available": False, "reason": "the test set needs both normal and defective images"}
    candidates = np.concatenate([[-np.inf], np.unique(s)])
    pred = s[None, :] > candidates[:, None]  # (C, N)
    tp = (pred & y).sum(axis=1)
    fp = (pred & ~y).sum(axis=1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (n_def - tp), 1)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # ties: the highest threshold (fewest false alarms)
    report.update(
        available=True,
        # candidate 0 (-inf: every image defective) is reported as the value just below the lowest score
        f1_optimal_threshold=float(candidates[best]) if best > 0 else float(np.nextafter(s.min(), -np.inf)),
        f1_optimal=float(f1[best]),
        precision_at_f1_optimal=float(tp[best] / max(tp[best] + fp[best], 1)),
        recall_at_f1_optimal=float(tp[best] / n_def),
    )
    if threshold is not None:
        p = s > threshold
        tp_c, fp_c = int((p & y).sum()), int((p & ~y).sum())
        report.update(
            fpr_at_threshold=fp_c / n_norm,
            recall_at_threshold=tp_c / n_def,
            f1_at_threshold=2 * tp_c / max(2 * tp_c + fp_c + (n_def - tp_c), 1),
        )
    return report


def outside_own_route(
    distances: torch.Tensor, route_thresholds: torch.Tensor, routed: torch.Tensor | None = None
) -> torch.Tensor:
    """The unknown-category rule: (B, T) distances, (T,) route thresholds -> (B,) bool.

    An image is an unknown category when its distance to the task it is routed to (the nearest) exceeds that
    task's own route threshold: the expert that would judge it never saw anything that far away. (Flagging only
    images beyond *every* task's threshold let an image be judged by an expert whose own threshold it exceeded,
    as long as another task's covered it.) ``routed`` (B,) is the router's choice when the caller has it (the
    nearest task otherwise). Tensor ops only, so it traces into an exported model.
    """
    if routed is None:
        best, routed = distances.min(dim=1)
    else:
        best = distances.gather(1, routed[:, None]).squeeze(1)
    return best > route_thresholds.to(best.dtype).index_select(0, routed)


def routing_report(
    distances: torch.Tensor, task: int, labels: np.ndarray, route_thresholds: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Routing of one task's labelled test images, defect-free and defective apart.

    ``distances`` (N, T) of the images to every task, ``labels`` (N,) 0/1, ``route_thresholds`` (T,): an image
    is an unknown category by :func:`outside_own_route`. Returns, per label
    (``normal``, ``defective``), the image count and the counts and rates of images routed to another task and
    flagged unknown (rates None when there is no image with that label), and the count routed to another task
    without being flagged unknown.
    """
    d = distances.double()
    unknown = outside_own_route(d, route_thresholds.double()).numpy()
    elsewhere = (d.argmin(dim=1) != task).numpy()
    y = np.asarray(labels).ravel().astype(int)
    out: dict[str, dict[str, Any]] = {}
    for kind, label in (("normal", 0), ("defective", 1)):
        keep = y == label
        n = int(keep.sum())
        out[kind] = {
            "images": n,
            "routed_to_other_task": int(elsewhere[keep].sum()),
            "flagged_unknown": int(unknown[keep].sum()),
            "routed_to_other_task_rate": float(elsewhere[keep].mean()) if n else None,
            "unknown_rate": float(unknown[keep].mean()) if n else None,
            # the silent failure: another task's expert and threshold decide, and nothing says "unknown"
            "misrouted_not_unknown": int((elsewhere & ~unknown)[keep].sum()),
        }
    return out
