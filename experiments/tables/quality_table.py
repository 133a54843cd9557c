"""The quality comparison table: one block of rows per method (per task, then the mean), as Markdown, CSV and JSON."""

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
)


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


def markdown(result: dict[str, Any]) -> str:
    """The table with its provenance: command, machine, data, what each method is."""
    lines = [f"# Detection quality: {result['title']}", ""]
    lines += [f"- Command: `{result['command']}`", f"- Machine: {result['machine']}", f"- Data: {result['data']}"]
    lines += [f"- Started {result['started']}, finished {result['finished']}.", ""]
    header = ["method", "task", *[h for _, h in COLUMNS], "Rt Acc", "wall time"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    excluded_notes = []
    for method in result["methods"]:
        for task, row in method["per_task"].items():
            cells = [_pct(row.get(k)) for k, _ in COLUMNS]
            name = f"{task} (diverged)" if row.get("diverged") else task
            lines.append(
                f"| {method['label']} | {name} | " + " | ".join(cells) + f" | {_pct(row.get('routing_accuracy'))} | |"
            )
        mean = method["mean"]
        cells = [f"**{_pct(mean.get(k))}**" for k, _ in COLUMNS]
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
