"""Training objective (docs/method.md 4): tail-aware NLL plus a log-determinant regulariser.

The tail term averages each image's k highest patch NLLs, so the flow cannot buy a low mean by
leaving a few patches badly modelled: those rare patches are exactly where false alarms come from.
"""

from __future__ import annotations

import math

import torch

from moleflow.config.loss import LossConfig


def tail_k(num_patches: int, ratio: float) -> int:
    """k = max(1, floor(num_patches * ratio)); 15 for a 28 x 28 grid at ratio 0.02."""
    return max(1, math.floor(num_patches * ratio))


def tail_aware_loss(nll: torch.Tensor, tail_weight: float, top_k_ratio: float) -> torch.Tensor:
    """nll (B, H, W) -> (1 - w) * mean(nll) + w * mean over images of the mean of their top-k nll."""
    flat = nll.flatten(1)  # (B, H * W)
    mean_term = flat.mean()
    if tail_weight == 0:
        return mean_term
    k = tail_k(flat.shape[1], top_k_ratio)
    tail_term = flat.topk(k, dim=1).values.mean()
    return (1 - tail_weight) * mean_term + tail_weight * tail_term


def moleflow_loss(nll: torch.Tensor, logdet: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Full objective and its parts (as floats, for logging). nll, logdet: (B, H, W)."""
    tal = tail_aware_loss(nll, cfg.tail_weight, cfg.tail_top_k_ratio)
    reg = logdet.pow(2).mean()
    loss = tal + cfg.lambda_logdet * reg if cfg.lambda_logdet > 0 else tal
    parts = {
        "nll_mean": float(nll.detach().mean()),
        "tail_loss": float(tal.detach()),
        "logdet_sq": float(reg.detach()),
    }
    return loss, parts


def is_unusable_loss(loss: torch.Tensor, max_loss: float) -> bool:
    """True for a loss that must not be back-propagated: NaN, infinite or above ``max_loss``."""
    value = float(loss.detach())
    return not math.isfinite(value) or value > max_loss
