"""Train MoLE-Flow task by task and report the study's metrics.

python src/train.py data.root=/path/to/mvtec_ad            # MAIN configuration   (installed: moleflow-train ...)
python src/train.py experiment=generated_quick              # generated data, no download
python src/train.py -m ncl=4,6,8,12,16,20                   # a multirun sweep

The app itself is :func:`moleflow.cli.train_main`; this file runs it from a clone.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from moleflow.cli import train_main as main
from moleflow.training.job import train_job


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job from a composed config (Hydra's runtime config set); returns metrics.json's payload."""
    return train_job(cfg)


__all__ = ["main", "train"]

if __name__ == "__main__":
    main()
