"""Ranking metrics must equal scikit-learn on raw scores, ties included, and never squash scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from moleflow.evaluation import (
    METRIC_NAMES,
    TaskMetrics,
    binary_auroc,
    binary_auroc_ap,
    binary_average_precision,
    compute_task_metrics,
)

TOL = 1e-9


def _assert_matches_sklearn(scores, labels) -> None:
    s_np = scores.numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    y_np = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    ref_auc = roc_auc_score(y_np, s_np)
    ref_ap = average_precision_score(y_np, s_np)
    assert binary_auroc(scores, labels) == pytest.approx(ref_auc, abs=TOL)
    assert binary_average_precision(scores, labels) == pytest.approx(ref_ap, abs=TOL)
    auc, ap = binary_auroc_ap(scores, labels)
    assert auc == pytest.approx(ref_auc, abs=TOL)
    assert ap == pytest.approx(ref_ap, abs=TOL)


@pytest.mark.parametrize("seed", range(5))
def test_random_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 2000)
    scores = rng.random(2000) + 0.3 * labels
    _assert_matches_sklearn(scores, labels)


@pytest.mark.parametrize("n_levels", [1, 2, 3, 10, 50])
def test_many_ties(n_levels: int) -> None:
    rng = np.random.default_rng(n_levels)
    labels = rng.integers(0, 2, 3000)
    scores = rng.integers(0, n_levels, 3000).astype(np.float64) + (labels * rng.integers(0, 2, 3000))
    _assert_matches_sklearn(scores, labels)


def test_all_scores_tied_is_half() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.full(5, 7.0)
    assert binary_auroc(scores, labels) == 0.5
    _assert_matches_sklearn(scores, labels)


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_nll_scale_scores(scale: float) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 5000)
    scores = scale * (300 + 50 * rng.standard_normal(5000) + 30 * labels)
    _assert_matches_sklearn(scores, labels)
    big = 1e5 + rng.standard_normal(5000) + labels
    _assert_matches_sklearn(big, labels)


def test_float32_and_float64_agree_with_sklearn() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 4000).astype(bool)
    scores64 = 300 + 50 * rng.standard_normal(4000) + 20 * labels
    scores32 = scores64.astype(np.float32)  # float32 rounding creates ties of its own
    _assert_matches_sklearn(scores64, labels)
    _assert_matches_sklearn(scores32, labels)


def test_torch_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (3000,), generator=gen)
    scores = 500 + 40 * torch.randn(3000, generator=gen) + 15 * labels
    _assert_matches_sklearn(scores, labels)
    _assert_matches_sklearn(scores.double(), labels.bool())
    auc_bf16 = binary_auroc(scores.bfloat16(), labels)  # numpy lacks bfloat16: converted, not rejected
    assert 0.5 < auc_bf16 <= 1.0


def test_perfect_and_inverted_ranking() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([100.0, 200.0, 300.0, 400.0, 500.0])
    assert binary_auroc(scores, labels) == 1.0
    assert binary_average_precision(scores, labels) == 1.0
    assert binary_auroc(-scores, labels) == 0.0
    _assert_matches_sklearn(-scores, labels)


@pytest.mark.parametrize("labels", [np.zeros(6, dtype=int), np.ones(6, dtype=int)])
def test_single_class_is_nan(labels: np.ndarray) -> None:
    scores = np.arange(6, dtype=np.float32)
    assert math.isnan(binary_auroc(scores, labels))
    assert math.isnan(binary_average_precision(scores, labels))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad: float) -> None:
    scores = np.array([1.0, 2.0, bad, 4.0, bad])
    labels = np.array([0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"2 non-finite.*sanitise"):
        binary_auroc(scores, labels)
    with pytest.raises(ValueError, match="non-finite"):
        binary_average_precision(torch.from_numpy(scores), labels)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        binary_auroc(np.ones(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        binary_auroc(np.arange(3.0), np.array([0, 0.7, 1]))
    with pytest.raises(ValueError, match="1-D"):
        binary_auroc(np.ones((2, 2)), np.array([0, 1, 0, 1]))


def test_torchmetrics_sigmoid_trap() -> None:
    """torchmetrics squashes raw NLL scores through a sigmoid: all become 1.0 and AUROC 0.5."""
    tm = pytest.importorskip("torchmetrics.classification")
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 2, (1000,), generator=gen)
    scores = 300 + 50 * torch.randn(1000, generator=gen) + 40 * labels
    metric = tm.BinaryAUROC()
    metric.update(scores, labels)
    assert float(metric.compute()) == pytest.approx(0.5)
    assert binary_auroc(scores, labels) > 0.6  # raw ranking keeps the signal


def test_compute_task_metrics_image_and_pixel() -> None:
    rng = np.random.default_rng(5)
    image_labels = np.array([0, 0, 1, 1, 0, 1])
    image_scores = torch.tensor(300 + 10 * rng.standard_normal(6) + 20 * image_labels, dtype=torch.float32)
    masks = torch.zeros(6, 8, 8)
    masks[2, 2:5, 2:5] = 1.0
    masks[3, 0:2, :] = 0.8  # soft mask values binarise at 0.5
    masks[5, 6:, 6:] = 0.3  # below threshold: stays normal
    pixel_scores = torch.from_numpy(400 + 30 * rng.standard_normal((6, 8, 8))).float() + 25 * masks

    result = compute_task_metrics(image_scores, image_labels, pixel_scores, masks)
    assert isinstance(result, TaskMetrics)
    flat_y = (masks > 0.5).reshape(-1).numpy()
    flat_s = pixel_scores.reshape(-1).numpy()
    assert result.image_auroc == pytest.approx(roc_auc_score(image_labels, image_scores.numpy()), abs=TOL)
    assert result.image_ap == pytest.approx(average_precision_score(image_labels, image_scores.numpy()), abs=TOL)
    assert result.pixel_auroc == pytest.approx(roc_auc_score(flat_y, flat_s), abs=TOL)
    assert result.pixel_ap == pytest.approx(average_precision_score(flat_y, flat_s), abs=TOL)
    assert tuple(result.as_dict()) == METRIC_NAMES

    numpy_result = compute_task_metrics(image_scores.numpy(), image_labels, pixel_scores.numpy(), masks.numpy())
    assert numpy_result == result


def test_compute_task_metrics_without_pixels() -> None:
    result = compute_task_metrics(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1]))
    assert result.image_auroc == 1.0
    assert math.isnan(result.pixel_auroc) and math.isnan(result.pixel_ap)


def test_compute_task_metrics_errors() -> None:
    scores, labels = np.array([1.0, 2.0]), np.array([0, 1])
    with pytest.raises(ValueError, match="pixel_masks is None"):
        compute_task_metrics(scores, labels, np.zeros((2, 4, 4)), None)
    with pytest.raises(ValueError, match="shape"):
        compute_task_metrics(scores, labels, np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def test_f1_max_equals_scikit_learn_on_images_and_pixels() -> None:
    from sklearn.metrics import precision_recall_curve

    from moleflow.evaluation.metrics import image_metrics, pixel_metrics

    def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
        precision, recall, _ = precision_recall_curve(labels, scores)
        total = precision + recall
        return float(np.max(np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0)))

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounded: many ties
    assert image_metrics(scores, labels)[2] == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:6, 2:6] = masks[2, 7:11, 1:4] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    f1 = pixel_metrics(maps, masks)[3]
    assert f1 == pytest.approx(sklearn_f1_max(maps.reshape(-1), masks.reshape(-1)), abs=1e-12)
    assert math.isnan(image_metrics(scores, np.zeros(500))[2])
