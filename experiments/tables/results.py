"""What a table is made of: one run's record, a row's statistics, the finished table and its Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.tables.specs import (
    RowSpec,
    TableSpec,
)

NOT_RUN = "—"
NA = "n/a"
WITHIN = "≈"


@dataclass
class RunRecord:
    """One result: a training run's metrics.json, or one score-top-k row of an eval_metrics.json."""

    path: Path  # the directory holding the file
    source: str  # "train" | "eval"
    status: str
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    values: dict[str, float | None] = field(default_factory=dict)  # metric id -> value as stored (fractions)
    warnings: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    device: str | None = None
    variant: dict[str, Any] = field(default_factory=dict)  # eval rows: {"score_top_k": k}
    problem: str | None = None  # why the record cannot be used (unreadable file, unfinished training)

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return int(seed) if isinstance(seed, int | float) else None

    @property
    def name(self) -> str:
        extra = "".join(f" ({k}={v})" for k, v in self.variant.items())
        return f"{self.path}{extra}"


@dataclass
class Stat:
    """Mean and sample std (percent) of one metric over a row's runs; std is None with fewer than two values."""

    mean: float | None
    std: float | None
    n: int  # runs with a value
    n_null: int  # runs where the metric is null


@dataclass
class RowResult:
    """One table row: its runs, statistics, deltas against MAIN and rendered cells."""

    spec: RowSpec
    runs: list[RunRecord]
    is_main: bool
    stats: dict[str, Stat] = field(default_factory=dict)
    deltas: dict[str, float | None] = field(default_factory=dict)
    within_spread: dict[str, bool] = field(default_factory=dict)
    note: str = ""
    cells: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def n_seeds(self) -> int:
        return len(self.runs)

    def name_in(self, spec: TableSpec) -> str:
        """The row named for footnotes: a bare number ("4") is named by its columns ("NCL 4")."""
        if self.label.replace(".", "").replace("e-", "").isdigit():
            return " / ".join(
                f"{h} {c}" for h, c in zip(spec.label_headers, [self.label, *self.spec.cells], strict=True)
            )
        return self.label


@dataclass
class TableResult:
    """A built table: rows with rendered cells, footnotes, provenance; ``markdown()`` renders it."""

    spec: TableSpec
    reference: bool
    header: list[str]
    rows: list[RowResult]
    footnotes: list[str]
    notes: list[str]
    data_line: str
    overrides_line: str
    runs_used: list[RunRecord]
    skipped: list[tuple[str, str]]

    def row(self, label: str) -> RowResult:
        for r in self.rows:
            if r.label == label:
                return r
        msg = f"no row {label!r} in {self.spec.name}; rows: {[r.label for r in self.rows]}"
        raise KeyError(msg)

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        out = [f"# {self.spec.title}", "", self.data_line, ""]
        if self.overrides_line:
            out += [self.overrides_line, ""]
        out += [line(self.header), line(["---"] * len(self.header))]
        out += [line(r.cells) for r in self.rows]
        out.append("")
        out += [f"- {n}" for n in self.notes]
        out += [f"- [{i}] {text}" for i, text in enumerate(self.footnotes, start=1)]
        if self.reference and self.spec.reading:
            out += ["", f"Reference reading (docs/study.md): {self.spec.reading}"]
        out += ["", f"## Runs used ({len(self.runs_used)})", ""]
        by_run = {id(run): r.name_in(self.spec) for r in self.rows for run in r.runs}
        out += [f"- {by_run[id(run)]} · seed {run.seed} · {run.name}" for run in self.runs_used] or ["- none"]
        if self.skipped:
            out += ["", f"## Skipped ({len(self.skipped)})", ""]
            out += [f"- {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(out) + "\n"
