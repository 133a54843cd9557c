"""A budget in optimizer steps per task (training.steps) instead of epochs, and the loss-curve summary."""

from __future__ import annotations

import json

import pytest
from hydra.errors import ConfigCompositionException

from moleflow.config.schema import TrainingConfig
from moleflow.training.optim import lr_factor
from moleflow.training.task_fit import loss_curve_summary, task_length
from tests.helpers import TINY_OVERRIDES, compose_config


def test_task_length_from_epochs_or_steps() -> None:
    assert task_length(TrainingConfig(epochs=8, steps=None), 12) == (8, -1)
    assert task_length(TrainingConfig(epochs=8), 12) == (8, -1)
    assert task_length(TrainingConfig(epochs=8, steps=300), 12) == (25, 300)
    assert task_length(TrainingConfig(epochs=8, steps=5), 12) == (1, 5)


def test_loss_curve_summary_tells_a_plateau() -> None:
    falling = [100.0 - i for i in range(50)]
    flat = [10.0] * 50
    assert loss_curve_summary(falling)["plateau"] is False
    assert loss_curve_summary(falling)["last_fifth_drop"] == pytest.approx((65.5 - 55.5) / 65.5)
    assert loss_curve_summary(flat)["plateau"] is True
    assert loss_curve_summary([3.0])["steps"] == 1


def test_each_task_trains_exactly_the_step_budget(tmp_path, synthetic_root) -> None:
    from train import train

    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null", "training.steps=7"]
    overrides += ["data.categories=[stripes,dots]", "report.figures=false"]
    cfg = compose_config(overrides, tmp_path / "run")
    payload = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("stripes", "dots"):  # 12 images at batch 4: 3 steps per epoch, so 7 steps span 3 epochs
        assert metrics["training"][name]["steps"] == 7
    assert payload["status"] == "finished"


def test_step_schedule_is_a_cosine_over_steps_with_warmup_epochs_of_steps() -> None:
    # a later task (warm-up 2 epochs) of 12 steps per epoch and a 300-step budget: warm-up over 24 steps
    assert lr_factor(0, 300, 24, 0.01) == pytest.approx(1 / 24)
    assert lr_factor(23, 300, 24, 0.01) == pytest.approx(1.0)
    assert lr_factor(299, 300, 24, 0.01) == pytest.approx(0.01)


def test_bad_step_budget_is_named(tmp_path) -> None:
    from moleflow.config.checks import config_problems

    cfg = compose_config([*TINY_OVERRIDES, "training.steps=0"], tmp_path)
    assert any(p.startswith("training.steps must be null") for p in config_problems(cfg))
    for bad in ("2.5", "true"):  # the wrong type is refused by the schema while composing, naming the key
        with pytest.raises(ConfigCompositionException, match=r"training\.steps"):
            compose_config([*TINY_OVERRIDES, f"training.steps={bad}"], tmp_path)
