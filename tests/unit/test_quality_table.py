"""`make quality`'s table files: means over the tasks that have a metric, and standard JSON despite NaN details."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from experiments.tables import quality_table as table


def _result() -> dict:
    per_task = {
        "mono": {"image_auroc": 0.9, "pixel_auroc": None, "pixel_aupro": None, "routing_accuracy": 1.0},
        "tile": {"image_auroc": 0.7, "pixel_auroc": 0.8, "pixel_aupro": 0.5, "routing_accuracy": 1.0},
    }
    method = {
        "label": "PatchCore per task",
        "key": "patchcore",
        "description": "baseline",
        "per_task": per_task,
        "mean": table.method_mean(per_task),
        "wall_s": 60.0,
        # what run_patchcore_task returns for a task without masks: NaN pixel metrics in the details
        "details": {"mono": {"metrics": {"pixel_auroc": math.nan}, "memory_bank": [10, 4]}},
    }
    return {
        "title": "t",
        "command": "python experiments/quality.py",
        "machine": "m",
        "data": "d",
        "started": "s",
        "finished": "f",
        "methods": [method],
        "notes": ["n"],
    }


def test_means_use_the_tasks_that_have_the_metric() -> None:
    mean = table.method_mean(_result()["methods"][0]["per_task"])
    assert mean["image_auroc"] == pytest.approx(0.8) and mean["image_auroc_tasks"] == 2
    assert mean["pixel_auroc"] == pytest.approx(0.8) and mean["pixel_auroc_tasks"] == 1


def test_files_are_written_and_json_has_null_for_nan(tmp_path: Path) -> None:
    paths = table.write(_result(), tmp_path)
    data = json.loads(paths["json"].read_text())  # standard JSON: would raise on a bare NaN token
    assert data["methods"][0]["details"]["mono"]["metrics"]["pixel_auroc"] is None
    assert "NaN" not in paths["json"].read_text()
    with paths["csv"].open() as f:
        flat = list(csv.DictReader(f))
    assert [r["task"] for r in flat] == ["mono", "tile", "mean"]
    assert "| PatchCore per task | mono | 90.00 | n/a |" in paths["md"].read_text()


def test_diverged_tasks_are_left_out_of_the_mean_and_said_so(tmp_path: Path) -> None:
    result = _result()
    method = result["methods"][0]
    method["per_task"]["lost"] = {"image_auroc": 0.1, "pixel_auroc": 0.2, "diverged": "loss NaN at every step"}
    method["mean"] = table.method_mean(method["per_task"])
    assert method["mean"]["image_auroc"] == pytest.approx(0.8) and method["mean"]["excluded"] == ["lost"]
    md = table.write(result, tmp_path)["md"].read_text()
    assert "| lost (diverged) | 10.00 |" in md and "**mean** (2 of 3)" in md
    assert "leaves out the tasks marked diverged (lost)" in md
