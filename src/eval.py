"""Re-evaluate a trained MoLE-Flow checkpoint (task-agnostic) for several evaluation-only settings.

    python src/eval.py ckpt_path=PATH/last.ckpt score_top_k='[1,3,5,10]'

Writes eval_metrics.json (one row per setting) in the run directory and prints a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table

from moleflow.config import register
from moleflow.evaluation.report import write_json_atomic
from moleflow.training.rescore import rescore_checkpoint
from moleflow.utils.allocator import keep_freed_memory

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register(CONF_DIR)  # before Hydra composes anything


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Re-score ``cfg.ckpt_path`` and write ``eval_metrics.json`` to ``cfg.paths.output_dir``."""
    ks = list(cfg.score_top_k) if isinstance(cfg.score_top_k, ListConfig | list) else [int(cfg.score_top_k)]
    result = rescore_checkpoint(
        cfg.ckpt_path,
        ks,
        cfg.data_root,
        cfg.pixel_sigma,
        str(cfg.device),
        expected_sha256=cfg.get("ckpt_sha256"),
        allow_unverified=bool(cfg.get("allow_unverified", False)),
    )
    write_json_atomic(f"{cfg.paths.output_dir}/eval_metrics.json", result)
    table = Table(title=f"Re-scored {cfg.ckpt_path}")
    for col in ("score_top_k", "Img AUC", "Pix AUC", "Img AP", "Pix AP", "Rt Acc"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        f = row["final"]["routed"]
        cells = [f["image_auroc"], f["pixel_auroc"], f["image_ap"], f["pixel_ap"], row["routing_accuracy"]]
        table.add_row(str(row["score_top_k"]), *[f"{100 * v:.2f}" for v in cells])
    Console().print(table)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # large CPU tensors reuse freed memory (see moleflow.utils.allocator)
    evaluate(cfg)


if __name__ == "__main__":
    main()
