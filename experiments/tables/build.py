"""Building a table from runs: rows by spec, mean and spread over seeds, reference deltas, footnotes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from experiments.tables.collect import as_number, get_path
from experiments.tables.results import NA, NOT_RUN, WITHIN, RowResult, RunRecord, Stat, TableResult
from experiments.tables.specs import (
    ALL_METRICS,
    DATA_NAMES,
    METRICS,
    MVTEC_CATEGORIES,
    REFERENCE_SETTING,
    REFERENCE_SPREAD,
    TABLES,
    RowSpec,
    TableSpec,
)
from moleflow.config.checks import STUDY_KNOBS
from moleflow.data.mvtec import MVTEC_CATEGORIES as MVTEC_CATEGORY_NAMES


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


def config_value(config: dict, key: str) -> Any:
    """A run's value of ``key`` as the model was built with it.

    A study knob (``ncl``) is read from the derived copy the model used (``model.flow.ncl``) when the run
    recorded it, so a run is filed under the value it really ran with; other keys are dotted paths.
    """
    if key in STUDY_KNOBS:
        derived = get_path(config, STUDY_KNOBS[key].split("."))
        if derived is not None:
            return derived
    return get_path(config, key.split("."))


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
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
    value = config_value(run.config, spec.row_by)
    if as_number(value) is None:
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


def ref_delta(spec: TableSpec, row: RowSpec, metric: str) -> float | None:
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


def describe_run_data(config: dict, tasks: Sequence[str]) -> str:
    """What a run read, in words: the data set's name, and the root and categories it was read from.

    "MVTec AD" only when the categories are MVTec AD's: a folder in MVTec layout read with ``data=mvtec``
    and other categories (the generated data, MPDD, a user's parts) is named as what it is.
    """
    data = get_path(config, ("data",)) or {}
    name = str(data.get("name") or "unknown data")
    source = str(data.get("source") or "mvtec")
    categories = [str(c) for c in (data.get("categories") or tasks)]
    root = data.get("root")
    where = f"root {root}" if root else ("the elpv-dataset package" if source == "elpv" else "root not recorded")
    if name == "mvtec" and categories and set(categories) <= set(MVTEC_CATEGORY_NAMES):
        label = "MVTec AD"
        if len(categories) != MVTEC_CATEGORIES:
            label += f" ({len(categories)} of {MVTEC_CATEGORIES} categories)"
    elif name == "mvtec":
        foreign = [c for c in categories if c not in MVTEC_CATEGORY_NAMES]
        label = f"a data set in MVTec layout, not MVTec AD (categories {foreign} are not MVTec AD's)"
    else:
        label = DATA_NAMES.get(name, f"{name} (source {source}), not MVTec AD")
    return f"{label} (read from {where}; categories {', '.join(categories) or 'none'})"


def _describe_data(runs: Sequence[RunRecord]) -> str:
    """Where the figures come from, in words: data set, tasks, backbone, epochs, device."""

    def distinct(values: Iterable[str]) -> str:
        return " / ".join(dict.fromkeys(values)) or "unknown"

    def data_name(run: RunRecord) -> str:
        return describe_run_data(run.config, run.tasks)

    def backbone(run: RunRecord) -> str:
        bb = get_path(run.config, ("model", "backbone")) or {}
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
        f"epochs per task: {distinct(str(get_path(r.config, ('training', 'epochs'))) for r in runs)}; "
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
            f"{k}={config_value(run.config, k)!r} (this table needs {v!r})"
            for k, v in spec.fixed.items()
            if not _same(config_value(run.config, k), v)
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
            ref = None if row.is_main else ref_delta(spec, row.spec, m)
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
        got = sorted(
            {str(config_value(run.config, key)) for run in row.runs if not _same(config_value(run.config, key), want)}
        )
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
