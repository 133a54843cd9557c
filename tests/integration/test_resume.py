"""Resume after a kill, determinism, and refusing to continue with another configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moleflow.config.typed import job_settings
from tests.helpers import CONF_DIR, TINY_OVERRIDES, compose_config

ROOT = CONF_DIR.parent
# the parts of metrics.json that are results (timings, paths and hosts legitimately differ)
RESULT_KEYS = ("tasks", "final", "per_task", "matrices", "forgetting", "routing", "parameters", "health")


def _overrides(synthetic_root: Path) -> list[str]:
    return [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null", "training.epochs=2"]


def _results(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    return {k: metrics[k] for k in RESULT_KEYS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root) -> Path:
    from train import train

    out = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config(_overrides(synthetic_root), out))
    return out


def test_same_seed_gives_identical_metrics(uninterrupted, synthetic_root, tmp_path) -> None:
    from train import train

    train(compose_config(_overrides(synthetic_root), tmp_path))
    assert _results(tmp_path) == _results(uninterrupted)


def _killed_run(synthetic_root: Path, logs: Path, kill_at: str) -> Path:
    """Start a run in a subprocess that SIGKILLs itself at ``kill_at`` (see tests/apps/killed_train.py)."""
    run_dir = logs / "generated_quick" / "runs" / f"killed_{kill_at.replace(':', '_')}"
    app = ROOT / "tests" / "apps" / "killed_train.py"
    cmd = [sys.executable, str(app), *_overrides(synthetic_root), f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "MOLEFLOW_TEST_KILL_AT": kill_at}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("kill_at", ["train:1", "evaluate:1"])
def test_resume_true_after_a_kill_continues_to_the_same_metrics(kill_at, uninterrupted, synthetic_root, tmp_path):
    """Killed inside task 1's training, or inside its evaluation (before its checkpoint): task 1 runs again."""
    from train import train

    logs = tmp_path / "logs"
    run_dir = _killed_run(synthetic_root, logs, kill_at)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "running" and metrics["tasks"] == ["stripes"]  # only task 0 was finished
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "task_00_stripes.ckpt"]

    new_dir = logs / "generated_quick" / "runs" / "resumed"
    payload = train(compose_config([*_overrides(synthetic_root), f"paths.log_dir={logs}", "resume=true"], new_dir))
    assert payload["run"]["output_dir"] == str(run_dir)  # continued in the killed run's own folder
    assert not (new_dir / "metrics.json").exists()
    assert _results(run_dir) == _results(uninterrupted)
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["timings"]["resumed_at_tasks"] == [1] and "forced_resumes" not in resumed["run"]


def test_resume_true_finds_the_unfinished_run_and_skips_finished_ones(synthetic_root, tmp_path) -> None:
    from train import train

    logs = tmp_path / "logs"
    base = [*_overrides(synthetic_root), "data.categories=[stripes]", f"paths.log_dir={logs}"]
    first = logs / "generated_quick" / "runs" / "a"
    train(compose_config(base, first))
    payload = train(compose_config([*base, "resume=true"], logs / "generated_quick" / "runs" / "b"))
    assert payload["run"]["output_dir"] == str(first)  # finished run found: returned, not retrained
    assert not (logs / "generated_quick" / "runs" / "b" / "metrics.json").exists()


def test_resume_with_another_configuration_is_refused(uninterrupted, synthetic_root, tmp_path) -> None:
    from train import train

    ckpt = uninterrupted / "checkpoints" / "task_00_stripes.ckpt"
    cfg = compose_config([*_overrides(synthetic_root), "lora_rank=8", f"resume={ckpt}"], tmp_path)
    with pytest.raises(ValueError, match="lora_rank: checkpoint 4, now 8"):
        train(cfg)


# settings that change results without changing the model's shape: resuming with them would mix two runs
MIXING = {
    "seed": ("seed=1", "seed: checkpoint 0, now 1"),
    "epochs": ("training.epochs=3", "training.epochs: checkpoint 2, now 3"),
    "task_order": ("data.categories=[stripes,dots,checker]", "data.categories: checkpoint ['stripes', 'checker'"),
    "score": ("score_top_k=5", "model.score.top_k: checkpoint 3, now 5"),
    "data_root": ("data.root=/elsewhere", "data.root: checkpoint '"),
    "task_groups": ("data.task_groups=2-1", "data.task_groups: checkpoint None, now '2-1'"),
    "source_options": ("+data.source_options.x=1", "data.source_options.x: checkpoint '<not set>', now 1"),
    "eval_batch": ("data.eval_batch_size=3", "data.eval_batch_size: checkpoint 16, now 3"),  # backbone rounding
}


@pytest.mark.parametrize(("override", "named"), list(MIXING.values()), ids=list(MIXING))
def test_resume_with_a_result_changing_setting_is_refused(override, named, uninterrupted, tmp_path) -> None:
    from moleflow.training.resume import ResumeMismatchError, check_same_config

    info = json.loads((uninterrupted / "metrics.json").read_text())
    same = job_settings(compose_config(_overrides(Path(info["config"]["data"]["root"])), tmp_path))
    assert check_same_config(info["config"], same, uninterrupted, force=False) == []
    cfg = job_settings(compose_config([*_overrides(Path(info["config"]["data"]["root"])), override], tmp_path))
    with pytest.raises(ResumeMismatchError, match="resume_force=true") as err:
        check_same_config(info["config"], cfg, uninterrupted, force=False)
    assert named in str(err.value) and str(uninterrupted) in str(err.value)


def test_settings_that_cannot_change_results_may_differ(uninterrupted, synthetic_root, tmp_path) -> None:
    from moleflow.training.resume import check_same_config

    info = json.loads((uninterrupted / "metrics.json").read_text())
    neutral = ["logger=csv", "data.num_workers=1", "report.figures=false", "training.feature_cache=disk"]
    cfg = job_settings(compose_config([*_overrides(synthetic_root), *neutral, "data.pin_memory=true"], tmp_path / "x"))
    assert check_same_config(info["config"], cfg, uninterrupted, force=False) == []


def test_resume_force_continues_and_records_the_differences(uninterrupted, synthetic_root, tmp_path) -> None:
    from moleflow.training.resume import ResumeMismatchError
    from train import train

    ckpt = uninterrupted / "checkpoints" / "task_00_stripes.ckpt"
    base = [*_overrides(synthetic_root), "seed=1", f"resume={ckpt}"]
    with pytest.raises(ResumeMismatchError, match="seed: checkpoint 0, now 1"):
        train(compose_config(base, tmp_path / "refused"))
    assert not (tmp_path / "refused" / "metrics.json").exists()
    payload = train(compose_config([*base, "resume_force=true"], tmp_path / "forced"))
    forced = json.loads((tmp_path / "forced" / "metrics.json").read_text())["run"]["forced_resumes"]
    assert payload["status"] == "finished" and len(forced) == 1
    assert forced[0]["at_task"] == 1 and forced[0]["differences"] == ["seed: checkpoint 0, now 1"]


def test_finished_run_found_with_another_configuration_is_refused(synthetic_root, tmp_path) -> None:
    """resume=true matches runs by their overrides; a config file edited since then is still caught."""
    from moleflow.training.resume import ResumeMismatchError
    from train import train

    logs = tmp_path / "logs"
    base = [*_overrides(synthetic_root), "data.categories=[stripes]", f"paths.log_dir={logs}"]
    first = logs / "generated_quick" / "runs" / "a"
    train(compose_config(base, first))
    metrics = json.loads((first / "metrics.json").read_text())
    metrics["config"]["model"]["loss"]["tail_weight"] = 0.5  # as if conf/ had said so for that run
    (first / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ResumeMismatchError, match="model.loss.tail_weight: checkpoint 0.5, now 0.7"):
        train(compose_config([*base, "resume=true"], logs / "generated_quick" / "runs" / "b"))


def test_resume_from_a_checkpoint_file_continues_into_a_new_run(uninterrupted, synthetic_root, tmp_path) -> None:
    from train import train

    ckpt = uninterrupted / "checkpoints" / "task_01_checker.ckpt"
    train(compose_config([*_overrides(synthetic_root), f"resume={ckpt}"], tmp_path))
    assert _results(tmp_path) == _results(uninterrupted)
