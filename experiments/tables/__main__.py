"""Turn finished training runs into the study's tables (Markdown, CSV, PNG), with seed spread and provenance.

    python -m experiments.tables logs/table1_core_ablation/multiruns/<date> [--table NAME] [--reference]
    make tables RUNS=logs/table1_core_ablation/multiruns/<date>

Every figure comes from a metrics.json (or an eval_metrics.json row for the score top-k sweep):
nothing is filled in. A row without runs says "not run"; an unfinished run is skipped and listed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.tables.build import build_table
from experiments.tables.collect import collect_runs, infer_table
from experiments.tables.output import write_outputs
from experiments.tables.specs import TABLES


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
