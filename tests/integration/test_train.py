"""End to end: train(cfg) on generated data with a tiny random backbone."""

from __future__ import annotations

import json

import pytest
import torch

from moleflow.assembly.builders import build_datamodule, build_extractor
from moleflow.evaluation.evaluate import EvaluationSpec, evaluate_task
from moleflow.evaluation.metrics import METRIC_NAMES
from moleflow.training.feature_cache import FeatureCache
from moleflow.training.module_checkpoints import load_checkpoint

TASKS = ["stripes", "checker", "dots"]


def test_metrics_json_is_complete(tiny_run) -> None:
    _, out, _ = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished"
    assert m["tasks"] == TASKS
    assert m["config"]["ncl"] == 2 and "model" in m["config"]
    assert "ncl=2" in m["run"]["overrides"]
    for mode in ("routed", "oracle"):
        for name in METRIC_NAMES:
            assert isinstance(m["final"][mode][name], float)
            R = m["matrices"][mode][name]
            assert len(R) == 3 and all(len(row) == 3 for row in R)
            assert R[0][1] is None and R[0][2] is None and R[1][2] is None  # not yet seen
            assert all(R[2][i] is not None for i in range(3))
            assert set(m["forgetting"][mode][name]) == {"fm", "bwt"}
    for name in TASKS:
        row = m["per_task"][name]
        assert set(row["routed"]) == set(METRIC_NAMES)
        assert row["num_test_images"] == 12
        assert row["nonfinite_scores"] == {"routed": 0, "oracle": 0}
        for phase in ("extract_train_s", "fit_s", "router_s", "evaluate_s", "checkpoint_s"):
            assert m["timings"]["per_task"][name][phase] >= 0
    assert len(m["routing"]["confusion"]) == 3
    assert sum(map(sum, m["routing"]["confusion"])) == 36
    by_label = m["routing"]["by_label"]  # defect-free and defective test images counted apart (4 + 8 per task)
    assert by_label["normal"]["images"] == 12 and by_label["defective"]["images"] == 24
    assert all(set(row) >= {"routing_accuracy_normal", "routing_accuracy_defective"} for row in m["per_task"].values())
    assert set(m["routing"]["per_defect_type"]) == set(TASKS)
    assert sum(v["images"] for v in m["routing"]["per_defect_type"]["dots"].values()) == 12
    assert "Rt Def" in (out / "results_table.txt").read_text()
    assert "thresholds" not in m  # training.calibration_share=0 (MAIN): nothing held out, nothing stored
    assert "calibration" not in torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["moleflow"]
    p = m["parameters"]
    assert p["total"] == p["shared"] + sum(p["per_task"].values())
    assert len(set(p["per_task"].values())) == 1  # every task adds the same parameter count
    assert m["health"]["skipped_batches"] == {name: 0 for name in TASKS}
    for t, name in enumerate(TASKS):
        assert (out / "checkpoints" / f"task_{t:02d}_{name}.ckpt").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "mean" in (out / "results_table.txt").read_text()
    figures = m["figures"]  # ROC and PR curves of every task, PRO curves of the tasks with masks
    for key in ("roc_curves", "pr_curves", "pro_curves"):
        assert (out / figures[key]).is_file(), key
    assert all(0.0 <= m["per_task"][n]["routed"]["pixel_f1_max"] <= 1.0 for n in TASKS)


def test_router_sends_generated_categories_to_their_tasks(tiny_run) -> None:
    _, out, _ = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["routing"]["accuracy"] == 1.0
    assert m["routing"]["confusion"] == [[12, 0, 0], [0, 12, 0], [0, 0, 12]]


def test_zero_forgetting_scores_bit_identical(tiny_run) -> None:
    """Task 0's oracle scores after tasks 1 and 2 trained equal those right after task 0, bit for bit."""
    cfg, out, _ = tiny_run
    after_0 = load_checkpoint(out / "checkpoints" / "task_00_stripes.ckpt").model
    after_2 = load_checkpoint(out / "checkpoints" / "last.ckpt").model
    assert after_0.num_tasks == 1 and after_2.num_tasks == 3
    # later tasks really trained: their experts moved away from the zero initialisation
    later_b = [p for n, p in after_2.named_parameters() if ".experts.2." in n and n.endswith(".B")]
    assert later_b and any(bool(b.abs().sum() > 0) for b in later_b)

    dm = build_datamodule(cfg.data)
    dm.set_task(0)
    cache = FeatureCache(build_extractor(cfg.model.backbone, int(cfg.model.flow.embed_dim)), torch.device("cpu"))
    test = cache.get("test0", lambda: dm.test_dataloader_for(0), with_masks=True)
    score_cfg = EvaluationSpec(top_k=3, pixel_sigma=4.0, image_size=64, batch_size=16)
    ev0 = evaluate_task(after_0, test, 0, "stripes", 1, score_cfg, torch.device("cpu"))
    ev2 = evaluate_task(after_2, test, 0, "stripes", 3, score_cfg, torch.device("cpu"))
    assert torch.equal(ev0.oracle_image_scores, ev2.oracle_image_scores)
    assert torch.equal(ev0.oracle_pixel_maps, ev2.oracle_pixel_maps)
    m = json.loads((out / "metrics.json").read_text())
    column = [row[0] for row in m["matrices"]["oracle"]["pixel_auroc"]]
    assert column[0] == column[1] == column[2]


def test_missing_dataset_root_says_where_to_get_it(tmp_path) -> None:
    from moleflow.data.types import DatasetLayoutError
    from tests.helpers import TINY_OVERRIDES, compose_config
    from train import train

    missing = tmp_path / "no_mvtec_here"
    cfg = compose_config([*TINY_OVERRIDES, "data=mvtec", f"data.root={missing}"], tmp_path / "out")
    with pytest.raises(DatasetLayoutError, match="mvtec.com") as err:
        train(cfg)
    assert str(missing) in str(err.value)


def test_score_top_k_larger_than_patch_count_rejected(tmp_path, synthetic_root) -> None:
    from tests.helpers import TINY_OVERRIDES, compose_config
    from train import train

    cfg = compose_config(
        [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null", "score_top_k=1000"], tmp_path
    )
    with pytest.raises(ValueError, match="score_top_k"):
        train(cfg)


def test_eval_rescores_checkpoint_like_training(tiny_run, tmp_path) -> None:
    """src/eval.py's re-scoring at the trained top-k reproduces the run's final numbers."""
    from omegaconf import OmegaConf

    from eval import evaluate

    _, out, payload = tiny_run
    cfg = OmegaConf.create(
        {
            "ckpt_path": str(out / "checkpoints" / "last.ckpt"),
            "score_top_k": [1, 3],
            "data_root": None,
            "pixel_sigma": None,
            "device": "cpu",
            "paths": {"output_dir": str(tmp_path)},
        }
    )
    result = evaluate(cfg)
    assert [row["score_top_k"] for row in result["rows"]] == [1, 3]
    k3 = result["rows"][1]["final"]["routed"]
    for name, value in payload["final"]["routed"].items():
        assert k3[name] == pytest.approx(value, abs=1e-12)
    assert (tmp_path / "eval_metrics.json").is_file()


def test_continual_steps_run_one_at_a_time(tmp_path, synthetic_root) -> None:
    """run_continual is a loop over named steps; each does its one job when called alone."""
    from moleflow.config.typed import job_settings
    from moleflow.training import continual
    from tests.helpers import TINY_OVERRIDES, compose_config

    cfg = compose_config([*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null"], tmp_path)
    run = continual.open_run(job_settings(cfg), tmp_path, [])
    assert isinstance(run, continual.ContinualRun) and run.names == TASKS and run.start_task == 0
    assert run.module.model.num_tasks == 0 and run.loggers == []

    task = continual.begin_task(run, 0)
    assert (task.t, task.name) == (0, "stripes") and run.module.model.num_tasks == 1
    continual.extract_train_features(run, task)
    assert task.train_set.features.shape[0] == task.train_set.router.shape[0] > 0
    continual.train_task(run, task)
    assert run.module.loss_history["stripes"] and task.untrainable == []
    continual.fit_router(run, task)
    assert run.module.model.router.num_tasks == 1
    continual.evaluate_seen_tasks(run, task)
    assert [ev.name for ev in run.evaluations] == ["stripes"] and run.tracker.last_task == 0
    continual.report_round(run, task)
    continual.save_round(run, task)
    assert set(task.times) == {"extract_train_s", "fit_s", "router_s", "evaluate_s", "checkpoint_s"}
    assert (tmp_path / "checkpoints" / "task_00_stripes.ckpt").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "running" and list(saved["timings"]["per_task"]) == ["stripes"]
