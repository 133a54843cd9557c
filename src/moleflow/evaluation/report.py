"""Collecting evaluations across tasks into the study's numbers, metrics.json and the printed table.

R[j][i] (metric of task i after training task j) is kept for every metric, for routed and oracle
scoring, plus routing accuracy; forgetting (FM) and backward transfer (BWT) come from them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moleflow.evaluation.continual import (
    ResultMatrix,
    backward_transfer,
    final_mean,
    forgetting_measure,
    routing_accuracy,
    routing_confusion,
)
from moleflow.evaluation.evaluate import TaskEvaluation
from moleflow.evaluation.metrics import METRIC_NAMES
from moleflow.utils.files import atomic_write_text

MODES = ("routed", "oracle")
TABLE_COLUMNS = (  # (metric key, header) in the study's column order
    ("image_auroc", "Img AUC"),
    ("pixel_auroc", "Pix AUC"),
    ("image_ap", "Img AP"),
    ("pixel_ap", "Pix AP"),
    ("pixel_aupro", "Pix PRO"),  # AUPRO up to 30 % FPR (not in the study's tables)
)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tensors/arrays -> lists, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON (NaN as null) to a temporary file, then rename: a reader never sees half a file."""
    return atomic_write_text(path, json.dumps(_clean(payload), indent=2, allow_nan=False))


class ContinualTracker:
    """Accumulates per-task evaluations after each training task."""

    def __init__(self, task_names: list[str]) -> None:
        self.task_names = list(task_names)
        t = len(task_names)
        self.matrices = {mode: {m: ResultMatrix(t) for m in METRIC_NAMES} for mode in MODES}
        self.routing = ResultMatrix(t)
        self.nonfinite = {mode: [0] * t for mode in MODES}
        self.num_test_images = [0] * t
        self.has_masks = [True] * t
        self.confusion: np.ndarray | None = None
        self.last_task = -1
        self.diverged: dict[str, str] = {}  # task name -> why it is marked as diverged

    def mark_diverged(self, task: int, reason: str) -> bool:
        """Mark a task as diverged (once); returns True the first time, so the caller warns once."""
        name = self.task_names[task]
        if name in self.diverged:
            return False
        self.diverged[name] = reason
        return True

    def record_round(self, after_task: int, evaluations: list[TaskEvaluation]) -> None:
        """Store the evaluations of tasks 0..after_task made after training ``after_task``."""
        for ev in evaluations:
            for mode in MODES:
                metrics = getattr(ev, mode).as_dict()
                for name in METRIC_NAMES:
                    self.matrices[mode][name].set(after_task, ev.task, metrics[name])
            self.routing.set(after_task, ev.task, ev.routing_accuracy)
            self.nonfinite["oracle"][ev.task] = ev.nonfinite_oracle
            self.nonfinite["routed"][ev.task] = ev.nonfinite_routed
            self.num_test_images[ev.task] = len(ev.routed_tasks)
            self.has_masks[ev.task] = ev.has_masks
        true = torch.cat([torch.full_like(ev.routed_tasks, ev.task) for ev in evaluations])
        pred = torch.cat([ev.routed_tasks for ev in evaluations])
        self.confusion = routing_confusion(true.numpy(), pred.numpy(), after_task + 1)
        self.last_task = after_task

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, JSON-safe, so a resumed run continues the same matrices."""
        return _clean(
            {
                "task_names": self.task_names,
                "matrices": {mode: {m: self.matrices[mode][m].to_json() for m in METRIC_NAMES} for mode in MODES},
                "routing": self.routing.to_json(),
                "nonfinite": self.nonfinite,
                "num_test_images": self.num_test_images,
                "has_masks": self.has_masks,
                "confusion": self.confusion,
                "last_task": self.last_task,
                "diverged": self.diverged,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["task_names"] != self.task_names[: len(state["task_names"])]:
            msg = f"Saved results are for tasks {state['task_names']}, this run has {self.task_names}."
            raise ValueError(msg)
        for mode in MODES:
            for m in METRIC_NAMES:
                self.matrices[mode][m] = ResultMatrix.from_json(_pad(state["matrices"][mode][m], len(self.task_names)))
        self.routing = ResultMatrix.from_json(_pad(state["routing"], len(self.task_names)))
        n = len(state["task_names"])
        for mode in MODES:
            self.nonfinite[mode][:n] = state["nonfinite"][mode][:n]
        self.num_test_images[:n] = state["num_test_images"][:n]
        self.has_masks[:n] = state["has_masks"][:n]
        self.confusion = None if state["confusion"] is None else np.asarray(state["confusion"], dtype=np.int64)
        self.last_task = int(state["last_task"])
        self.diverged = dict(state.get("diverged", {}))

    def round_metrics(self, after_task: int) -> dict[str, float]:
        """Flat per-task metric keys for loggers, e.g. ``task/bottle/image_auroc`` (routed)."""
        out: dict[str, float] = {}
        for i in range(after_task + 1):
            name = self.task_names[i]
            for mode in MODES:
                suffix = "" if mode == "routed" else "_oracle"
                for m in METRIC_NAMES:
                    out[f"task/{name}/{m}{suffix}"] = float(self.matrices[mode][m].as_array()[after_task, i])
            out[f"task/{name}/routing_accuracy"] = float(self.routing.as_array()[after_task, i])
            out[f"task/{name}/diverged"] = float(name in self.diverged)
        for mode in MODES:
            suffix = "" if mode == "routed" else "_oracle"
            for m in METRIC_NAMES:
                out[f"mean/{m}{suffix}"] = final_mean(self.matrices[mode][m].as_array(), last=after_task)
        out["mean/routing_accuracy"] = final_mean(self.routing.as_array(), last=after_task)
        out["seen_tasks"] = float(after_task + 1)
        return out

    def summary(self) -> dict[str, Any]:
        """The study's numbers after the last recorded task (means, per task, matrices, FM, BWT, routing)."""
        last = self.last_task
        names = self.task_names[: last + 1]
        final = {
            mode: {m: final_mean(self.matrices[mode][m].as_array(), last=last) for m in METRIC_NAMES} for mode in MODES
        }
        per_task: dict[str, Any] = {}
        for i, name in enumerate(names):
            per_task[name] = {
                mode: {m: float(self.matrices[mode][m].as_array()[last, i]) for m in METRIC_NAMES} for mode in MODES
            }
            per_task[name]["routing_accuracy"] = float(self.routing.as_array()[last, i])
            per_task[name]["num_test_images"] = self.num_test_images[i]
            per_task[name]["pixel_metrics_available"] = self.has_masks[i]
            per_task[name]["diverged"] = self.diverged.get(name)  # None, or the reason
            per_task[name]["nonfinite_scores"] = {mode: self.nonfinite[mode][i] for mode in MODES}
        forgetting = {
            mode: {
                m: {
                    "fm": forgetting_measure(self.matrices[mode][m].as_array(), last=last),
                    "bwt": backward_transfer(self.matrices[mode][m].as_array(), last=last),
                }
                for m in METRIC_NAMES
            }
            for mode in MODES
        }
        overall, per_true = (float("nan"), [])
        if self.confusion is not None:
            overall, per_true = routing_accuracy(self.confusion)
        return {
            "tasks": names,
            "final": final,
            "per_task": per_task,
            "matrices": {
                **{mode: {m: self.matrices[mode][m].to_json() for m in METRIC_NAMES} for mode in MODES},
                "routing_accuracy": self.routing.to_json(),
            },
            "forgetting": forgetting,
            "routing": {
                "accuracy": overall,
                "per_task": dict(zip(names, per_true, strict=False)),
                "confusion": self.confusion,
                "confusion_axes": "rows = true task, columns = routed task, in task order",
            },
        }


def _pad(matrix: list[list[float | None]], size: int) -> list[list[float | None]]:
    """Grow a saved T x T matrix (None = not seen) to size x size."""
    rows = [list(r) + [None] * (size - len(r)) for r in matrix]
    return rows + [[None] * size for _ in range(size - len(rows))]


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def results_table(summary: dict[str, Any], title: str = "MoLE-Flow results") -> Table:
    """Rich table: one row per task, then the mean (routed) and the oracle mean, in percent."""
    table = Table(title=title)
    table.add_column("task")
    for _, header in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("Rt Acc", justify="right")
    for name, row in summary["per_task"].items():
        label = f"{name} (diverged)" if row.get("diverged") else name
        table.add_row(label, *[_pct(row["routed"][k]) for k, _ in TABLE_COLUMNS], _pct(row["routing_accuracy"]))
    table.add_section()
    table.add_row(
        "mean",
        *[_pct(summary["final"]["routed"][k]) for k, _ in TABLE_COLUMNS],
        _pct(summary["routing"]["accuracy"]),
    )
    table.add_row("mean (oracle)", *[_pct(summary["final"]["oracle"][k]) for k, _ in TABLE_COLUMNS], "100.00")
    fm = summary["forgetting"]["routed"]
    table.add_row("FM", *[_pct(fm[k]["fm"]) for k, _ in TABLE_COLUMNS], "")
    table.add_row("BWT", *[_pct(fm[k]["bwt"]) for k, _ in TABLE_COLUMNS], "")
    return table


def print_table(summary: dict[str, Any], title: str = "MoLE-Flow results") -> str:
    """Print the results table and return it as plain text (also stored next to metrics.json)."""
    table = results_table(summary, title)
    Console().print(table)
    with open(os.devnull, "w") as sink:
        recorder = Console(record=True, width=120, file=sink)
        recorder.print(table)
        return recorder.export_text()


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The results table as plain rows (percent, None where not available), for W&B and CSV."""
    columns = ["task", *[h for _, h in TABLE_COLUMNS], "Rt Acc"]

    def pct(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else round(100 * v, 2)

    rows = [
        [
            f"{name} (diverged)" if row.get("diverged") else name,
            *[pct(row["routed"][k]) for k, _ in TABLE_COLUMNS],
            pct(row["routing_accuracy"]),
        ]
        for name, row in summary["per_task"].items()
    ]
    rows.append(
        ["mean", *[pct(summary["final"]["routed"][k]) for k, _ in TABLE_COLUMNS], pct(summary["routing"]["accuracy"])]
    )
    return columns, rows


def log_results_table(loggers: list[Any], summary: dict[str, Any]) -> None:
    """Send the final table to every logger that takes tables (W&B)."""
    columns, rows = table_rows(summary)
    for lg in loggers:
        if hasattr(lg, "log_table"):
            lg.log_table(key="results", columns=columns, data=rows)
