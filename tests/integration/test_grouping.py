"""Task grouping: several categories in one task, with routing and metrics per task and per category."""

from __future__ import annotations

import json

from moleflow.evaluation.metrics import METRIC_NAMES
from tests.helpers import TINY_OVERRIDES, compose_config


def test_two_categories_in_one_task_report_per_category(tmp_path, synthetic_root) -> None:
    from train import train

    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null", "data.task_groups=2-1"]
    train(compose_config(overrides, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tasks"] == ["stripes+checker", "dots"]
    assert metrics["per_task"]["stripes+checker"]["num_test_images"] == 24
    per_category = metrics["per_category"]
    assert set(per_category) == {"stripes", "checker", "dots"}
    assert per_category["checker"]["task"] == "stripes+checker"
    assert per_category["checker"]["num_test_images"] == 12
    assert set(per_category["dots"]["routed"]) == set(METRIC_NAMES)
    assert metrics["routing"]["confusion"][0][0] + metrics["routing"]["confusion"][0][1] == 24
