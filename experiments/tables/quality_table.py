"""The quality comparison table: one block of rows per method (per task, then the mean), as Markdown, CSV and JSON.

Where a method's per-image results were kept (score records), its image and pixel AUROC carry 95 % bootstrap
intervals (``ci``). Against PatchCore (the baseline rows), every other method gets each category's
difference, its worst category, and the target's checks (mean image and pixel AUROC at or above PatchCore's,
no category more than :data:`MAX_SHORTFALL` points below on either).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from moleflow.utils.files import atomic_write_text, json_safe

COLUMNS = (  # (metric key, header)
    ("image_auroc", "Img AUC"),
    ("pixel_auroc", "Pix AUC"),
    ("image_ap", "Img AP"),
    ("pixel_ap", "Pix AP"),
    ("pixel_aupro", "Pix PRO"),
    ("image_f1_max", "Img F1"),
    ("pixel_f1_max", "Pix F1"),
)


MAX_SHORTFALL = 0.05  # a category may be at most 5 points below PatchCore (image and pixel AUROC)
BASELINE = "patchcore"
CI_KEYS = ("image_auroc", "pixel_auroc")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def method_mean(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over the tasks that have the metric (pixel metrics: tasks with masks); counts kept.

    Tasks marked diverged (``diverged``: the reason) are left out, as the study's tables and metrics.json's
    means leave them out; ``excluded`` names them so the table can say so.
    """
    kept = {name: row for name, row in per_task.items() if not row.get("diverged")}
    mean: dict[str, Any] = {"excluded": sorted(set(per_task) - set(kept))}
    for key, _ in COLUMNS:
        values = [row[key] for row in kept.values() if _finite(row.get(key))]
        mean[key] = sum(values) / len(values) if values else None
        mean[f"{key}_tasks"] = len(values)
    routing = [row["routing_accuracy"] for row in kept.values() if _finite(row.get("routing_accuracy"))]
    mean["routing_accuracy"] = sum(routing) / len(routing) if routing else None
    return mean


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if _finite(value) else "n/a"


def _minutes(seconds: Any) -> str:
    return f"{seconds / 60:.1f} min" if _finite(seconds) else ""


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (method, task, metrics in percent, routing, wall time) for CSV."""
    out = []
    for method in result["methods"]:
        for task, row in [*method["per_task"].items(), ("mean", method["mean"])]:
            entry = {"method": method["label"], "task": task}
            for key, _ in COLUMNS:
                entry[key] = round(100 * row[key], 2) if _finite(row.get(key)) else None
            entry["routing_accuracy"] = (
                round(100 * row["routing_accuracy"], 2) if _finite(row.get("routing_accuracy")) else None
            )
            entry["wall_s"] = round(method["wall_s"], 1) if task == "mean" else None
            out.append(entry)
    return out


def _cell(row: dict[str, Any], key: str) -> str:
    """A metric in percent, with its 95 % interval when known: ``86.19 [84.1, 88.0]``."""
    text = _pct(row.get(key))
    ci = (row.get("ci") or {}).get(key)
    if ci and _finite(row.get(key)):
        text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return text


def against_baseline(result: dict[str, Any]) -> dict[str, Any]:
    """Per method (every one but the baseline), each task's difference to the baseline in image and pixel
    AUROC, the worst category, and whether the target holds; {} without a baseline row."""
    base = next((m for m in result["methods"] if m.get("key") == BASELINE), None)
    if base is None:
        return {}
    out = {}
    for method in result["methods"]:
        if method is base or method.get("key") == "oracle":
            continue
        deltas: dict[str, dict[str, float | None]] = {}
        for task, row in method["per_task"].items():
            ref = base["per_task"].get(task, {})
            deltas[task] = {
                key: (row[key] - ref[key]) if _finite(row.get(key)) and _finite(ref.get(key)) else None
                for key in CI_KEYS
            }
        worst = {}
        for key in CI_KEYS:
            known = {t: d[key] for t, d in deltas.items() if d[key] is not None}
            worst[key] = min(known.items(), key=lambda kv: kv[1]) if known else None
        mean_delta = {
            key: (method["mean"][key] - base["mean"][key])
            if _finite(method["mean"].get(key)) and _finite(base["mean"].get(key))
            else None
            for key in CI_KEYS
        }
        checks = {
            "mean_image_at_or_above": mean_delta["image_auroc"] is not None and mean_delta["image_auroc"] >= 0,
            "mean_pixel_at_or_above": mean_delta["pixel_auroc"] is not None and mean_delta["pixel_auroc"] >= 0,
            "no_category_more_than_5_below": all(
                d[k] is None or d[k] >= -MAX_SHORTFALL for d in deltas.values() for k in CI_KEYS
            ),
        }
        out[method["label"]] = {"per_task": deltas, "worst": worst, "mean": mean_delta, "checks": checks}
    return out


def _delta(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def _comparison_lines(result: dict[str, Any]) -> list[str]:
    comparison = against_baseline(result)
    if not comparison:
        return []
    lines = ["", "## Against PatchCore (points of AUROC; negative: below PatchCore)", ""]
    tasks = list(next(iter(comparison.values()))["per_task"])
    header = ["method", *[f"{t} img / pix" for t in tasks], "mean img / pix", "worst img", "worst pix"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, c in comparison.items():
        cells = [
            f"{_delta(c['per_task'][t]['image_auroc'])} / {_delta(c['per_task'][t]['pixel_auroc'])}" for t in tasks
        ]
        worst = [
            f"{w[0]} {_delta(w[1])}" if w else "n/a" for w in (c["worst"]["image_auroc"], c["worst"]["pixel_auroc"])
        ]
        mean = f"**{_delta(c['mean']['image_auroc'])} / {_delta(c['mean']['pixel_auroc'])}**"
        lines.append(f"| {label} | " + " | ".join([*cells, mean, *worst]) + " |")
    lines += [""]
    for label, c in comparison.items():
        held = [name.replace("_", " ") for name, ok in c["checks"].items() if ok]
        missed = [name.replace("_", " ") for name, ok in c["checks"].items() if not ok]
        lines.append(f"- {label}: held: {', '.join(held) or 'none'}; not held: {', '.join(missed) or 'none'}.")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The table with its provenance: command, machine, data, what each method is."""
    lines = [f"# Detection quality: {result['title']}", ""]
    lines += [f"- Command: `{result['command']}`", f"- Machine: {result['machine']}", f"- Data: {result['data']}"]
    lines += [f"- Started {result['started']}, finished {result['finished']}.", ""]
    header = ["method", "task", *[h for _, h in COLUMNS], "Rt Acc", "time"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    excluded_notes = []
    for method in result["methods"]:
        for task, row in method["per_task"].items():
            cells = [_cell(row, k) for k, _ in COLUMNS]
            name = f"{task} (diverged)" if row.get("diverged") else task
            lines.append(
                f"| {method['label']} | {name} | " + " | ".join(cells) + f" | {_pct(row.get('routing_accuracy'))} | "
                f"{_minutes(row.get('time_s'))} |"
            )
        mean = method["mean"]
        cells = [f"**{_cell(mean, k)}**" for k, _ in COLUMNS]
        excluded = mean.get("excluded") or []
        label = (
            f"**mean** ({len(method['per_task']) - len(excluded)} of {len(method['per_task'])})"
            if excluded
            else ("**mean**")
        )
        lines.append(
            f"| {method['label']} | {label} | " + " | ".join(cells) + f" | {_pct(mean.get('routing_accuracy'))} | "
            f"{_minutes(method['wall_s'])} |"
        )
        if excluded:
            excluded_notes.append(
                f"{method['label']}: the mean leaves out the tasks marked diverged ({', '.join(excluded)}), as the "
                "study's tables do; their rows show what they scored."
            )
    lines += _comparison_lines(result)
    lines += ["", "Methods:"]
    lines += [f"- **{m['label']}**: {m['description']}" for m in result["methods"]]
    lines += ["", "Notes:"] + [f"- {note}" for note in [*result["notes"], *excluded_notes]]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write quality.md, quality.csv and quality.json to ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "quality.md", "csv": out_dir / "quality.csv", "json": out_dir / "quality.json"}
    # JSON first: the run's details hold NaN where a task has no masks (ELPV), which standard JSON has no
    # word for, so non-finite values are written as null; a failure here must not leave only the tables
    atomic_write_text(paths["json"], json.dumps(json_safe(result), indent=2, default=str, allow_nan=False))
    atomic_write_text(paths["md"], markdown(result))
    buffer = io.StringIO()
    flat = rows(result)
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    atomic_write_text(paths["csv"], buffer.getvalue())
    return paths
