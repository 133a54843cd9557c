"""AUPRO's parts: each defect pixel's share of its region, and the PRO curve and its area from grouped counts.

The counts (per distinct score, descending) come from :mod:`moleflow.evaluation.metrics`, which sorts once for
AUROC, AP and AUPRO together.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def region_overlap_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel AUPRO increments of binary masks (N, H, W): 1 / size of the pixel's defect region, 0 outside.

    Regions are the 8-connected components of each image's mask (as anomalib's OpenCV labelling), so a
    pixel's weight is its share of its region; summed over the pixels above a threshold and divided by
    the number of regions, the weights give the mean per-region overlap. Returns (weights (N*H*W,)
    float32, number of regions).
    """
    weights = np.zeros(masks.shape, dtype=np.float32)
    regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=structure)
        if count:
            sizes = np.bincount(labelled.ravel())
            inverse = np.zeros(count + 1, dtype=np.float32)
            inverse[1:] = 1.0 / sizes[1:]
            weights[i] = inverse[labelled]
            regions += count
    return weights.reshape(-1), regions


def pro_curve_from_counts(
    neg: np.ndarray, overlap: np.ndarray, n_neg: int, regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve (global FPR over defect-free pixels, mean per-region overlap) from per-threshold groups
    (descending scores), starting at (0, 0); both clipped at 1."""
    fpr = np.concatenate([[0.0], np.cumsum(neg, dtype=np.float64) / n_neg])
    pro = np.concatenate([[0.0], np.cumsum(overlap) / regions])
    np.minimum(fpr, 1.0, out=fpr)
    np.minimum(pro, 1.0, out=pro)
    return fpr, pro


def aupro_from_counts(neg: np.ndarray, overlap: np.ndarray, n_neg: int, regions: int, fpr_limit: float) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` from per-threshold groups (descending scores).

    The curve is (global FPR over defect-free pixels, mean per-region overlap); the point at the limit
    is interpolated linearly, the area is the trapezoidal one divided by the limit (1.0 = perfect), as
    in MVTec's and anomalib's definition. Sums are kept in float64 (anomalib's float32 running sums are
    exact only up to 2**24 counted pixels, about 330 images of 224 x 224).
    """
    fpr, pro = pro_curve_from_counts(neg, overlap, n_neg, regions)
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    if inside < len(fpr) and x[-1] < fpr_limit:
        f1, f2, p1, p2 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        x = np.append(x, fpr_limit)
        y = np.append(y, p1 + (p2 - p1) * (fpr_limit - f1) / (f2 - f1))
    return float(trapezoid(y, x) / x[-1]) if x[-1] > 0 else math.nan


def trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal area under y(x), written out: numpy names it ``trapz`` before 2.0 and ``trapezoid`` after."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))
