"""``src/train.py`` that kills itself with SIGKILL (no clean-up at all) at a chosen point of a chosen task.

Used by the resume tests to cut a run at an exact place instead of racing a timer:
``MOLEFLOW_TEST_KILL_AT=train:1`` dies in the second training batch of task 1,
``MOLEFLOW_TEST_KILL_AT=evaluate:1`` dies while task 1's round evaluates (after task 0's test set, before
task 1's, so before task 1's checkpoint). Every other argument is passed to train.py as Hydra overrides.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import train  # noqa: E402
from moleflow.training import continual  # noqa: E402
from moleflow.training.lightning_module import MoLEFlowLitModule  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str, task: int) -> None:
    if point == "train":
        step = MoLEFlowLitModule.training_step

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN202
            if self.current_task == task and batch_idx == 1:
                _die()
            return step(self, batch, batch_idx)

        MoLEFlowLitModule.training_step = training_step
    elif point == "evaluate":
        evaluate = continual.evaluate_task

        def evaluate_task(model, test, index, name, num_seen, *args, **kwargs):  # noqa: ANN001, ANN202
            if num_seen == task + 1 and index == task:
                _die()
            return evaluate(model, test, index, name, num_seen, *args, **kwargs)

        continual.evaluate_task = evaluate_task
    else:
        msg = f"MOLEFLOW_TEST_KILL_AT must be train:<task> or evaluate:<task>, got {point!r}."
        raise ValueError(msg)


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> None:
    where, _, index = os.environ["MOLEFLOW_TEST_KILL_AT"].partition(":")
    _install(where, int(index))
    train.train(cfg)


if __name__ == "__main__":
    main()
