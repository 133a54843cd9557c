"""A Hydra app on the project's real config that only prepares each job's data (builds the DataModule).

Used by the concurrency test: many jobs of one joblib multirun preparing the same generated data set at
once, without the cost of training. Writes ``<job dir>/data_ok.json`` with the task names it scanned.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from moleflow.assembly.builders import build_datamodule
from moleflow.config import register

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register(CONF_DIR)  # as the entry points do: the launcher's workers import this file before composing


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    dm = build_datamodule(cfg.data)
    sizes = {name: [len(dm.train_dataset(t)), len(dm.test_dataset(t))] for t, name in enumerate(dm.task_names)}
    Path(cfg.paths.output_dir, "data_ok.json").write_text(json.dumps(sizes))


if __name__ == "__main__":
    main()
