"""A tiny 3-task run with ``model.flow.router=positional``: training, checkpoints, predict's unknown category."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec
from moleflow.inference import ExportError, MoLEFlowDetector
from moleflow.models.router import PositionalRouter
from moleflow.training.checkpoint import load_checkpoint
from tests.helpers import TINY_OVERRIDES, compose_config

TASKS = ["stripes", "checker", "dots"]
UNSEEN = [c for c in SYNTHETIC_CATEGORIES if c not in TASKS]


@pytest.fixture(scope="module")
def positional_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    from train import train

    out = tmp_path_factory.mktemp("positional_run")
    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null"]
    overrides += ["model.flow.router=positional", "model.flow.router_grid=4"]
    cfg = compose_config(overrides, out)
    return out, train(cfg)


def test_run_routes_with_the_positional_router_and_never_changes_earlier_statistics(positional_run) -> None:
    out, payload = positional_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["model"]["flow"]["router"] == "positional"
    assert metrics["routing"]["by_label"]["defective"]["images"] == 24
    # defect-free images of three generated categories route home (random backbone, 12 training images per task;
    # 2 of the 24 defective ones, scratches, go to "dots" here: docs/routing.md)
    assert metrics["routing"]["by_label"]["normal"]["accuracy"] == 1.0
    first = load_checkpoint(out / "checkpoints" / "task_00_stripes.ckpt").model.router
    last = load_checkpoint(out / "checkpoints" / "last.ckpt").model.router
    assert isinstance(last, PositionalRouter) and last.num_tasks == 3 and last.grid == 4
    assert torch.equal(first.means[0], last.means[0]) and torch.equal(first.variances[0], last.variances[0])


def test_predict_flags_never_trained_categories_and_not_known_ones(
    positional_run, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out, _ = positional_run
    ckpt = tmp_path_factory.mktemp("positional_ckpt") / "last.ckpt"
    shutil.copyfile(out / "checkpoints" / "last.ckpt", ckpt)
    detector = MoLEFlowDetector.load(ckpt)  # calibrates the thresholds (cross-validated routing distances)
    known = [(t, p) for t in TASKS for p in sorted((synthetic_root / t / "test" / "good").glob("*.png"))]
    results = detector.predict([p for _, p in known])
    assert [r.task for r in results] == [t for t, _ in known]
    assert not any(r.is_unknown for r in results)
    unseen_root = tmp_path_factory.mktemp("unseen_positional")
    generate_synthetic_mvtec(unseen_root, categories=UNSEEN, num_train=3, num_test_good=0, num_test_defect=1)
    unseen = sorted(unseen_root.rglob("*/train/good/*.png"))
    assert unseen and all(r.is_unknown for r in detector.predict(unseen))
    with pytest.raises(ExportError, match="prototype router only"):
        detector.export(tmp_path_factory.mktemp("export") / "model.pt")
