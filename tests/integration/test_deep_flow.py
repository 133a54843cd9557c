"""Deep flows may collapse: the run must finish and report, never crash."""

from __future__ import annotations

import json

from tests.helpers import TINY_OVERRIDES, compose_config


def _run(tmp_path, synthetic_root, extra: list[str]):
    from train import train

    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null", "data.categories=[stripes,dots]"]
    return train(compose_config([*overrides, *extra], tmp_path))


def test_twenty_coupling_layers_finish_and_report(tmp_path, synthetic_root) -> None:
    payload = _run(tmp_path, synthetic_root, ["ncl=20"])
    assert payload["status"] == "finished"
    assert payload["config"]["model"]["flow"]["ncl"] == 20
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "finished" and set(metrics["per_task"]) == {"stripes", "dots"}


def test_diverging_training_is_reported_with_a_warning(tmp_path, synthetic_root) -> None:
    """An absurd learning rate blows the flow up: batches are skipped, scores sanitised, all counted."""
    payload = _run(tmp_path, synthetic_root, ["ncl=20", "model.optimizer.lr=1e6", "training.epochs=2"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["status"] == "finished" and metrics["status"] == "finished"
    assert metrics["warnings"], "a collapse must come with a warning"
    text = " ".join(metrics["warnings"])
    assert any(word in text for word in ("skipped", "non-finite", "chance"))


def test_task_that_cannot_train_is_marked_diverged_and_the_run_goes_on(tmp_path, synthetic_root) -> None:
    """Every batch above the loss guard: the task trains nothing, is marked diverged, the run finishes."""
    payload = _run(tmp_path, synthetic_root, ["model.loss.max_loss=0", "logger=csv"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["status"] == "finished"
    for name in ("stripes", "dots"):
        assert "could not train" in metrics["per_task"][name]["diverged"]
        assert metrics["health"]["skipped_batches"][name] == metrics["health"]["attempted_batches"][name] > 0
    assert any("diverged" in w for w in metrics["warnings"])
    assert "(diverged)" in (tmp_path / "results_table.txt").read_text()
    header = next(tmp_path.glob("csv/**/metrics.csv")).read_text().splitlines()[0]
    assert "task/stripes/diverged" in header
