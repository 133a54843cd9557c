"""One training job from a composed config: what ``src/train.py`` runs, callable from Python (tests, notebooks,
the experiment scripts) without the command line."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from moleflow.training.continual import run_continual


def train_job(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the job ``cfg`` describes (Hydra's runtime config set); returns metrics.json's payload.

    ``overrides`` name the job (metrics.json, resume's search for the same run); default: the command line's,
    when Hydra runs the job.
    """
    from hydra.core.hydra_config import HydraConfig

    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return run_continual(cfg, output_dir=cfg.paths.output_dir, overrides=overrides)
