"""The record of a run that metrics.json holds: identity, settings, results so far, model size, health, timings.

Kept apart from the loop (:mod:`moleflow.training.continual`) so that what a run reports is read in one place.
"""

from __future__ import annotations

import platform
import socket
import time
from pathlib import Path
from typing import Any

import torch

from moleflow.assembly.builders import resolve_device
from moleflow.config.schema import JobConfig
from moleflow.config.typed import settings_dict
from moleflow.evaluation.report import ContinualTracker
from moleflow.training.task_fit import loss_curve_summary


def run_payload(
    cfg: JobConfig,
    overrides: list[str] | None,
    tracker: ContinualTracker,
    module: Any,
    timings: dict[str, Any],
    started: float,
    output_dir: Path,
    extractor_images: int = 0,
) -> dict[str, Any]:
    """metrics.json's record of a run so far: who ran it where, its settings, results, sizes, health, timings."""
    summary = tracker.summary()
    counts = module.model.parameter_counts()
    timings = dict(timings)
    timings["total_s"] = time.time() - started
    return {
        "status": "running",
        "run": {
            "output_dir": str(output_dir),
            # the job's identity; how it was (re)started is kept apart so tables group resumed runs correctly
            "overrides": [o for o in overrides or [] if not o.lstrip("+~").startswith("resume=")],
            "resume": cfg.resume,
            "seed": cfg.seed,
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),  # CPU results are bitwise repeatable for a given count
            "device": str(resolve_device(str(cfg.trainer.get("accelerator", "auto")))),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        },
        "config": settings_dict(cfg),
        **summary,
        "parameters": {
            "total": counts["total"],
            "shared": counts["shared"],
            "per_task": dict(zip(tracker.task_names, counts["per_task"], strict=False)),
        },
        "health": {
            "skipped_batches": dict(module.skipped_batches),
            "attempted_batches": dict(module.attempted_batches),
            "diverged": dict(tracker.diverged),
        },
        "work": {"backbone_images": extractor_images, "feature_cache": cfg.training.feature_cache},
        "training": {
            name: loss_curve_summary(module.loss_history.get(name, []))
            for name in tracker.task_names[: tracker.last_task + 1]
        },
        "timings": timings,
    }
