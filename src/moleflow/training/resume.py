"""Continue an interrupted run from its last finished task.

Every task ends with a checkpoint holding the model (all experts, adapters, router prototypes), the
results so far and the run's config. Each task seeds itself from (seed, task index), so a resumed
run trains the remaining tasks exactly as an uninterrupted run would.

``resume`` may be ``true`` (the newest unfinished run with the same overrides under
``paths.log_dir/task_name``), a run directory, or a checkpoint file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from moleflow.training.builders import to_dict

log = logging.getLogger(__name__)


def _comparable(overrides: list[str]) -> set[str]:
    return {o for o in overrides if not o.lstrip("+~").startswith("resume=")}


def find_previous_run(log_root: Path, overrides: list[str], exclude: Path) -> Path | None:
    """Newest run directory under ``log_root`` whose metrics.json has the same overrides."""
    wanted = _comparable(overrides)
    candidates = []
    for metrics in log_root.glob("**/metrics.json"):
        run_dir = metrics.parent
        if run_dir.resolve() == exclude.resolve():
            continue
        try:
            data = json.loads(metrics.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _comparable(data.get("run", {}).get("overrides", [])) == wanted:
            candidates.append((metrics.stat().st_mtime, run_dir))
    return max(candidates)[1] if candidates else None


@dataclass
class ResumePoint:
    """Where to continue from: ``checkpoint`` (None: nothing saved yet) and the run directory to write."""

    run_dir: Path
    checkpoint: Path | None


def resolve_resume(cfg: DictConfig, output_dir: Path, overrides: list[str]) -> ResumePoint | None:
    """Interpret ``cfg.resume``: None to start afresh.

    ``true`` or a run directory continue that run in its own directory (from checkpoints/last.ckpt);
    a checkpoint file continues from that file into this run's new directory.
    """
    resume = cfg.get("resume")
    if resume in (None, False, "false", "none", "null"):
        return None
    if resume is True or str(resume).lower() == "true":
        root = Path(cfg.paths.log_dir) / str(cfg.task_name)
        run_dir = find_previous_run(root, overrides, exclude=output_dir)
        if run_dir is None:
            log.warning("resume=true: no earlier run with overrides %s under %s; starting afresh.", overrides, root)
            return None
    else:
        path = Path(str(resume)).expanduser()
        if path.is_file():
            return ResumePoint(run_dir=output_dir, checkpoint=path)
        if not path.is_dir():
            msg = f"resume={resume}: no such run directory or checkpoint file."
            raise FileNotFoundError(msg)
        run_dir = path
    last = run_dir / "checkpoints" / "last.ckpt"
    return ResumePoint(run_dir=run_dir, checkpoint=last if last.is_file() else None)


def check_compatible(checkpoint_hparams: dict[str, Any], run_config: dict[str, Any] | None, cfg: DictConfig) -> None:
    """Refuse to continue a run with a different model: name every mismatching key."""
    mismatches = []
    for group in ("flow", "loss", "optimizer"):
        saved, current = checkpoint_hparams.get(group) or {}, to_dict(cfg.model[group])
        for key in sorted(saved.keys() | current.keys()):
            if saved.get(key) != current.get(key):
                mismatches.append(f"model.{group}.{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    if run_config is not None:
        saved_bb, current_bb = run_config["model"]["backbone"], to_dict(cfg.model.backbone)
        for key in sorted(saved_bb.keys() | current_bb.keys()):
            if saved_bb.get(key) != current_bb.get(key):
                was, now = saved_bb.get(key), current_bb.get(key)
                mismatches.append(f"model.backbone.{key}: checkpoint {was!r}, now {now!r}")
        for key in ("image_size",):
            if run_config["data"].get(key) != cfg.data.get(key):
                mismatches.append(f"data.{key}: checkpoint {run_config['data'].get(key)!r}, now {cfg.data.get(key)!r}")
    if mismatches:
        msg = "The checkpoint was made with a different configuration:\n  " + "\n  ".join(mismatches)
        raise ValueError(msg)
