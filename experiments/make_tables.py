"""Turn finished training runs into the study's tables (Markdown, CSV, PNG), with seed spread and provenance.

    python experiments/make_tables.py logs/table1_core_ablation/multiruns/<date> [--table NAME] [--reference]

Every figure comes from a metrics.json (or an eval_metrics.json row for the score top-k sweep):
nothing is filled in. A row without runs says "not run"; an unfinished run is skipped and listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (python experiments/make_tables.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.table_specs import (
    ALL_METRICS,
    DATA_NAMES,
    METRICS,
    MVTEC_CATEGORIES,
    PLOT_DELTAS,
    REFERENCE_SETTING,
    REFERENCE_SPREAD,
    TABLES,
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
            out += ["", f"Reference reading (seed_experiments.md): {self.spec.reading}"]
        out += ["", f"## Runs used ({len(self.runs_used)})", ""]
        by_run = {id(run): r.name_in(self.spec) for r in self.rows for run in r.runs}
        out += [f"- {by_run[id(run)]} · seed {run.seed} · {run.name}" for run in self.runs_used] or ["- none"]
        if self.skipped:
            out += ["", f"## Skipped ({len(self.skipped)})", ""]
            out += [f"- {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- collecting


def _get(data: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _number(value: Any) -> float | None:
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
        values={m: _number(_get(data, spec.train_path)) for m, spec in ALL_METRICS.items()},
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
        config = dict(base.config) if base else {}
        config["score_top_k"] = k
        records.append(
            RunRecord(
                path=file.parent,
                source="eval",
                status="finished",
                config=config,
                overrides=list(base.overrides) if base else [],
                values={
                    m: _number(_get(row, spec.eval_path)) if spec.eval_path else None for m, spec in ALL_METRICS.items()
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


# --------------------------------------------------------------------------------------------- building


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _ablation_of(run: RunRecord) -> str | None:
    """The run's ablation: the resolved ``ablation_name`` (set by every ablation file), else the override."""
    name = run.config.get("ablation_name")
    if isinstance(name, str) and name:
        return name
    for o in run.overrides:
        if "=" in o and _override_key(o) == "ablation":
            return o.split("=", 1)[1]
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _value_label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _row_key(spec: TableSpec, run: RunRecord) -> tuple[str | float | None, str]:
    """The row a run belongs to, or None and the reason it belongs to none."""
    if spec.row_by == "ablation":
        name = _ablation_of(run)
        if name is None:
            return None, "no +ablation=NAME override (add +ablation=main for a MAIN run)"
        return name, f"+ablation={name}"
    value = run.config.get(spec.row_by)
    if _number(value) is None:
        return None, f"config has no numeric {spec.row_by} ({value!r})"
    return float(value), f"{spec.row_by}={_value_label(float(value))}"


def _run_order(run: RunRecord) -> tuple[bool, int, str]:
    return run.seed is None, run.seed or 0, run.name


def _stat(values: list[float | None], scale: float) -> Stat:
    present = [v * scale for v in values if v is not None]
    n_null = len(values) - len(present)
    if not present:
        return Stat(None, None, 0, n_null)
    std = statistics.stdev(present) if len(present) > 1 else None
    return Stat(statistics.fmean(present), std, len(present), n_null)


def _fmt(value: float | None) -> str:
    return NA if value is None else f"{value:.2f}"


def _fmt_delta(value: float) -> str:
    text = f"{value:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def _fmt_stat(stat: Stat) -> str:
    if stat.mean is None:
        return NA
    return f"{stat.mean:.2f}" if stat.std is None else f"{stat.mean:.2f} ± {stat.std:.2f}"


class _Footnotes:
    """Numbered footnotes, one number per distinct text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def _ref_delta(spec: TableSpec, row: RowSpec, metric: str) -> float | None:
    """The study's delta: as typed in where the study shows it, else from its two reference figures."""
    if metric in row.ref_delta:
        return row.ref_delta[metric]
    main = next((r for r in spec.rows if _same(r.key, spec.main)), None)
    if main is None or metric not in row.ref or metric not in main.ref:
        return None
    return row.ref[metric] - main.ref[metric]


def _other_overrides(spec: TableSpec, run: RunRecord) -> tuple[str, ...]:
    """The run's overrides besides its row identity and seed (what else was changed on the command line)."""
    skip = {"seed", "resume", "ablation" if spec.row_by == "ablation" else spec.row_by}
    return tuple(sorted(o for o in run.overrides if _override_key(o) not in skip))


def _describe_data(runs: Sequence[RunRecord]) -> str:
    """Where the figures come from, in words: data set, tasks, backbone, epochs, device."""

    def distinct(values: Iterable[str]) -> str:
        return " / ".join(dict.fromkeys(values)) or "unknown"

    def data_name(run: RunRecord) -> str:
        name = str(_get(run.config, ("data", "name")) or "unknown data")
        text = DATA_NAMES.get(name, f"{name}, not MVTec AD")
        if name == "mvtec" and len(run.tasks) != MVTEC_CATEGORIES:
            text += f" ({len(run.tasks)} of {MVTEC_CATEGORIES} categories)"
        return text

    def backbone(run: RunRecord) -> str:
        bb = _get(run.config, ("model", "backbone")) or {}
        if not bb:
            return "unknown"
        pretrained = bb.get("pretrained") or bb.get("weights")
        return f"{bb.get('name', '?')} ({'pretrained' if pretrained else 'random init'})"

    if not runs:
        return "No finished runs: the table holds no figures."
    return (
        "Figures from the runs listed below, on whatever data they used — "
        f"data: {distinct(data_name(r) for r in runs)}; "
        f"tasks: {distinct(str(len(r.tasks)) for r in runs)}; "
        f"backbone: {distinct(backbone(r) for r in runs)}; "
        f"epochs per task: {distinct(str(_get(r.config, ('training', 'epochs'))) for r in runs)}; "
        f"device: {distinct(str(r.device) for r in runs)}. "
        "Cells: mean ± sample std over seeds, in percent (one seed: the value alone)."
    )


def build_table(table_name: str, runs: Sequence[RunRecord], reference: bool = False) -> TableResult:
    """Group finished runs into the rows of ``table_name`` and render its cells (no figure is ever filled in)."""
    if table_name not in TABLES:
        msg = f"unknown table {table_name!r}; known tables: {', '.join(TABLES)}"
        raise ValueError(msg)
    spec = TABLES[table_name]
    skipped: list[tuple[str, str]] = []
    by_key: dict[int, list[RunRecord]] = {i: [] for i in range(len(spec.rows))}
    extra: dict[float, list[RunRecord]] = {}
    other_source = 0
    for run in runs:
        if run.source != spec.source:
            other_source += 1
            continue
        if run.problem:
            skipped.append((run.name, run.problem))
            continue
        if run.status != "finished":
            skipped.append((run.name, f"status {run.status!r}: the job has not finished (or died)"))
            continue
        bad = [
            f"{k}={run.config.get(k)!r} (this table needs {v!r})"
            for k, v in spec.fixed.items()
            if not _same(run.config.get(k), v)
        ]
        if bad:
            skipped.append((run.name, "; ".join(bad)))
            continue
        key, what = _row_key(spec, run)
        index = next((i for i, r in enumerate(spec.rows) if key is not None and _same(r.key, key)), None)
        if index is not None:
            by_key[index].append(run)
        elif key is not None and spec.open_rows and not isinstance(key, str):
            extra.setdefault(float(key), []).append(run)
        else:
            skipped.append((run.name, f"not a row of {spec.name} ({what})"))

    row_specs = [(r, by_key[i]) for i, r in enumerate(spec.rows)]
    for value, members in extra.items():
        row_specs.append((RowSpec(value, _value_label(value), note="not in the study"), members))
    if extra and all(not isinstance(r.key, str) for r, _ in row_specs):
        row_specs.sort(key=lambda item: float(item[0].key))

    rows = [RowResult(r, sorted(members, key=_run_order), False) for r, members in row_specs]
    for row in rows:
        row.is_main = _same(row.spec.key, spec.main)
        row.stats = {m: _stat([run.values.get(m) for run in row.runs], s.scale) for m, s in ALL_METRICS.items()}
    main = next((r for r in rows if r.is_main), None)
    main_ok = main is not None and bool(main.runs)
    for row in rows:
        for m in ALL_METRICS:
            mine, ref = row.stats[m], main.stats[m] if main_ok else None
            if not main_ok or ref is None or mine.mean is None or ref.mean is None:
                row.deltas[m] = None
                row.within_spread[m] = False
                continue
            row.deltas[m] = mine.mean - ref.mean
            spread = max((s for s in (mine.std, ref.std) if s is not None), default=None)
            row.within_spread[m] = spread is not None and not row.is_main and abs(row.deltas[m]) < spread

    foot = _Footnotes()
    notes: list[str] = []
    header = _header(spec, reference)
    for row in rows:
        row.cells = _cells(spec, row, reference, foot, main_ok)

    used = [run for row in rows for run in row.runs]
    if any(row.within_spread.get(m) for row in rows for m in spec.deltas):
        notes.append(
            f"{WITHIN} after a delta: |Δ| is smaller than the larger seed std of this row and MAIN: "
            "within seed spread, not a measured effect."
        )
    single = [row.name_in(spec) for row in rows if row.n_seeds == 1]
    if single:
        if all(row.n_seeds <= 1 for row in rows):
            notes.append(
                "One seed per row: no seed spread, so deltas and differences between rows cannot be "
                f"judged against it ({REFERENCE_SPREAD})."
            )
        else:
            notes.append(
                f"Rows with a single seed ({', '.join(single)}): deltas involving them are judged against the "
                "other row's spread only (or not at all)."
            )
    if not main_ok:
        main_label = main.label if main is not None else str(spec.main)
        notes.append(f"MAIN ({main_label}) not run: no deltas.")
    if spec.param_note and main_ok:
        notes.append(_param_note(rows, main))
    if reference:
        notes.append(f"(ref) columns: the reference study's figures ({REFERENCE_SETTING}); {NOT_RUN} = not reported.")
    if spec.source == "eval":
        notes.append("Evaluation only: each trained run is re-scored for every top-k by src/eval.py (no retraining).")
    if other_source:
        other = "metrics.json" if spec.source == "eval" else "eval_metrics.json rows"
        notes.append(f"{other_source} {other} found under the paths were not used (this table reads the other kind).")
    return TableResult(
        spec=spec,
        reference=reference,
        header=header,
        rows=rows,
        footnotes=foot.texts,
        notes=notes,
        data_line=_describe_data(used),
        overrides_line=_overrides_line(spec, rows),
        runs_used=used,
        skipped=skipped,
    )


def _header(spec: TableSpec, reference: bool) -> list[str]:
    header = list(spec.label_headers)
    for m in spec.metrics:
        header += [METRICS[m].header] + ([f"{METRICS[m].header} (ref)"] if reference else [])
    for m in spec.deltas:
        header += [f"Δ {METRICS[m].header}"] + ([f"Δ {METRICS[m].header} (ref)"] if reference else [])
    header += ["seeds", "note"]
    if reference and any(r.ref_note for r in spec.rows):
        header.append("note (ref)")
    return header


def _cells(spec: TableSpec, row: RowResult, reference: bool, foot: _Footnotes, main_ok: bool) -> list[str]:
    """The rendered cells of one row; row-level remarks go into the note cell (long ones as footnotes)."""
    notes = [row.spec.note] if row.spec.note else []
    if not row.runs:
        notes.append("not run")
    cells = [row.spec.label, *row.spec.cells]
    for m in spec.metrics:
        stat = row.stats[m]
        cells.append(NOT_RUN if not row.runs else _fmt_stat(stat))
        if reference:
            cells.append(_fmt(row.spec.ref[m]) if m in row.spec.ref else NOT_RUN)
        if row.runs and stat.n_null and stat.n:
            text = f"{row.name_in(spec)}: {METRICS[m].header} is null in {stat.n_null} of {row.n_seeds} runs"
            notes.append(foot.mark(f"{text}; the cell averages the others."))
    if row.runs and any(row.stats[m].mean is None for m in spec.metrics):
        notes.append(f"{NA} {foot.mark('n/a: the runs report null for this metric (e.g. no pixel masks).')}")
    for m in spec.deltas:
        delta = row.deltas[m]
        if row.is_main:
            cells.append("-")
        elif not row.runs or not main_ok:
            cells.append(NOT_RUN)
        elif delta is None:
            cells.append(NA)
        else:
            cells.append(_fmt_delta(delta) + (f" {WITHIN}" if row.within_spread[m] else ""))
        if reference:
            ref = None if row.is_main else _ref_delta(spec, row.spec, m)
            cells.append("-" if row.is_main else (NOT_RUN if ref is None else _fmt_delta(ref)))
    warned = [run for run in row.runs if run.warnings]
    if warned:
        text = "; ".join(f"seed {run.seed} ({run.path.name}): {' / '.join(run.warnings)}" for run in warned)
        notes.append(f"warnings {foot.mark(f'{row.name_in(spec)}: {text}')}")
    seeds = [run.seed for run in row.runs]
    if len(set(seeds)) < len(seeds):
        notes.append(foot.mark(f"{row.name_in(spec)}: several runs share a seed ({seeds}); each counts as one sample."))
    variants = {_other_overrides(spec, run) for run in row.runs}
    if len(variants) > 1:
        listed = " vs ".join(" ".join(v) or "(none)" for v in sorted(variants))
        notes.append(foot.mark(f"{row.name_in(spec)}: its runs differ in other overrides: {listed}."))
    for key, want in row.spec.expect.items():
        got = sorted({str(run.config.get(key)) for run in row.runs if not _same(run.config.get(key), want)})
        if got:
            notes.append(
                foot.mark(f"{row.name_in(spec)}: runs have {key}={', '.join(got)}, the study's row has {want}.")
            )
    row.note = "; ".join(notes)
    cells += [str(row.n_seeds), row.note]
    if reference and any(r.ref_note for r in spec.rows):
        cells.append(row.spec.ref_note)
    return cells


def _param_note(rows: list[RowResult], main: RowResult) -> str:
    base = main.stats["params_total"].mean
    parts = []
    for row in rows:
        count = row.stats["params_total"].mean
        if count is None:
            continue
        ratio = f" ({count / base:.1f}x MAIN)" if base and not row.is_main else ""
        parts.append(f"{row.label}: {count:,.0f}{ratio}")
    return "Parameters after the last task (ours, total): " + "; ".join(parts) + "."


def _overrides_line(spec: TableSpec, rows: list[RowResult]) -> str:
    """The command-line overrides beside the row identity: shared by all runs, or differing between them."""
    sets = [set(_other_overrides(spec, run)) for row in rows for run in row.runs]
    if not sets:
        return ""
    shared = set.intersection(*sets)
    differing = sorted(set.union(*sets) - shared)
    text = f"Overrides shared by all runs (besides row and seed): {', '.join(sorted(shared)) or '(none)'}."
    if differing:
        text += f" Overrides only some runs have: {', '.join(differing)}."
    return text


# --------------------------------------------------------------------------------------------- writing


def _write_csv(result: TableResult, path: Path) -> None:
    spec = result.spec
    head = ["label", *spec.label_headers[1:], "key", "n_seeds", "seeds"]
    for m in ALL_METRICS:
        head += [f"{m}_mean", f"{m}_std"]
    head += [f"delta_{m}" for m in METRICS]
    head += [f"within_spread_{m}" for m in spec.deltas]
    if result.reference:
        head += [f"ref_{m}" for m in spec.metrics] + [f"ref_delta_{m}" for m in spec.deltas]
    head += ["n_warnings", "note"]

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        for row in result.rows:
            line = [row.label, *row.spec.cells, str(row.spec.key), row.n_seeds, " ".join(str(r.seed) for r in row.runs)]
            for m in ALL_METRICS:
                line += [num(row.stats[m].mean), num(row.stats[m].std)]
            line += [num(row.deltas[m]) for m in METRICS]
            line += [str(row.within_spread[m]).lower() for m in spec.deltas]
            if result.reference:
                line += [num(row.spec.ref.get(m)) for m in spec.metrics]
                line += [num(None if row.is_main else _ref_delta(spec, row.spec, m)) for m in spec.deltas]
            line += [sum(len(r.warnings) for r in row.runs), row.note]
            writer.writerow(line)


def _x_positions(spec: TableSpec, rows: list[RowResult]) -> list[float]:
    if spec.x_scale == "category":
        return [float(i) for i in range(len(rows))]
    return [float(r.spec.key) for r in rows]


def _plot_line(result: TableResult, ax_grid: Any) -> None:
    spec, rows = result.spec, result.rows
    xs = _x_positions(spec, rows)
    for ax, m in zip(ax_grid, spec.metrics, strict=True):
        pts = [(x, r.stats[m]) for x, r in zip(xs, rows, strict=True) if r.stats[m].mean is not None]
        if pts:
            means, errs = [p[1].mean for p in pts], [p[1].std or 0.0 for p in pts]
            ax.errorbar([p[0] for p in pts], means, yerr=errs, marker="o", capsize=3, label="ours")
        if result.reference:
            ref = [(x, r.spec.ref[m]) for x, r in zip(xs, rows, strict=True) if m in r.spec.ref]
            if ref:
                ax.plot([p[0] for p in ref], [p[1] for p in ref], "k--", marker="x", label="reference")
        main = [x for x, r in zip(xs, rows, strict=True) if r.is_main]
        for x in main:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.set_title(METRICS[m].header)
        ax.set_xlabel(spec.x_label)
        if spec.x_scale == "log2":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [r.label for r in rows])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    ax_grid[0].set_ylabel("percent")
    ax_grid[0].legend(fontsize=7)


def _errors(points: list[tuple[float, Stat]]) -> list[float] | None:
    """Error bars (seed std) for the drawn points; none at all when no point has a spread."""
    errs = [st.std or 0.0 for _, st in points]
    return errs if any(errs) else None


def _plot_block_mix(result: TableResult, ax: Any) -> None:
    spec, rows = result.spec, result.rows
    width = 0.8 / len(spec.metrics)
    for j, m in enumerate(spec.metrics):
        xs = [i + (j - (len(spec.metrics) - 1) / 2) * width for i in range(len(rows))]
        bars = [(x, r.stats[m]) for x, r in zip(xs, rows, strict=True) if r.stats[m].mean is not None]
        xb, means = [x for x, _ in bars], [st.mean for _, st in bars]
        ax.bar(xb, means, width, yerr=_errors(bars), capsize=2, label=METRICS[m].header)
        if result.reference:
            ref = [(x, r.spec.ref[m]) for x, r in zip(xs, rows, strict=True) if m in r.spec.ref]
            label = "reference" if j == 0 else None
            ax.plot([p[0] for p in ref], [p[1] for p in ref], "k_", markersize=12, linestyle="none", label=label)
    labels = [f"{r.label}/{r.spec.cells[0]}" + ("" if r.runs else "\n(not run)") for r in rows]
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel("MoLE blocks / DIA blocks")
    ax.set_ylabel("percent")
    ax.set_title(spec.title)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _plot_ablation(result: TableResult, ax_grid: Any) -> None:
    spec = result.spec
    rows = [r for r in result.rows if not r.is_main]
    labels = [textwrap.fill(r.label, 28) + ("" if r.runs else " (not run)") for r in rows]
    ys = list(range(len(rows)))[::-1]
    for ax, m in zip(ax_grid, PLOT_DELTAS, strict=True):
        bars = [(y, r.deltas[m], r.stats[m]) for y, r in zip(ys, rows, strict=True) if r.deltas[m] is not None]
        errs = _errors([(y, st) for y, _, st in bars])
        ax.barh([y for y, _, _ in bars], [d for _, d, _ in bars], xerr=errs, capsize=2, label="ours")
        if result.reference:
            ref = [(y, _ref_delta(spec, r.spec, m)) for y, r in zip(ys, rows, strict=True)]
            ref = [(y, d) for y, d in ref if d is not None]
            ax.plot([d for _, d in ref], [y for y, _ in ref], "kD", fillstyle="none", label="reference")
        if not any(r.deltas[m] is not None for r in rows):
            ax.text(0.5, 0.5, "MAIN not run: no deltas", transform=ax.transAxes, ha="center")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys, labels, fontsize=7)
        ax.set_title(f"Δ {METRICS[m].header} vs MAIN (points)")
        ax.grid(axis="x", alpha=0.3)
    ax_grid[0].legend(fontsize=7)


def _write_plot(result: TableResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result.spec
    if spec.plot == "line":
        fig, axes = plt.subplots(1, len(spec.metrics), figsize=(3.2 * len(spec.metrics), 3.2))
        _plot_line(result, list(axes))
        fig.suptitle(spec.title, fontsize=10)
    elif spec.plot == "block_mix":
        fig, ax = plt.subplots(figsize=(9, 4))
        _plot_block_mix(result, ax)
    elif spec.plot == "ablation_bars":
        fig, axes = plt.subplots(1, len(PLOT_DELTAS), figsize=(11, 0.5 * len(result.rows) + 2), sharey=True)
        _plot_ablation(result, list(axes))
        fig.suptitle(spec.title, fontsize=10)
    else:
        msg = f"{spec.name}: unknown plot kind {spec.plot!r}"
        raise ValueError(msg)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: TableResult, out_dir: str | Path) -> list[Path]:
    """Write ``<table>.md``, ``<table>.csv`` and ``<table>.png`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result.spec.name
    md, table_csv, png = out / f"{name}.md", out / f"{name}.csv", out / f"{name}.png"
    md.write_text(result.markdown())
    _write_csv(result, table_csv)
    _write_plot(result, png)
    return [md, table_csv, png]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a usage or input error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run dirs or multirun dirs (searched for metrics.json)")
    parser.add_argument("--table", choices=list(TABLES), help="default: inferred from the runs' task_name/group")
    parser.add_argument("--out", help="output directory (default: the first PATH)")
    parser.add_argument("--reference", action="store_true", help="add the reference study's figures beside ours")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.paths)
        if not runs:
            msg = f"no metrics.json or eval_metrics.json under {', '.join(args.paths)}"
            raise ValueError(msg)
        table = args.table or infer_table(runs)
        result = build_table(table, runs, reference=args.reference)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first)
    written = write_outputs(result, out)
    filled = sum(1 for r in result.rows if r.runs)
    used, skipped = len(result.runs_used), len(result.skipped)
    print(f"{table}: {filled} of {len(result.rows)} rows with runs, {used} runs used, {skipped} skipped")
    for path in written:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
