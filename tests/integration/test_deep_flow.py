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


def _mean_of_included(metrics: dict, metric: str = "image_auroc") -> float | None:
    values = [row["routed"][metric] for row in metrics["per_task"].values() if row["in_means"]]
    return sum(values) / len(values) if values else None


def test_diverging_training_is_marked_and_left_out_of_the_means(tmp_path, synthetic_root) -> None:
    """An absurd learning rate: one step turns the weights non-finite, later batches are skipped, every
    score is NaN (task dots, on the NaN base, cannot train at all). Both tasks are marked, no mean is
    computed from replaced NaNs, and the run finishes."""
    payload = _run(tmp_path, synthetic_root, ["ncl=20", "model.optimizer.lr=1e6", "training.epochs=2"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["status"] == "finished" and metrics["status"] == "finished"
    assert "non-finite scores" in metrics["per_task"]["stripes"]["diverged"]
    assert "could not train" in metrics["per_task"]["dots"]["diverged"]
    for name in ("stripes", "dots"):
        assert not metrics["per_task"][name]["in_means"]
        assert metrics["per_task"][name]["nonfinite_scores"]["oracle"] > 0
        assert metrics["health"]["skipped_batches"][name] > 0
    assert metrics["means"] == {**metrics["means"], "averaged": 0, "of": 2, "tasks": []}
    assert metrics["final"]["routed"]["image_auroc"] is None and metrics["final"]["oracle"]["pixel_auroc"] is None
    assert "the means average 0 of 2 tasks: []" in metrics["warnings"]
    assert "mean (0 of 2 tasks)" in (tmp_path / "results_table.txt").read_text()


def test_non_finite_scores_of_one_task_leave_it_out_of_the_means(tmp_path, synthetic_root, monkeypatch) -> None:
    """Task dots' expert gives NaN patches: dots is marked with the count, the means average stripes alone."""
    from moleflow.models.moleflow import MoLEFlowModel

    healthy = MoLEFlowModel.nll_routed

    def broken_expert(self, features, tasks):  # noqa: ANN001, ANN202
        nll = healthy(self, features, tasks)
        nll[tasks == 1, 0, :2] = float("nan")  # two patches of every image scored by expert 1
        return nll

    monkeypatch.setattr(MoLEFlowModel, "nll_routed", broken_expert)
    _run(tmp_path, synthetic_root, [])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    dots, stripes = metrics["per_task"]["dots"], metrics["per_task"]["stripes"]
    assert "non-finite scores on its test set after task dots" in dots["diverged"] and not dots["in_means"]
    assert dots["nonfinite_scores"]["oracle"] == 2 * dots["num_test_images"]
    assert stripes["in_means"] and stripes["diverged"] is None and stripes["nonfinite_scores"]["routed"] == 0
    assert metrics["means"]["tasks"] == ["stripes"] and (metrics["means"]["averaged"], metrics["means"]["of"]) == (1, 2)
    assert metrics["final"]["routed"]["image_auroc"] == _mean_of_included(metrics) == stripes["routed"]["image_auroc"]
    assert any("dots diverged and is left out of the means" in w for w in metrics["warnings"])
    table = (tmp_path / "results_table.txt").read_text()
    assert "dots (diverged)" in table and "mean (1 of 2 tasks)" in table


def test_task_that_cannot_train_is_marked_diverged_and_the_run_goes_on(tmp_path, synthetic_root) -> None:
    """Every batch above the loss guard: the task trains nothing, is marked diverged, the run finishes."""
    payload = _run(tmp_path, synthetic_root, ["model.loss.max_loss=1e-9", "logger=csv"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["status"] == "finished"
    for name in ("stripes", "dots"):
        assert "could not train" in metrics["per_task"][name]["diverged"]
        assert not metrics["per_task"][name]["in_means"]
        assert metrics["health"]["skipped_batches"][name] == metrics["health"]["attempted_batches"][name] > 0
    assert metrics["means"]["averaged"] == 0 and metrics["final"]["routed"]["image_auroc"] is None
    assert any("diverged" in w for w in metrics["warnings"])
    assert "(diverged)" in (tmp_path / "results_table.txt").read_text()
    header = next(tmp_path.glob("csv/**/metrics.csv")).read_text().splitlines()[0]
    assert "task/stripes/diverged" in header and "mean/tasks_averaged" in header
