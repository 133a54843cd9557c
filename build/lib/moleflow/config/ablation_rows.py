"""The study's named rows, read from the ablation files that define them (``conf/ablation/<row>.yaml``).

Each ablation file sets what its row changes and, under ``table_rows``, the tables it is a row of::

    table_rows:
      table1_core_ablation: {order: 2, label: "w/o LoRA (plain linear task layers)", ref: {...}}

so a new row is one file: the tables (``experiments/tables/specs.py``), the tables' sweeps (the
``ablation_rows`` resolver in ``conf/experiment/table*.yaml``) and the tests read it from there. The row's
name is its file name. Per table: ``order`` (position in the table), ``label``, and optionally ``cells``
(further label columns), ``note``, ``ref`` / ``ref_delta`` (the study's figures, in percent) and ``ref_note``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

ROW_KEY = "table_rows"
ROW_FIELDS = ("order", "label", "cells", "note", "ref", "ref_delta", "ref_note")


@dataclass(frozen=True)
class AblationRow:
    """One row of one table, as its ablation file describes it."""

    name: str  # the file's stem: +ablation=<name>
    table: str
    order: int
    label: str
    cells: tuple[str, ...] = ()
    note: str = ""
    ref: dict[str, float] = field(default_factory=dict)
    ref_delta: dict[str, float] = field(default_factory=dict)
    ref_note: str = ""
    sets: dict[str, Any] = field(
        default_factory=dict
    )  # what the file sets, by dotted key (ncl: 10, model.flow.adapter: none)


def _row(name: str, table: str, meta: Any, sets: dict[str, Any], where: Path) -> AblationRow:
    if not isinstance(meta, dict) or "label" not in meta or "order" not in meta:
        msg = f"{where}: {ROW_KEY}.{table} needs at least `order` and `label`, got {meta!r}"
        raise ValueError(msg)
    unknown = sorted(set(meta) - set(ROW_FIELDS))
    if unknown:
        msg = f"{where}: {ROW_KEY}.{table} has unknown fields {unknown}; known: {list(ROW_FIELDS)}"
        raise ValueError(msg)
    return AblationRow(
        name=name,
        table=table,
        order=int(meta["order"]),
        label=str(meta["label"]),
        cells=tuple(str(c) for c in meta.get("cells") or ()),
        note=str(meta.get("note") or ""),
        ref={k: float(v) for k, v in (meta.get("ref") or {}).items()},
        ref_delta={k: float(v) for k, v in (meta.get("ref_delta") or {}).items()},
        ref_note=str(meta.get("ref_note") or ""),
        sets=dict(sets),
    )


def _flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_ablation_rows(ablation_dir: Path | str) -> dict[str, list[AblationRow]]:
    """{table: its rows in order} from every ``*.yaml`` in ``ablation_dir``; raises on a clash of positions."""
    tables: dict[str, list[AblationRow]] = {}
    for path in sorted(Path(ablation_dir).glob("*.yaml")):
        loaded = OmegaConf.load(path)
        data = OmegaConf.to_container(loaded, resolve=False) if isinstance(loaded, DictConfig) else {}
        rows = data.get(ROW_KEY) or {}
        sets = _flat({k: v for k, v in data.items() if k not in (ROW_KEY, "ablation_name")})
        for table, meta in rows.items():
            tables.setdefault(str(table), []).append(_row(path.stem, str(table), meta, sets, path))
    for table, rows in tables.items():
        rows.sort(key=lambda r: r.order)
        orders = [r.order for r in rows]
        if len(set(orders)) != len(orders):
            msg = f"rows of {table} share an `order` in {Path(ablation_dir)}: {[(r.name, r.order) for r in rows]}"
            raise ValueError(msg)
    return tables


def sweep_of(ablation_dir: Path | str, table: str) -> str:
    """The comma-separated ``+ablation`` sweep of ``table`` (what a Hydra sweeper takes), in row order."""
    rows = read_ablation_rows(ablation_dir).get(table)
    if not rows:
        msg = f"no file in {ablation_dir} names {table!r} under {ROW_KEY}"
        raise ValueError(msg)
    return ",".join(r.name for r in rows)
