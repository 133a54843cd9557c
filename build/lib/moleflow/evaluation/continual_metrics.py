"""Continual-learning bookkeeping: the result matrix R, forgetting, backward transfer and routing.

R[j][i] is a metric (e.g. image AUROC) of task i measured right after training task j; entries with
i > j (task not seen yet) are NaN. All measures take an explicit ``last`` row so that they can be
reported after any task, not only the final one. NaN entries never crash a measure: they propagate as
NaN into the terms they touch (and hence into the mean), so a caller sees "undefined" rather than a
silently biased number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moleflow.evaluation.metrics import _to_numpy

__all__ = [
    "ResultMatrix",
    "backward_transfer",
    "backward_transfer_per_task",
    "final_mean",
    "forgetting_measure",
    "forgetting_per_task",
    "routing_accuracy",
    "routing_confusion",
]


class ResultMatrix:
    """T x T matrix of one metric: ``R[j][i]`` = value for task ``i`` after training task ``j``.

    Entries not set (in particular ``i > j``, tasks not seen yet) stay NaN.
    """

    def __init__(self, num_tasks: int) -> None:
        """Create an all-NaN matrix for ``num_tasks`` tasks."""
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            msg = f"num_tasks must be a positive int, got {num_tasks!r}."
            raise ValueError(msg)
        self._r = np.full((num_tasks, num_tasks), np.nan, dtype=np.float64)

    @property
    def num_tasks(self) -> int:
        """Number of tasks T."""
        return self._r.shape[0]

    def set(self, after_task: int, task: int, value: float) -> None:
        """Record the metric of ``task`` measured after training ``after_task``.

        Raises:
            IndexError: If an index is outside ``[0, T)`` or ``task > after_task`` (a task cannot be
                evaluated before it has been trained).
        """
        t = self.num_tasks
        if not (0 <= after_task < t and 0 <= task < t):
            msg = f"after_task={after_task} and task={task} must both lie in [0, {t}); check the indices."
            raise IndexError(msg)
        if task > after_task:
            msg = (
                f"task {task} cannot be evaluated after training only up to task {after_task}; "
                "R[j][i] is defined for i <= j."
            )
            raise IndexError(msg)
        self._r[after_task, task] = float(value)

    def row(self, after_task: int) -> np.ndarray:
        """Return a copy of row ``after_task`` (length T, NaN for unseen or missing tasks)."""
        if not 0 <= after_task < self.num_tasks:
            msg = f"after_task={after_task} must lie in [0, {self.num_tasks})."
            raise IndexError(msg)
        return self._r[after_task].copy()

    def as_array(self) -> np.ndarray:
        """Return a T x T float64 copy, NaN where unset."""
        return self._r.copy()

    def to_json(self) -> list[list[float | None]]:
        """Return the matrix as nested lists with ``None`` for NaN (JSON has no NaN)."""
        return [[None if math.isnan(v) else float(v) for v in row] for row in self._r.tolist()]

    @classmethod
    def from_json(cls, data: list[list[float | None]]) -> ResultMatrix:
        """Rebuild a matrix from :meth:`to_json` output (e.g. read back from ``metrics.json``)."""
        t = len(data)
        if t == 0 or any(len(row) != t for row in data):
            lengths = [len(r) for r in data]
            msg = f"expected a non-empty square list of lists, got {t} rows of lengths {lengths}."
            raise ValueError(msg)
        out = cls(t)
        out._r[:] = np.array([[np.nan if v is None else float(v) for v in row] for row in data])
        return out

    def __repr__(self) -> str:
        return f"ResultMatrix(num_tasks={self.num_tasks})\n{self._r}"


def _check_matrix(r: Any, last: int | None) -> tuple[np.ndarray, int]:
    """Validate R and resolve ``last`` (default: last row)."""
    if isinstance(r, ResultMatrix):
        r = r.as_array()
    arr = np.asarray(r, dtype=np.float64)
    if arr.ndim != 2:
        msg = f"R must be a 2-D matrix R[after_task][task], got shape {arr.shape}."
        raise ValueError(msg)
    rows, cols = arr.shape
    last = rows - 1 if last is None else int(last)
    if not 0 <= last < rows or last >= cols:
        msg = f"last={last} must index a row of R (shape {arr.shape}) that has a column for task `last`."
        raise ValueError(msg)
    return arr, last


def forgetting_per_task(r: Any, last: int | None = None) -> np.ndarray:
    """Per-task forgetting ``max_{l in [i, L)} R[l][i] - R[L][i]`` for i < L, with L = ``last``.

    The maximum runs over the rows in which task i had been seen *before* row L (the standard
    definition of Chaudhry et al., max over l in {i..T-2}); row L itself is excluded, so forgetting
    can be negative when a task improved. NaN in any entry used makes that task's term NaN.

    Returns:
        (L,) float64 array; empty when L == 0.
    """
    arr, last = _check_matrix(r, last)
    terms = np.empty(last, dtype=np.float64)
    for i in range(last):
        terms[i] = np.max(arr[i:last, i]) - arr[last, i]  # np.max propagates NaN
    return terms


def forgetting_measure(r: Any, last: int | None = None) -> float:
    """Forgetting measure FM = mean over i < L of the per-task forgetting (see :func:`forgetting_per_task`).

    Args:
        r: T x T result matrix (array or :class:`ResultMatrix`), NaN where unseen.
        last: Row L taken as "now" (default: the last row), to report FM after any task.

    Returns:
        FM (lower is better), NaN when L == 0 (no earlier task) or when any term is NaN.
    """
    terms = forgetting_per_task(r, last)
    return float(np.mean(terms)) if terms.size else math.nan


def backward_transfer_per_task(r: Any, last: int | None = None) -> np.ndarray:
    """Per-task backward transfer ``R[L][i] - R[i][i]`` for i < L, with L = ``last``.

    Returns:
        (L,) float64 array; empty when L == 0. NaN entries give NaN terms.
    """
    arr, last = _check_matrix(r, last)
    idx = np.arange(last)
    return arr[last, idx] - arr[idx, idx]


def backward_transfer(r: Any, last: int | None = None) -> float:
    """Backward transfer BWT = mean over i < L of ``R[L][i] - R[i][i]`` (negative = forgetting).

    Args:
        r: T x T result matrix (array or :class:`ResultMatrix`), NaN where unseen.
        last: Row L taken as "now" (default: the last row).

    Returns:
        BWT, NaN when L == 0 or when any term is NaN.
    """
    terms = backward_transfer_per_task(r, last)
    return float(np.mean(terms)) if terms.size else math.nan


def final_mean(r: Any, last: int | None = None) -> float:
    """Unweighted mean of row L over tasks 0..L (the headline "mean over tasks" number).

    Deliberately not a ``nanmean``: if any task's value is NaN (e.g. undefined metric), the mean is
    NaN so the caller reports it instead of averaging over a silently smaller set of tasks.

    Args:
        r: T x T result matrix (array or :class:`ResultMatrix`).
        last: Row L (default: the last row).
    """
    arr, last = _check_matrix(r, last)
    return float(np.mean(arr[last, : last + 1]))


def routing_confusion(true_tasks: Any, predicted_tasks: Any, num_tasks: int) -> np.ndarray:
    """Count routing decisions: ``C[t, p]`` = number of images of true task t routed to task p.

    Args:
        true_tasks: (N,) integer true task ids (numpy, torch or sequence).
        predicted_tasks: (N,) integer task ids chosen by the router.
        num_tasks: Matrix size; every id must lie in ``[0, num_tasks)``.

    Returns:
        (num_tasks, num_tasks) int64 counts, rows = true task, columns = predicted task.

    Raises:
        ValueError: On length mismatch, non-integer or out-of-range ids.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        msg = f"num_tasks must be a positive int, got {num_tasks!r}."
        raise ValueError(msg)
    t = _to_numpy(true_tasks, "true_tasks").reshape(-1)
    p = _to_numpy(predicted_tasks, "predicted_tasks").reshape(-1)
    if t.shape != p.shape:
        msg = f"true_tasks and predicted_tasks differ in length ({t.size} vs {p.size}); pass one of each per image."
        raise ValueError(msg)
    for name, a in (("true_tasks", t), ("predicted_tasks", p)):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            msg = f"{name} must hold integer task ids, got dtype {a.dtype}."
            raise ValueError(msg)
        if a.size and (a.min() < 0 or a.max() >= num_tasks):
            msg = f"{name} has ids in [{a.min()}, {a.max()}], outside [0, {num_tasks}); check num_tasks."
            raise ValueError(msg)
    flat = t.astype(np.int64) * num_tasks + p.astype(np.int64)
    return np.bincount(flat, minlength=num_tasks * num_tasks).astype(np.int64).reshape(num_tasks, num_tasks)


def routing_accuracy(confusion: Any) -> tuple[float, list[float]]:
    """Overall and per-true-task routing accuracy from a confusion matrix.

    Args:
        confusion: (T, T) counts from :func:`routing_confusion`.

    Returns:
        ``(overall, per_task)``: overall = trace / total; per_task[t] = C[t, t] / sum(C[t]). NaN where
        there is nothing to count (no images at all, or none of task t).
    """
    c = np.asarray(confusion)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        msg = f"confusion must be a square (T, T) matrix, got shape {c.shape}."
        raise ValueError(msg)
    total = c.sum()
    overall = float(np.trace(c) / total) if total > 0 else math.nan
    row_sums = c.sum(axis=1)
    diag = np.diag(c)
    per_task = [float(d / s) if s > 0 else math.nan for d, s in zip(diag, row_sums, strict=True)]
    return overall, per_task
