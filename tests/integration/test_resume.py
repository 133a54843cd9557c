"""Resume after a kill, determinism, and refusing to continue with another configuration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_killed_run_resumes_to_the_same_metrics(uninterrupted, synthetic_root, tmp_path) -> None:
    from train import train

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *_overrides(synthetic_root), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir / "checkpoints" / "task_00_stripes.ckpt"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the middle of task 1
    proc.wait()
    assert first.exists(), "the first task never finished"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "running"

    cfg = compose_config([*_overrides(synthetic_root), f"resume={run_dir}"], tmp_path / "new")
    train(cfg)
    assert _results(run_dir) == _results(uninterrupted)
    assert json.loads((run_dir / "metrics.json").read_text())["timings"]["resumed_at_tasks"]


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


def test_resume_from_a_checkpoint_file_continues_into_a_new_run(uninterrupted, synthetic_root, tmp_path) -> None:
    from train import train

    ckpt = uninterrupted / "checkpoints" / "task_01_checker.ckpt"
    train(compose_config([*_overrides(synthetic_root), f"resume={ckpt}"], tmp_path))
    assert _results(tmp_path) == _results(uninterrupted)
