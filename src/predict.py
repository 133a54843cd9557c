"""Use a trained MoLE-Flow model on new images: verdicts, anomaly-map overlays, thresholds, export.

python src/predict.py ckpt=PATH input=FOLDER_OR_FILE                       # predict   (installed: moleflow-predict)
python src/predict.py mode=calibrate ckpt=PATH calibration.normal_dir=DIR  # DIR/<task>/*.png, held-out normals
python src/predict.py mode=export ckpt=PATH export.format=torchscript      # one file, PyTorch only

Writes predictions.csv, predictions.json and overlays/ (predict), calibration.json and
<ckpt>.calibrated.ckpt (calibrate), or the exported model (export) under the run's output folder. The app
itself is :func:`moleflow.cli.predict_main`; this file runs it from a clone.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from moleflow.cli import predict_main as main
from moleflow.inference.runner import run_from_config


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.mode`` with outputs in ``cfg.paths.output_dir``; returns the summary written to JSON."""
    return run_from_config(cfg, cfg.paths.output_dir)


__all__ = ["main", "predict"]

if __name__ == "__main__":
    main()
