"""Train MoLE-Flow task by task and report the study's metrics.

python src/train.py data.root=/path/to/mvtec_ad            # MAIN configuration
python src/train.py experiment=generated_quick              # generated data, no download
python src/train.py -m ncl=4,6,8,12,16,20                   # a multirun sweep
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moleflow.training.continual import run_continual
from moleflow.training.resolvers import register_resolvers

register_resolvers(Path(__file__).resolve().parents[1] / "conf")  # before Hydra composes anything

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job from a composed config (Hydra's runtime config set); returns metrics.json's payload."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return run_continual(cfg, output_dir=cfg.paths.output_dir, overrides=overrides)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the mean routed image AUROC for sweepers (NaN if undefined)."""
    payload = train(cfg)
    value = payload["final"]["routed"]["image_auroc"]
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    main()
