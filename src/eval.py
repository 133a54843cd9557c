"""Re-evaluate a trained MoLE-Flow checkpoint (task-agnostic) for several evaluation-only settings.

    python src/eval.py ckpt_path=PATH/last.ckpt score_top_k='[1,3,5,10]'     (installed: moleflow-eval ...)

Writes eval_metrics.json (one row per setting) in the run directory and prints a table. The app itself is
:func:`moleflow.cli.eval_main`; this file runs it from a clone.
"""

from __future__ import annotations

from moleflow.cli import eval_main as main
from moleflow.training.rescore import evaluate

__all__ = ["evaluate", "main"]

if __name__ == "__main__":
    main()
