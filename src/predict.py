"""Use a trained MoLE-Flow model on new images: verdicts, anomaly-map overlays, thresholds, export.

python src/predict.py ckpt=PATH input=FOLDER_OR_FILE                       # predict
python src/predict.py mode=calibrate ckpt=PATH calibration.normal_dir=DIR  # DIR/<task>/*.png, held-out normals
python src/predict.py mode=export ckpt=PATH export.format=torchscript      # one file, PyTorch only

Writes predictions.csv, predictions.json and overlays/ (predict), calibration.json and
<ckpt>.calibrated.ckpt (calibrate), or the exported model (export) under the run's output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from moleflow.config import register
from moleflow.inference.runner import run_from_config
from moleflow.utils.allocator import keep_freed_memory

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register(CONF_DIR)  # before Hydra composes anything


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.mode`` with outputs in ``cfg.paths.output_dir``; returns the summary written to JSON."""
    return run_from_config(cfg, cfg.paths.output_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # large CPU tensors reuse freed memory (see moleflow.utils.allocator)
    predict(cfg)


if __name__ == "__main__":
    main()
