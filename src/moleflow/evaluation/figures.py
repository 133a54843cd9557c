"""Write the end-of-run figures to the run directory and hand them to the loggers (W&B images)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.data.datamodule import ContinualDataModule
from moleflow.evaluation.evaluate import TaskEvaluation
from moleflow.evaluation.plots import pick_samples, save_confusion_matrix, save_overlays, save_roc_curves

log = logging.getLogger(__name__)


def write_figures(
    output_dir: Path,
    dm: ContinualDataModule,
    evaluations: list[TaskEvaluation],
    names: list[str],
    confusion: np.ndarray | None,
    overlays_per_task: int,
    loggers: list[Any],
    confusion_by_label: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Overlays per task, the routing confusion matrix and ROC curves; returns their paths (relative)."""
    fig_dir = output_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"overlays": {}}
    for ev in evaluations:
        if overlays_per_task <= 0:
            break
        indices = pick_samples(ev.labels, overlays_per_task)
        dataset = dm.test_dataset(ev.task)
        samples = [dataset[i] for i in indices]
        images = [sample["image"] for sample in samples]
        masks = [sample["mask"][0] for sample in samples] if ev.has_masks else None
        path = save_overlays(ev, images, masks, indices, names, fig_dir / f"overlays_{ev.task:02d}_{ev.name}.png")
        written["overlays"][ev.name] = str(path.relative_to(output_dir))
    if confusion is not None:
        path = save_confusion_matrix(
            confusion, names[: len(confusion)], fig_dir / "routing_confusion.png", confusion_by_label
        )
        written["routing_confusion"] = str(path.relative_to(output_dir))
    path = save_roc_curves(evaluations, fig_dir / "roc_curves.png")
    written["roc_curves"] = str(path.relative_to(output_dir))
    for lg in loggers:
        if hasattr(lg, "log_image"):
            try:
                files = [str(output_dir / p) for p in written["overlays"].values()]
                files += [str(output_dir / written[k]) for k in ("routing_confusion", "roc_curves") if k in written]
                lg.log_image(key="figures", images=files)
            except Exception as err:  # noqa: BLE001 - figures must never fail a finished run
                log.warning("Could not log figures to %s: %s", type(lg).__name__, err)
    return written
