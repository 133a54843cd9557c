"""Cluster sweeps through Hydra launchers: joblib (local parallel) and submitit (SLURM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import CONF_DIR, compose_config

ROOT = CONF_DIR.parent
TINY = [
    "experiment=generated_quick",
    "logger=none",
    "training.epochs=1",
    "model.flow.embed_dim=32",
    "model.flow.hidden=32",
    "lora_rank=4",
    "data.categories=[stripes,dots]",
]


def _multirun(tmp_path, launcher: list[str]) -> list:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "src/train.py", "-m", *TINY, "ncl=2,4", *launcher]
    cmd += [f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(sweep.glob("*/metrics.json"))


def _one_folder_per_job(sweep, jobs: int) -> None:
    """Every job's folder sits directly in the sweep folder: no '/' of a group override split its name."""
    folders = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == jobs and all((p / "metrics.json").is_file() for p in folders), folders
    assert all("model-backbone=tiny_random" in p.name for p in folders)


def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path) -> None:
    """Two jobs in worker processes; the group override model/backbone=... resolves to a flat folder name there."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    files = _multirun(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model/backbone=tiny_random"])
    assert len(files) == 2
    _one_folder_per_job(tmp_path / "sweep", 2)


def test_group_override_gives_one_run_folder(tmp_path) -> None:
    """``model/backbone=tiny_random`` in a multirun names the job's folder ``..._model-backbone=tiny_random...``."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "src/train.py", "-m", *TINY[:-1], "data.categories=[stripes]", "ncl=2"]
    cmd += ["model/backbone=tiny_random", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _one_folder_per_job(sweep, 1)


def test_four_parallel_jobs_prepare_one_fresh_data_folder_repeatedly(tmp_path) -> None:
    """Four joblib jobs (n_jobs=4) generate the same data set into one fresh folder, three times over."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    for attempt in range(3):
        data_dir, sweep = tmp_path / f"data{attempt}", tmp_path / f"sweep{attempt}"
        cmd = [sys.executable, "tests/apps/prepare_data.py", "-m", "experiment=generated_quick", "seed=0,1,2,3"]
        cmd += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", f"hydra.sweep.dir={sweep}"]
        cmd += [f"paths.data_dir={data_dir}", "logger=none"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, f"attempt {attempt}: {done.stderr[-3000:]}"
        results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/data_ok.json"))]
        assert len(results) == 4, f"attempt {attempt}: {len(results)} of 4 jobs finished"
        assert all(r == results[0] for r in results)
        assert results[0] == {"stripes": [12, 12], "checker": [12, 12], "dots": [12, 12]}


def test_slurm_launcher_config_composes(tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config(["experiment=table1_core_ablation", "hydra/launcher=slurm"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0 and launcher.mem_gb > 0


@pytest.mark.slow
def test_submitit_local_executor_stands_in_for_slurm(tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    files = _multirun(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"])
    assert len(files) == 2
