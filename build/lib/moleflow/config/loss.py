"""The training objective's settings (``model.loss.*``): default (MAIN), type and range of each, once."""

from __future__ import annotations

from dataclasses import dataclass

from moleflow.config.settings import range_problems, setting


@dataclass
class LossConfig:
    """Loss weights (``model.loss.*``): default (MAIN), type and range, once; a batch above ``max_loss`` is skipped."""

    tail_weight: float = setting(0.7, "in [0, 1]", lambda v: 0 <= v <= 1)
    tail_top_k_ratio: float = setting(0.02, "in (0, 1]", lambda v: 0 < v <= 1)
    lambda_logdet: float = setting(1e-4, ">= 0", lambda v: v >= 0)
    max_loss: float = setting(1e8, "> 0", lambda v: v > 0)

    def validate(self) -> None:
        problems = range_problems(self, "model.loss")
        if problems:
            raise ValueError(problems[0])
