"""Continual-learning matrix, forgetting, backward transfer and routing accuracy on hand-made examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moleflow.evaluation import (
    ResultMatrix,
    backward_transfer,
    backward_transfer_per_task,
    final_mean,
    forgetting_measure,
    forgetting_per_task,
    routing_accuracy,
    routing_confusion,
)

NAN = math.nan
# R[j][i]: task i after training task j.
R3 = np.array(
    [
        [0.90, NAN, NAN],
        [0.80, 0.95, NAN],
        [0.70, 0.85, 0.99],
    ]
)


def test_forgetting_and_bwt_hand_computed() -> None:
    # FM: task 0: max(0.90, 0.80) - 0.70 = 0.20; task 1: max(0.95) - 0.85 = 0.10 -> mean 0.15.
    np.testing.assert_allclose(forgetting_per_task(R3), [0.20, 0.10])
    assert forgetting_measure(R3) == pytest.approx(0.15)
    # BWT: (0.70 - 0.90 + 0.85 - 0.95) / 2 = -0.15.
    np.testing.assert_allclose(backward_transfer_per_task(R3), [-0.20, -0.10])
    assert backward_transfer(R3) == pytest.approx(-0.15)
    assert final_mean(R3) == pytest.approx((0.70 + 0.85 + 0.99) / 3)


def test_max_excludes_last_row_so_improvement_is_negative_forgetting() -> None:
    r = np.array([[0.5, NAN], [0.9, 0.8]])
    assert forgetting_measure(r) == pytest.approx(-0.4)
    assert backward_transfer(r) == pytest.approx(0.4)


def test_intermediate_last_row() -> None:
    assert forgetting_measure(R3, last=1) == pytest.approx(0.10)
    assert backward_transfer(R3, last=1) == pytest.approx(-0.10)
    assert final_mean(R3, last=1) == pytest.approx((0.80 + 0.95) / 2)
    assert math.isnan(forgetting_measure(R3, last=0))
    assert math.isnan(backward_transfer(R3, last=0))
    assert final_mean(R3, last=0) == pytest.approx(0.90)
    with pytest.raises(ValueError, match="last"):
        forgetting_measure(R3, last=3)


def test_single_task_is_nan() -> None:
    r = np.array([[0.9]])
    assert math.isnan(forgetting_measure(r)) and math.isnan(backward_transfer(r))
    assert final_mean(r) == pytest.approx(0.9)


def test_nan_entries_propagate_without_crash() -> None:
    r = R3.copy()
    r[2, 0] = NAN  # e.g. an undefined metric for task 0 after task 2
    terms = forgetting_per_task(r)
    assert math.isnan(terms[0]) and terms[1] == pytest.approx(0.10)
    assert math.isnan(forgetting_measure(r))
    assert math.isnan(backward_transfer(r))
    assert math.isnan(final_mean(r))


def test_result_matrix_roundtrip() -> None:
    m = ResultMatrix(3)
    for j in range(3):
        for i in range(j + 1):
            m.set(j, i, R3[j, i])
    np.testing.assert_array_equal(m.as_array(), R3)
    np.testing.assert_array_equal(m.row(1), R3[1])
    assert forgetting_measure(m) == pytest.approx(0.15)
    payload = json.dumps(m.to_json())  # JSON-safe: None instead of NaN
    assert "NaN" not in payload
    assert m.to_json()[0] == [0.90, None, None]
    np.testing.assert_array_equal(ResultMatrix.from_json(json.loads(payload)).as_array(), R3)
    with pytest.raises(IndexError, match="i <= j"):
        m.set(0, 1, 0.5)
    with pytest.raises(IndexError):
        m.set(3, 0, 0.5)
    with pytest.raises(ValueError):
        ResultMatrix(0)


def test_routing_confusion_and_accuracy() -> None:
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    pred = torch.tensor([0, 0, 1, 1, 1, 2, 0, 2, 2])
    conf = routing_confusion(true, pred, num_tasks=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0], expected[0, 1] = 2, 1
    expected[1, 1] = 2
    expected[2, 2], expected[2, 0] = 3, 1
    np.testing.assert_array_equal(conf, expected)
    assert conf.dtype == np.int64
    overall, per_task = routing_accuracy(conf)
    assert overall == pytest.approx(7 / 9)
    assert per_task[:3] == pytest.approx([2 / 3, 1.0, 3 / 4])
    assert math.isnan(per_task[3])  # no images of task 3


def test_routing_errors() -> None:
    with pytest.raises(ValueError, match="outside"):
        routing_confusion([0, 3], [0, 1], num_tasks=3)
    with pytest.raises(ValueError, match="length"):
        routing_confusion([0, 1], [0], num_tasks=3)
    with pytest.raises(ValueError, match="integer"):
        routing_confusion(np.array([0.0, 1.0]), [0, 1], num_tasks=3)
    overall, per_task = routing_accuracy(np.zeros((2, 2), dtype=np.int64))
    assert math.isnan(overall) and all(math.isnan(v) for v in per_task)
