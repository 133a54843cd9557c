"""Train MoLE-Flow task by task and report the study's metrics.

python src/train.py data.root=/path/to/mvtec_ad            # MAIN configuration
python src/train.py experiment=generated_quick              # generated data, no download
python src/train.py -m ncl=4,6,8,12,16,20                   # a multirun sweep
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from moleflow.config import register
from moleflow.training.job import train_job

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register(CONF_DIR)  # before Hydra composes anything, here and in every launcher worker that imports this file


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job from a composed config (Hydra's runtime config set); returns metrics.json's payload."""
    return train_job(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point (the task function of every job, in launcher workers too); returns the mean routed
    image AUROC for sweepers (NaN if undefined)."""
    register(CONF_DIR)
    payload = train_job(cfg)
    value = payload["final"]["routed"]["image_auroc"]
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    main()
