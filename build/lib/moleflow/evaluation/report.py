"""Collecting evaluations across tasks into the study's numbers, metrics.json and the printed table.

R[j][i] (metric of task i after training task j) is kept for every metric, for routed and oracle
scoring, plus routing accuracy; forgetting (FM) and backward transfer (BWT) come from them.

A task marked as diverged (it could not train, or its test set got non-finite scores in some round) stays
in the matrices and the per-task rows, marked, but is left out of every mean, FM and BWT: its numbers
come from replaced NaNs and mean nothing. ``summary()["means"]`` says which tasks the means average.
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

from moleflow.evaluation.continual_metrics import (
    ResultMatrix,
    backward_transfer_per_task,
    forgetting_per_task,
    routing_accuracy,
    routing_confusion,
)
from moleflow.evaluation.evaluate import TaskEvaluation
from moleflow.evaluation.metrics import METRIC_NAMES
from moleflow.utils.files import atomic_write_text

MODES = ("routed", "oracle")
LABELS = {"normal": 0, "defective": 1}  # routing is also counted per test label: a defect must not fool it
TABLE_COLUMNS = (  # (metric key, header) in the study's column order
    ("image_auroc", "Img AUC"),
    ("pixel_auroc", "Pix AUC"),
    ("image_ap", "Img AP"),
    ("pixel_ap", "Pix AP"),
    ("pixel_aupro", "Pix PRO"),  # AUPRO up to 30 % FPR (not in the study's tables)
    ("image_f1_max", "Img F1"),  # best F1 over every threshold (not in the study's tables)
    ("pixel_f1_max", "Pix F1"),
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
        self.routing_by_label = {kind: ResultMatrix(t) for kind in LABELS}
        self.nonfinite = {mode: [0] * t for mode in MODES}
        self.num_test_images = [0] * t
        self.has_masks = [True] * t
        self.confusion: np.ndarray | None = None
        self.confusion_by_label: dict[str, np.ndarray] = {}
        self.last_task = -1
        self.diverged: dict[str, str] = {}  # task name -> why it is marked as diverged

    def mark_diverged(self, task: int, reason: str) -> bool:
        """Mark a task as diverged (once); returns True the first time, so the caller warns once."""
        name = self.task_names[task]
        if name in self.diverged:
            return False
        self.diverged[name] = reason
        return True

    def included(self, last: int) -> list[int]:
        """Tasks 0..last that the means average: all but those marked as diverged."""
        return [i for i in range(last + 1) if self.task_names[i] not in self.diverged]

    def _mean(self, matrix: ResultMatrix, last: int) -> float:
        """Mean of row ``last`` over the included tasks (NaN if a value is undefined, or no task is left)."""
        idx = self.included(last)
        return float(np.mean(matrix.as_array()[last, idx])) if idx else math.nan

    def _transfer(self, terms: np.ndarray, last: int) -> float:
        """Mean of per-task FM or BWT terms (tasks i < last) over the included tasks."""
        idx = [i for i in self.included(last) if i < last]
        return float(np.mean(terms[idx])) if idx else math.nan

    def record_round(self, after_task: int, evaluations: list[TaskEvaluation]) -> list[tuple[str, str]]:
        """Store the evaluations of tasks 0..after_task made after training ``after_task``.

        Returns the tasks newly marked as diverged because their scores were non-finite, with the reason.
        """
        newly: list[tuple[str, str]] = []
        for ev in evaluations:
            if ev.nonfinite_oracle or ev.nonfinite_routed:
                reason = (
                    f"non-finite scores on its test set after task {self.task_names[after_task]} "
                    f"({ev.nonfinite_oracle} patch scores with its own expert, {ev.nonfinite_routed} as routed)"
                )
                if self.mark_diverged(ev.task, reason):
                    newly.append((ev.name, reason))
        for ev in evaluations:
            for mode in MODES:
                metrics = getattr(ev, mode).as_dict()
                for name in METRIC_NAMES:
                    self.matrices[mode][name].set(after_task, ev.task, metrics[name])
            self.routing.set(after_task, ev.task, ev.routing_accuracy)
            for kind, label in LABELS.items():
                self.routing_by_label[kind].set(after_task, ev.task, ev.routing_accuracy_of(label))
            self.nonfinite["oracle"][ev.task] = ev.nonfinite_oracle
            self.nonfinite["routed"][ev.task] = ev.nonfinite_routed
            self.num_test_images[ev.task] = len(ev.routed_tasks)
            self.has_masks[ev.task] = ev.has_masks
        true = torch.cat([torch.full_like(ev.routed_tasks, ev.task) for ev in evaluations])
        pred = torch.cat([ev.routed_tasks for ev in evaluations])
        self.confusion = routing_confusion(true.numpy(), pred.numpy(), after_task + 1)
        labels = torch.cat([ev.labels for ev in evaluations])
        self.confusion_by_label = {
            kind: routing_confusion(true[labels == label].numpy(), pred[labels == label].numpy(), after_task + 1)
            for kind, label in LABELS.items()
        }
        self.last_task = after_task
        return newly

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, JSON-safe, so a resumed run continues the same matrices."""
        return _clean(
            {
                "task_names": self.task_names,
                "matrices": {mode: {m: self.matrices[mode][m].to_json() for m in METRIC_NAMES} for mode in MODES},
                "routing": self.routing.to_json(),
                "routing_by_label": {kind: m.to_json() for kind, m in self.routing_by_label.items()},
                "nonfinite": self.nonfinite,
                "num_test_images": self.num_test_images,
                "has_masks": self.has_masks,
                "confusion": self.confusion,
                "confusion_by_label": self.confusion_by_label,
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
        for kind, matrix in (state.get("routing_by_label") or {}).items():  # absent in checkpoints before 0.14
            self.routing_by_label[kind] = ResultMatrix.from_json(_pad(matrix, len(self.task_names)))
        n = len(state["task_names"])
        for mode in MODES:
            self.nonfinite[mode][:n] = state["nonfinite"][mode][:n]
        self.num_test_images[:n] = state["num_test_images"][:n]
        self.has_masks[:n] = state["has_masks"][:n]
        self.confusion = None if state["confusion"] is None else np.asarray(state["confusion"], dtype=np.int64)
        self.confusion_by_label = {
            kind: np.asarray(c, dtype=np.int64) for kind, c in (state.get("confusion_by_label") or {}).items()
        }
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
            for kind, matrix in self.routing_by_label.items():
                out[f"task/{name}/routing_accuracy_{kind}"] = float(matrix.as_array()[after_task, i])
            out[f"task/{name}/diverged"] = float(name in self.diverged)
        for mode in MODES:
            suffix = "" if mode == "routed" else "_oracle"
            for m in METRIC_NAMES:
                out[f"mean/{m}{suffix}"] = self._mean(self.matrices[mode][m], after_task)
        out["mean/routing_accuracy"] = self._mean(self.routing, after_task)
        for kind in LABELS:
            out[f"mean/routing_accuracy_{kind}"] = self._mean(self.routing_by_label[kind], after_task)
            if self.confusion_by_label.get(kind) is not None:
                out[f"routing/accuracy_{kind}"] = routing_accuracy(self.confusion_by_label[kind])[0]
        out["mean/tasks_averaged"] = float(len(self.included(after_task)))
        out["seen_tasks"] = float(after_task + 1)
        return out

    def summary(self) -> dict[str, Any]:
        """The study's numbers after the last recorded task (means, per task, matrices, FM, BWT, routing)."""
        last = self.last_task
        names = self.task_names[: last + 1]
        final = {mode: {m: self._mean(self.matrices[mode][m], last) for m in METRIC_NAMES} for mode in MODES}
        per_task: dict[str, Any] = {}
        for i, name in enumerate(names):
            per_task[name] = {
                mode: {m: float(self.matrices[mode][m].as_array()[last, i]) for m in METRIC_NAMES} for mode in MODES
            }
            per_task[name]["routing_accuracy"] = float(self.routing.as_array()[last, i])
            for kind, matrix in self.routing_by_label.items():
                per_task[name][f"routing_accuracy_{kind}"] = float(matrix.as_array()[last, i])
            per_task[name]["num_test_images"] = self.num_test_images[i]
            per_task[name]["pixel_metrics_available"] = self.has_masks[i]
            per_task[name]["diverged"] = self.diverged.get(name)  # None, or the reason
            per_task[name]["in_means"] = name not in self.diverged
            per_task[name]["nonfinite_scores"] = {mode: self.nonfinite[mode][i] for mode in MODES}
        forgetting = {
            mode: {
                m: {
                    "fm": self._transfer(forgetting_per_task(self.matrices[mode][m].as_array(), last), last),
                    "bwt": self._transfer(backward_transfer_per_task(self.matrices[mode][m].as_array(), last), last),
                }
                for m in METRIC_NAMES
            }
            for mode in MODES
        }
        overall, per_true = (float("nan"), [])
        if self.confusion is not None:
            overall, per_true = routing_accuracy(self.confusion)
        by_label: dict[str, Any] = {}
        for kind in LABELS:
            confusion = self.confusion_by_label.get(kind)
            acc, per = routing_accuracy(confusion) if confusion is not None else (float("nan"), [])
            by_label[kind] = {
                "accuracy": acc,
                "images": int(confusion.sum()) if confusion is not None else 0,
                "per_task": dict(zip(names, per, strict=False)),
                "confusion": confusion,
            }
        included = [names[i] for i in self.included(last)]
        return {
            "tasks": names,
            "final": final,
            "means": {
                "tasks": included,
                "averaged": len(included),
                "of": len(names),
                "excluded": {n: self.diverged[n] for n in names if n in self.diverged},
                "note": "means, FM and BWT average the tasks listed; routing accuracy counts every test image",
            },
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
                "by_label": by_label,
                "note": "by_label counts defect-free (normal) and defective test images apart; "
                "accuracy counts every test image of that label",
            },
        }


def _pad(matrix: list[list[float | None]], size: int) -> list[list[float | None]]:
    """Grow a saved T x T matrix (None = not seen) to size x size."""
    rows = [list(r) + [None] * (size - len(r)) for r in matrix]
    return rows + [[None] * size for _ in range(size - len(rows))]


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _mean_label(summary: dict[str, Any], kind: str = "") -> str:
    """ "mean", or "mean (2 of 3 tasks)" when diverged tasks are left out of it; ``kind`` e.g. "oracle"."""
    means = summary.get("means") or {}
    notes = [kind] if kind else []
    if means.get("averaged", 0) != means.get("of", 0):
        notes.append(f"{means['averaged']} of {means['of']} tasks")
    return f"mean ({', '.join(notes)})" if notes else "mean"


ROUTING_COLUMNS = (  # routing accuracy: every test image, the defect-free ones, the defective ones
    ("routing_accuracy", "Rt Acc"),
    ("routing_accuracy_normal", "Rt Nrm"),
    ("routing_accuracy_defective", "Rt Def"),
)


def _task_routing(row: dict[str, Any]) -> list[float | None]:
    """A task row's routing accuracies in ROUTING_COLUMNS order (None where not recorded)."""
    return [row.get(key) for key, _ in ROUTING_COLUMNS]


def _overall_routing(summary: dict[str, Any]) -> list[float | None]:
    """Routing accuracy over every test image: all, defect-free, defective (ROUTING_COLUMNS order)."""
    routing = summary["routing"]
    by_label = routing.get("by_label") or {}
    return [
        routing["accuracy"],
        (by_label.get("normal") or {}).get("accuracy"),
        (by_label.get("defective") or {}).get("accuracy"),
    ]


def results_table(summary: dict[str, Any], title: str = "MoLE-Flow results") -> Table:
    """Rich table: one row per task, then the mean (routed) and the oracle mean, in percent."""
    table = Table(title=title)
    table.add_column("task")
    for _, header in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    for _, header in ROUTING_COLUMNS:
        table.add_column(header, justify="right")
    for name, row in summary["per_task"].items():
        label = f"{name} (diverged)" if row.get("diverged") else name
        routed = [_pct(row["routed"][k]) for k, _ in TABLE_COLUMNS]
        table.add_row(label, *routed, *[_pct(v) for v in _task_routing(row)])
    table.add_section()
    table.add_row(
        _mean_label(summary),
        *[_pct(summary["final"]["routed"][k]) for k, _ in TABLE_COLUMNS],
        *[_pct(v) for v in _overall_routing(summary)],
    )
    table.add_row(
        _mean_label(summary, "oracle"),
        *[_pct(summary["final"]["oracle"][k]) for k, _ in TABLE_COLUMNS],
        *(["100.00"] * len(ROUTING_COLUMNS)),
    )
    fm = summary["forgetting"]["routed"]
    blank = [""] * len(ROUTING_COLUMNS)
    table.add_row("FM", *[_pct(fm[k]["fm"]) for k, _ in TABLE_COLUMNS], *blank)
    table.add_row("BWT", *[_pct(fm[k]["bwt"]) for k, _ in TABLE_COLUMNS], *blank)
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
    columns = ["task", *[h for _, h in TABLE_COLUMNS], *[h for _, h in ROUTING_COLUMNS]]

    def pct(v: float | None) -> float | None:
        return None if v is None or not math.isfinite(v) else round(100 * v, 2)

    rows = [
        [
            f"{name} (diverged)" if row.get("diverged") else name,
            *[pct(row["routed"][k]) for k, _ in TABLE_COLUMNS],
            *[pct(v) for v in _task_routing(row)],
        ]
        for name, row in summary["per_task"].items()
    ]
    rows.append(
        [
            _mean_label(summary),
            *[pct(summary["final"]["routed"][k]) for k, _ in TABLE_COLUMNS],
            *[pct(v) for v in _overall_routing(summary)],
        ]
    )
    return columns, rows


def log_results_table(loggers: list[Any], summary: dict[str, Any]) -> None:
    """Send the final table to every logger that takes tables (W&B)."""
    columns, rows = table_rows(summary)
    for lg in loggers:
        if hasattr(lg, "log_table"):
            lg.log_table(key="results", columns=columns, data=rows)
