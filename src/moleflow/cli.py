"""The installed commands: ``moleflow-train``, ``moleflow-predict``, ``moleflow-eval`` and ``moleflow <command>``.

Each is the Hydra app of ``src/train.py``, ``src/predict.py`` or ``src/eval.py`` over the configs this moleflow
ships (``moleflow/conf`` in a wheel, the repository's ``conf/`` in a clone), so it runs from any folder and
takes the same overrides (``moleflow-train +ablation=no_tail_loss``, ``moleflow-train -m ncl=4,6,8``). Outputs go
to ``./logs`` of the folder it runs in, as with the scripts.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from moleflow.config import register
from moleflow.config.resolvers import DEFAULT_CONF_DIR

CONF_DIR = str(DEFAULT_CONF_DIR)
register(CONF_DIR)  # here too: a launcher's worker imports this module before it composes a job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_main(cfg: DictConfig) -> float:
    """Train task by task and report the study's metrics; returns the mean routed image AUROC (for sweepers)."""
    from moleflow.training.job import train_job

    register(CONF_DIR)
    payload = train_job(cfg)
    value = payload["final"]["routed"]["image_auroc"]
    return float("nan") if value is None else float(value)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="predict")
def predict_main(cfg: DictConfig) -> dict[str, Any]:
    """Judge images, calibrate thresholds or export the model (``mode=``), from a training checkpoint."""
    from moleflow.inference.runner import run_from_config
    from moleflow.utils.allocator import keep_freed_memory

    register(CONF_DIR)
    keep_freed_memory()  # large CPU tensors reuse freed memory (see moleflow.utils.allocator)
    return run_from_config(cfg, cfg.paths.output_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def eval_main(cfg: DictConfig) -> dict[str, Any]:
    """Re-score a trained checkpoint for several evaluation-only settings; writes eval_metrics.json."""
    from moleflow.training.rescore import evaluate
    from moleflow.utils.allocator import keep_freed_memory

    register(CONF_DIR)
    keep_freed_memory()
    return evaluate(cfg)


COMMANDS = {"train": train_main, "predict": predict_main, "eval": eval_main}


def main() -> None:
    """``moleflow train|predict|eval [overrides]``: the same apps under one command."""
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        names = " | ".join(COMMANDS)
        print(
            f"usage: moleflow {{{names}}} [Hydra overrides ...]\n  e.g. moleflow train experiment=demo", file=sys.stderr
        )
        raise SystemExit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"moleflow-{command}"
    COMMANDS[command]()


if __name__ == "__main__":
    main()
