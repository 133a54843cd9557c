"""Verdicts a person can read: the normalised score, the pixel threshold from held-out normals, the defect mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moleflow.inference.masks import mask_at_original, outline, regions
from moleflow.thresholds.fitting import normalized_score, pixel_threshold
from moleflow.thresholds.held_out import fit_task_thresholds


def test_normalised_score_is_one_half_at_the_threshold_and_monotone() -> None:
    thr, median = torch.tensor([218.6], dtype=torch.float64), torch.tensor([150.0], dtype=torch.float64)
    scores = torch.linspace(100.0, 400.0, 301, dtype=torch.float64)
    n = normalized_score(scores, thr.expand(301), median.expand(301))
    assert normalized_score(thr, thr, median).item() == 0.5  # exactly, not approximately
    assert torch.all(n[1:] >= n[:-1])  # monotone
    assert n.min() == 0.0 and n.max() == 1.0  # clipped: 0 at or below the median, 1 from 2 thr - median on
    assert normalized_score(median, thr, median).item() == 0.0
    assert normalized_score(torch.tensor([287.2], dtype=torch.float64), thr, median).item() == pytest.approx(1.0)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    assert math.isnan(normalized_score(torch.tensor([500.0]), inf, median).item())  # not calibrated: none
    assert math.isnan(normalized_score(thr, thr, torch.tensor([math.nan])).item())  # no stored median: none


def test_pixel_threshold_comes_from_the_held_out_normals_only() -> None:
    gen = torch.Generator().manual_seed(0)
    held_maps = torch.rand(10, 16, 16, generator=gen)  # the held-out normals' pixel maps
    cal = fit_task_thresholds(
        torch.rand(10, generator=gen, dtype=torch.float64),
        torch.rand(10, generator=gen, dtype=torch.float64),
        0.0,
        0.01,
        0.01,
        held_maps,
    )
    values = np.sort(held_maps.reshape(-1).numpy())
    assert cal.pixel_threshold == float(values[values.size - 1 - int(0.01 * values.size)])
    assert cal.pixel_fpr == pytest.approx(0.01, abs=1 / values.size) and cal.pixel_images == 10
    assert cal.pixel_threshold == pixel_threshold(held_maps, 0.01)[0]
    assert cal.score_median is not None


def test_the_mask_at_the_original_size_with_its_area_and_boxes() -> None:
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:3, 1:4] = True  # one region
    mask[6, 6] = True  # another, one model pixel
    big = mask_at_original(mask, (16, 32))  # H 16, W 32: each model pixel is 2 x 4 original pixels
    assert big.shape == (16, 32) and big.sum() == (2 * 3 + 1) * 8
    area, boxes = regions(big)
    assert area == 56 and boxes == [[4, 2, 15, 5], [24, 12, 27, 13]]  # x_min, y_min, x_max, y_max; largest first
    edge = outline(big)
    assert edge.sum() < big.sum() and not (edge & ~big).any()
    assert regions(np.zeros((4, 4), dtype=bool)) == (0, [])
