"""AUPRO (area under the per-region overlap curve up to 30 % FPR) against anomalib's and against hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moleflow.evaluation.metrics import compute_task_metrics, pixel_metrics, region_overlap_weights


def _anomalib_aupro(scores: torch.Tensor, masks: torch.Tensor) -> float:
    aupro_module = pytest.importorskip("anomalib.metrics.aupro")
    metric = aupro_module._AUPRO(fpr_limit=0.3)
    metric.update(scores, masks.int())
    return float(metric.compute())


def _random_case(seed: int, ties: bool, empty_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, h, w = 6, 40, 40
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        for _ in range(1 + seed % 3):  # several regions per image, of different sizes
            y, x = torch.randint(0, h - 9, (2,), generator=g).tolist()
            masks[i, y : y + 2 + seed, x : x + 6] = True
    if empty_first:
        masks[0] = False
    scores = torch.rand(n, h, w, generator=g) + masks * 0.4 * torch.rand(n, h, w, generator=g)
    if ties:
        scores = (scores * 8).round() / 8
    return scores, masks


@pytest.mark.parametrize(("seed", "ties", "empty_first"), [(0, False, False), (1, True, False), (2, False, True)])
def test_aupro_equals_anomalibs_on_known_maps(seed: int, ties: bool, empty_first: bool) -> None:
    scores, masks = _random_case(seed, ties, empty_first)
    ours = pixel_metrics(scores, masks)[2]
    assert ours == pytest.approx(_anomalib_aupro(scores, masks), abs=1e-6)


def test_aupro_hand_counts() -> None:
    """One image, two regions; the curve's points counted by hand."""
    masks = np.zeros((1, 2, 6), dtype=bool)
    masks[0, 0, :2] = True  # region A: 2 pixels
    masks[0, 1, 5] = True  # region B: 1 pixel (not 8-connected to A)
    # descending scores: A's first pixel, then a background pixel, then B, then the rest of A, then background
    scores = np.zeros((1, 2, 6), dtype=np.float32)
    scores[0, 0, 0], scores[0, 1, 0], scores[0, 1, 5], scores[0, 0, 1] = 9, 8, 7, 6
    # 9 background pixels. PRO points: (0, 0.25) -> (1/9, 0.25) -> (1/9, 0.75) -> (1/9, 1.0) -> (2/9, 1) ...
    # area up to 0.3: 0.25 * 1/9 + 1.0 * (0.3 - 1/9), divided by 0.3
    expected = (0.25 / 9 + (0.3 - 1 / 9)) / 0.3
    assert pixel_metrics(scores, masks)[2] == pytest.approx(expected, abs=1e-12)
    weights, regions = region_overlap_weights(masks)
    assert regions == 2 and weights.reshape(2, 6)[0, 0] == pytest.approx(0.5) and weights.reshape(2, 6)[1, 5] == 1.0


def test_perfect_maps_give_one_and_no_defect_gives_nan() -> None:
    scores, masks = _random_case(3, False, False)
    assert pixel_metrics(masks.float() + 0.01 * scores, masks)[2] == pytest.approx(1.0)
    assert math.isnan(pixel_metrics(scores, torch.zeros_like(masks))[2])


def test_task_metrics_report_aupro_with_the_pixel_metrics() -> None:
    scores, masks = _random_case(4, False, False)
    labels = torch.tensor([1, 1, 1, 1, 1, 0])
    result = compute_task_metrics(torch.arange(6.0), labels, scores, masks)
    assert result.pixel_aupro == pytest.approx(_anomalib_aupro(scores, masks), abs=1e-6)
    assert math.isnan(compute_task_metrics(torch.arange(6.0), labels).pixel_aupro)


def test_aupro_needs_no_numpy_2_function(monkeypatch) -> None:
    """pyproject allows numpy >= 1.24, which has no ``np.trapezoid``: AUPRO must not call it."""
    import numpy as np

    from moleflow.evaluation.metrics import pixel_metrics

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 3:7, 3:7] = masks[1, 8:12, 2:6] = True
    scores = rng.normal(size=masks.shape) + 2.0 * masks
    expected = pixel_metrics(scores, masks)[2]
    monkeypatch.delattr(np, "trapezoid", raising=False)
    assert pixel_metrics(scores, masks)[2] == expected
