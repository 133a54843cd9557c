"""A tiny 3-task run with ``model/router=nearest``: the banks in the checkpoints (each task's own, never changed by a
later one), resume and the detector load them back, and predict routes home."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moleflow.inference import MoLEFlowDetector
from moleflow.models.router import NearestRouter
from moleflow.training.module_checkpoints import load_checkpoint
from tests.helpers import TINY_OVERRIDES, compose_config

TASKS = ["stripes", "checker", "dots"]


@pytest.fixture(scope="module")
def nearest_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    from train import train

    out = tmp_path_factory.mktemp("nearest_run")
    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null"]
    overrides += ["model/router=nearest", "training.calibration_share=0.25"]
    train(compose_config(overrides, out))
    return out


def test_run_stores_each_tasks_bank_and_routes_home(nearest_run: Path, synthetic_root: Path) -> None:
    metrics = json.loads((nearest_run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["model"]["flow"]["router"] == "nearest"
    assert metrics["routing"]["by_label"]["normal"]["accuracy"] == 1.0
    first = load_checkpoint(nearest_run / "checkpoints" / "task_00_stripes.ckpt").model.router
    last = load_checkpoint(nearest_run / "checkpoints" / "last.ckpt").model.router
    assert isinstance(last, NearestRouter) and last.num_tasks == 3 and last.neighbors == 1
    assert last.train_counts.tolist() == [9, 9, 9]  # 3 of 12 images per task held out for the thresholds
    assert torch.equal(first.bank[0, :9], last.bank[0, :9])
    detector = MoLEFlowDetector.load(nearest_run / "checkpoints" / "last.ckpt")
    for t, task in enumerate(TASKS):
        images = sorted((synthetic_root / task / "test" / "good").glob("*.png"))
        assert [r.task_index for r in detector.predict(images)] == [t] * len(images)
