"""Using a trained model: predict on new images, calibrate thresholds, export.

from moleflow.inference import MoLEFlowDetector
detector = MoLEFlowDetector.load("logs/train/runs/<run>/checkpoints/last.ckpt")
for result in detector.predict(["part_001.png", "part_002.png"]):
    print(result.source, result.verdict, result.task, result.score)
"""

from moleflow.inference.calibrated_copies import CalibratedCopyError
from moleflow.inference.detector import CalibrationDataError, MoLEFlowDetector
from moleflow.inference.export import EXPORT_FORMATS, ExportableMoLEFlow, ExportError, load_exported
from moleflow.inference.prediction import VERDICT_DEFECTIVE, VERDICT_NORMAL, VERDICT_UNKNOWN, Prediction
from moleflow.inference.standalone_detector import ExportedDetector
from moleflow.thresholds.records import Calibration, TaskCalibration

__all__ = [
    "EXPORT_FORMATS",
    "VERDICT_DEFECTIVE",
    "VERDICT_NORMAL",
    "VERDICT_UNKNOWN",
    "Calibration",
    "CalibratedCopyError",
    "CalibrationDataError",
    "ExportError",
    "ExportableMoLEFlow",
    "ExportedDetector",
    "MoLEFlowDetector",
    "Prediction",
    "TaskCalibration",
    "load_exported",
]
