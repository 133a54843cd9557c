"""Which thresholds a loaded checkpoint judges with: its own (made in training) or its calibrated copy's.

``calibrate(save=True)`` writes ``<name>.calibrated.ckpt`` next to a checkpoint; loading the original uses that
copy only when it was made from exactly that file (content hash), and refuses a damaged or foreign copy rather
than calibrating again over it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from moleflow.assembly.checkpoint_files import CheckpointError, read_checkpoint_info
from moleflow.assembly.integrity import file_sha256
from moleflow.thresholds.records import Calibration, calibrated_path, read_calibration

log = logging.getLogger(__name__)


def thresholds_in_use(path: Path, own: Calibration | None, copy: Calibration | None) -> Calibration | None:
    """The thresholds a loaded checkpoint judges with, said in the log.

    A calibrated copy made for this very file (``mode=calibrate``, on purpose and later) wins over the thresholds
    made in training that the checkpoint carries; either way one line says which are in use and where from.
    """
    chosen = copy if copy is not None else own
    if chosen is None:
        return None
    sources = sorted({f"{t.score_source} ({t.score_images} images)" for t in chosen.tasks.values()})
    if copy is not None and own is not None:
        log.info(
            "Using the thresholds of %s (calibrated %s: %s), not those made in training that %s carries.",
            calibrated_path(path),
            copy.created,
            ", ".join(sources),
            path.name,
        )
    elif copy is not None:
        log.info(
            "Using the thresholds of %s (calibrated %s: %s).", calibrated_path(path), copy.created, ", ".join(sources)
        )
    else:
        log.info("Using the thresholds stored in %s (%s).", path, ", ".join(sources))
    return chosen


class CalibratedCopyError(RuntimeError):
    """The calibrated copy next to a checkpoint cannot be used; the message names it and what to do."""


def calibrated_copy_of(path: Path, recalibrate: bool = False) -> Calibration | None:
    """The calibration of ``<name>.calibrated.ckpt`` next to ``path`` if it was made from exactly this file.

    A copy that is damaged or belongs to another checkpoint is an error unless ``recalibrate``: silently
    calibrating again (in-sample) and saving over it would lose thresholds calibrated on held-out images.
    """

    copy = calibrated_path(path)
    if copy == path or not copy.is_file():
        return None
    problem = None
    try:
        calibration = read_calibration(read_checkpoint_info(copy))
    except (CheckpointError, ValueError, OSError) as err:
        calibration, problem = None, f"it cannot be used: {err}"
    if problem is None and calibration is None:
        problem = "it holds no calibration"
    if problem is None and calibration.source_sha256 != file_sha256(path):
        problem = f"it was calibrated for a different version of {path.name} (content hash differs)"
    if problem is None:
        return calibration
    if recalibrate:
        log.warning("Ignoring %s (recalibrate=true): %s. A new calibration saved replaces it.", copy, problem)
        return None
    msg = (
        f"Calibrated copy {copy} of {path}: {problem}. It may hold thresholds calibrated on held-out images, so it "
        "is not replaced silently. Restore it from a backup, move it away, or calibrate again and replace it with "
        "calibration.recalibrate=true (src/predict.py) or MoLEFlowDetector.load(..., recalibrate=True)."
    )
    raise CalibratedCopyError(msg)
