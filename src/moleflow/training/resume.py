"""Continue an interrupted run from its last finished task.

Every task ends with a checkpoint holding the model (all experts, adapters, router prototypes), the
results so far and the run's config. Each task seeds itself from (seed, task index), so a resumed
run trains the remaining tasks exactly as an uninterrupted run would.

``resume`` may be ``true`` (the newest unfinished run with the same overrides under
``paths.log_dir/task_name``), a run directory, or a checkpoint file.

A resumed run must not mix results of two configurations, so the run's resolved config (stored in every
checkpoint and in metrics.json) is compared with the new one over *every* key except a short allow-list
of keys that cannot change results (:data:`RESULT_NEUTRAL_KEYS`): a setting added later is covered
without anyone remembering to list it. Any difference stops the run naming the keys, unless
``resume_force=true``, which continues and records the differences in metrics.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moleflow.config.schema import JobConfig
from moleflow.config.typed import settings_dict
from moleflow.evaluation.report import ContinualTracker
from moleflow.training.module_checkpoints import module_from_checkpoint

log = logging.getLogger(__name__)


# Config keys (and everything below them) that cannot change a run's results: where files go, what is
# logged or drawn, how fast data is read. Everything else (seed, epochs, data root, categories and their
# order, task groups, source options, image size, score, loss, model, trainer precision and devices,
# runtime.amp/merge_experts/compile, ...) must match for a run to be resumed. Batch sizes are compared too:
# the backbone's convolutions round differently for another batch (measured up to 8e-6 at batch 1 vs 16).
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    "resume",
    "resume_force",
    "resume_sha256",
    "resume_allow_unverified",
    "hydra",
    "paths",  # data.root, which paths.data_dir usually sets, is compared on its own
    "logger",
    "report",
    "task_name",
    "run_name",
    "group",
    "table_rows",  # an ablation file's place in the study's tables (labels, reference figures)
    "callbacks.progress_bar",
    "callbacks.model_summary",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "data.num_workers",
    "data.pin_memory",
    "training.feature_cache",  # memory, disk and none give bit-identical features (tested)
    "training.feature_cache_dir",
    "runtime.keep_freed_memory",
)
_ABSENT = "<not set>"


def _comparable(overrides: list[str]) -> set[str]:
    return {o for o in overrides if not o.lstrip("+~").startswith(("resume=", "resume_force="))}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values (their order matters)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            out.update(_flatten(item, path))
        else:
            out[path] = item
    return out


def _neutral(path: str) -> bool:
    return any(path == key or path.startswith(key + ".") for key in RESULT_NEUTRAL_KEYS)


def config_mismatches(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Every result-changing key whose value differs between the run's config and the new one, as text."""
    if saved is None:
        return []
    old, new = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(old.keys() | new.keys()):
        if _neutral(key):
            continue
        was, now = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if was != now or type(was) is not type(now) and not _same_number(was, now):
            out.append(f"{key}: checkpoint {was!r}, now {now!r}")
    return out


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and a == b


class ResumeMismatchError(ValueError):
    """Continuing the run would mix results of two configurations; the message names the keys."""


def check_same_config(saved: dict[str, Any] | None, cfg: JobConfig, where: Path, force: bool) -> list[str]:
    """Refuse to resume ``where`` with a different result-changing config; returns the mismatches when forced.

    Raises:
        ResumeMismatchError: some key differs and ``force`` is False.
    """
    if saved is None:
        log.warning("%s holds no run config (older moleflow): result-changing settings cannot be compared.", where)
    mismatches = config_mismatches(saved, settings_dict(cfg))
    if mismatches and not force:
        msg = (
            f"Cannot resume {where}: it was run with a different configuration, and continuing would mix "
            "results of two configurations. Differences:\n  " + "\n  ".join(mismatches) + "\nRerun with the "
            "run's settings, start a new run (drop resume), or set resume_force=true to continue anyway (the "
            "differences are then recorded in metrics.json under run.forced_resumes)."
        )
        raise ResumeMismatchError(msg)
    if mismatches:
        log.warning("resume_force=true: resuming %s despite differences: %s", where, "; ".join(mismatches))
    return mismatches


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


def resolve_resume(cfg: JobConfig, output_dir: Path, overrides: list[str]) -> ResumePoint | None:
    """Interpret ``cfg.resume``: None to start afresh.

    ``true`` or a run directory continue that run in its own directory (from checkpoints/last.ckpt);
    a checkpoint file continues from that file into this run's new directory.
    """
    resume = cfg.resume
    if resume in (None, False, "false", "none", "null"):
        return None
    if resume is True or str(resume).lower() == "true":
        root = Path(cfg.paths["log_dir"]) / cfg.task_name
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


def check_compatible(checkpoint_hparams: dict[str, Any], run_config: dict[str, Any] | None, cfg: JobConfig) -> None:
    """Refuse to continue a run with a different model: name every mismatching key."""
    mismatches = []
    model = settings_dict(cfg)["model"]
    for group in ("flow", "loss", "optimizer", "scheduler"):
        saved, current = checkpoint_hparams.get(group) or {}, model[group] or {}
        for key in sorted(saved.keys() | current.keys()):
            if saved.get(key) != current.get(key):
                mismatches.append(f"model.{group}.{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}")
    if run_config is not None:
        saved_bb, current_bb = run_config["model"]["backbone"], model["backbone"] or {}
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


def check_finished_run(done: dict[str, Any], cfg: JobConfig, run_dir: Path) -> None:
    """A finished run is returned by resume only if it was made with this configuration."""
    try:
        check_same_config(done.get("config"), cfg, run_dir, force=False)
    except ResumeMismatchError as err:
        msg = f"{err}\n{run_dir} has finished: resume_force cannot add tasks to it; start a new run instead."
        raise ResumeMismatchError(msg) from None


def restore_run(
    content: dict[str, Any],
    checkpoint: Path,
    cfg: JobConfig,
    names: list[str],
    tracker: ContinualTracker,
    timings: dict[str, Any],
    run_log: dict[str, Any],
) -> tuple[Any, int]:
    """A run's module and results after its last finished task, from its checked checkpoint ``content``
    (:func:`read_checkpoint` of ``checkpoint``); returns (module, next task)."""
    info = content["moleflow"]
    if "tracker" not in info:
        msg = f"{checkpoint} holds no results to resume from (made by an older moleflow); start a new run."
        raise ValueError(msg)
    module = module_from_checkpoint(content, checkpoint)
    check_compatible(dict(module.hparams), info.get("run_config"), cfg)  # the model itself: never forced
    force = cfg.resume_force
    mismatches = check_same_config(info.get("run_config"), cfg, checkpoint, force)
    if module.task_names != names[: len(module.task_names)]:
        msg = f"{checkpoint} holds tasks {module.task_names}, but this run's task order is {names}."
        raise ValueError(msg)
    tracker.load_state_dict(info["tracker"])
    timings.update(info.get("timings", {}))
    run_log.update(info.get("run_log", {}))
    start_task = len(module.task_names)
    timings.setdefault("resumed_at_tasks", []).append(start_task)
    if mismatches:
        entry = {"at_task": start_task, "checkpoint": str(checkpoint), "differences": mismatches}
        run_log.setdefault("forced_resumes", []).append(entry)
    log.info("Resuming from %s after task %d (%s).", checkpoint, start_task, module.task_names[-1])
    return module, start_task
