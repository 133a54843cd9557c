"""Finding finished runs (metrics.json, eval_metrics.json) and the table they belong to."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.tables.results import RunRecord
from experiments.tables.specs import (
    ALL_METRICS,
    TABLES,
)


def get_path(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def as_number(value: Any) -> float | None:
    """A finite float, or None (null, missing, NaN): a missing figure is shown as n/a, never as a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _train_record(file: Path, data: dict[str, Any]) -> RunRecord:
    run = data.get("run") or {}
    return RunRecord(
        path=file.parent,
        source="train",
        status=str(data.get("status", "unknown")),
        config=data.get("config") or {},
        overrides=[str(o) for o in run.get("overrides") or []],
        values={m: as_number(get_path(data, spec.train_path)) for m, spec in ALL_METRICS.items()},
        warnings=[str(w) for w in data.get("warnings") or []],
        tasks=[str(t) for t in data.get("tasks") or []],
        device=run.get("device"),
    )


def _origin_of(checkpoint: str, eval_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The training run's metrics.json behind a re-scored checkpoint (``<run>/checkpoints/<file>.ckpt``)."""
    ckpt = Path(checkpoint)
    candidates = [ckpt] if ckpt.is_absolute() else [Path.cwd() / ckpt, eval_dir / ckpt]
    for candidate in candidates:
        metrics = candidate.parent.parent / "metrics.json"
        if metrics.is_file():
            try:
                return metrics, json.loads(metrics.read_text())
            except (OSError, ValueError):
                return metrics, None
    return None, None


def _eval_records(file: Path, data: dict[str, Any]) -> list[RunRecord]:
    origin_file, origin = _origin_of(str(data.get("checkpoint", "")), file.parent)
    base = _train_record(origin_file, origin) if origin_file is not None and origin is not None else None
    problem = None
    if base is None:
        problem = None if origin_file is None else f"the trained run's {origin_file} is unreadable"
    elif base.status != "finished":
        problem = f"re-scores a checkpoint of an unfinished training run (status {base.status!r} in {origin_file})"
    records = []
    for row in data.get("rows") or []:
        k = row.get("score_top_k")
        config = copy.deepcopy(base.config) if base else {}
        config["score_top_k"] = k
        if isinstance(get_path(config, ("model", "score")), dict):
            config["model"]["score"]["top_k"] = k  # the value this row was scored with, as a run would record it
        records.append(
            RunRecord(
                path=file.parent,
                source="eval",
                status="finished",
                config=config,
                overrides=list(base.overrides) if base else [],
                values={
                    m: as_number(get_path(row, spec.eval_path)) if spec.eval_path else None
                    for m, spec in ALL_METRICS.items()
                },
                warnings=[f"(training run) {w}" for w in base.warnings] if base else [],
                tasks=[str(t) for t in data.get("tasks") or []],
                device=base.device if base else None,
                variant={"score_top_k": k},
                problem=problem,
            )
        )
    return records


def collect_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Every metrics.json and eval_metrics.json under ``paths`` (run dirs, multirun dirs or the files)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            msg = f"{p} does not exist"
            raise FileNotFoundError(msg)
        if p.is_file():
            files.append(p)
        else:
            files += sorted(p.rglob("metrics.json")) + sorted(p.rglob("eval_metrics.json"))
    records: list[RunRecord] = []
    seen: set[Path] = set()
    for file in files:
        if file.resolve() in seen:
            continue
        seen.add(file.resolve())
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            source = "eval" if file.name == "eval_metrics.json" else "train"
            records.append(RunRecord(file.parent, source, "unreadable", problem=f"{file.name} unreadable: {err}"))
            continue
        if file.name == "eval_metrics.json":
            records += _eval_records(file, data)
        else:
            records.append(_train_record(file, data))
    return records


def infer_table(runs: Sequence[RunRecord]) -> str:
    """The table the runs were made for: their task_name / group (experiment files set both), or the eval sweep."""
    found: set[str] = set()
    others: set[str] = set()
    for run in runs:
        if run.source == "eval":
            found.update(t.name for t in TABLES.values() if t.source == "eval")
            continue
        for key in ("task_name", "group"):
            value = run.config.get(key)
            if value in TABLES:
                found.add(value)
            elif value:
                others.add(str(value))
    known = ", ".join(TABLES)
    if len(found) == 1:
        return found.pop()
    if not found:
        msg = f"cannot infer the table: the runs have task_name/group {sorted(others)}; pass --table, one of: {known}"
    else:
        msg = f"the runs belong to several tables {sorted(found)}; pass --table, one of: {known}"
    raise ValueError(msg)
