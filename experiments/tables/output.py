"""Writing a table as Markdown, CSV and a PNG plot."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Any

from experiments.tables.build import ref_delta
from experiments.tables.results import RowResult, Stat, TableResult
from experiments.tables.specs import (
    ALL_METRICS,
    METRICS,
    PLOT_DELTAS,
    TableSpec,
)


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
                line += [num(None if row.is_main else ref_delta(spec, row.spec, m)) for m in spec.deltas]
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
            ref = [(y, ref_delta(spec, r.spec, m)) for y, r in zip(ys, rows, strict=True)]
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
