"""Per-image score records: the binned pixel AUROC matches the exact one, intervals cover the estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from moleflow.evaluation.score_records import (
    ScoreRecord,
    binned_auroc,
    bootstrap,
    example_indices,
    read_records,
    score_record,
    write_records,
)


def _task(seed: int, n: int = 40, size: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 0).astype(int)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    maps = rng.normal(0.0, 1.0, (n, size, size)).astype(np.float32)
    for i in np.flatnonzero(labels):
        masks[i, 5:12, 6:14] = 1
        maps[i, 5:12, 6:14] += 1.5  # the defect scores higher
    scores = maps.reshape(n, -1).max(axis=1) + rng.normal(0, 0.3, n)
    return scores, labels, maps, masks


def test_binned_pixel_auroc_is_close_to_the_exact_one() -> None:
    scores, labels, maps, masks = _task(0)
    record = score_record(scores, labels, maps, masks)
    counts = record.pixel_counts.sum(axis=0)
    exact = roc_auc_score(masks.reshape(-1), maps.reshape(-1))
    assert binned_auroc(counts[0], counts[1]) == pytest.approx(exact, abs=1e-3)
    assert record.pixel_counts.sum() == maps.size  # every pixel counted once
    assert binned_auroc(np.array([3, 0]), np.array([0, 2])) == 1.0 and binned_auroc(np.array([1]), np.array([1])) == 0.5


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_images() -> None:
    small = {f"t{i}": score_record(*_task(i, n=30)) for i in range(2)}
    large = {f"t{i}": score_record(*_task(i, n=300)) for i in range(2)}
    a, b = bootstrap(small, samples=200), bootstrap(large, samples=200)
    for name, rec in small.items():
        lo, hi = a["per_task"][name]["image_auroc"]
        assert lo <= roc_auc_score(rec.labels, rec.image_scores) <= hi
        assert a["per_task"][name]["pixel_auroc"][0] < a["per_task"][name]["pixel_auroc"][1]
    width = lambda r: r["mean"]["image_auroc"][1] - r["mean"]["image_auroc"][0]  # noqa: E731
    assert width(b) < width(a)
    no_masks = {"cells": score_record([0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1])}
    assert bootstrap(no_masks, samples=20)["per_task"]["cells"]["pixel_auroc"] is None


def test_records_round_trip_and_pick_the_same_examples(tmp_path: Path) -> None:
    scores, labels, maps, masks = _task(1)
    record = score_record(scores, labels, maps, masks)
    write_records({"bottle": record}, tmp_path)
    back = read_records(tmp_path)["bottle"]
    assert isinstance(back, ScoreRecord)
    for field in ("labels", "image_scores", "pixel_edges", "pixel_counts", "example_indices", "example_maps"):
        assert np.array_equal(getattr(back, field), getattr(record, field))
    picked = example_indices(labels)
    assert list(labels[picked]).count(1) == 3 and list(labels[picked]).count(0) == 1
    assert np.array_equal(back.example_maps, maps[picked])
