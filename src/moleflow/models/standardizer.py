"""Per-task standardisation of the patch features with the task's own training statistics.

x' = (x - mean_t) / std_t, per channel (``mode="channel"``: statistics over all training patches) or per
channel and grid position (``mode="position"``: statistics over the training images at each position).

Why (measured on Magnetic Tile with `make quality`): MAIN's whitening adapter normalises every patch by its own
LayerNorm, which erases the patch's energy (a dark blowhole and a bright patch become alike), and the
shared base, trained on task 0 and then frozen, sees each later task's features at that task's own
scale. Standardising with each task's statistics keeps the energy differences between patches, brings
every task to the same scale before the shared flow, and ("position") removes the border and position
patterns that frozen-backbone features carry. The statistics are buffers fitted once before the task
trains and never changed afterwards, so earlier tasks' outputs stay bit-identical (zero forgetting).

**Spread floor** (``floor`` = f > 0, ``model.flow.standardize_floor``). Where every training image shows the
same thing at a position (a near-black background around an object, a constant border), that position's
spread is tiny, and dividing by it turns sensor noise into huge values: the maps light up the background
and the image score is decided there. With a floor the spread of a position is
``sqrt(std_hw ** 2 + (f * std_c) ** 2)``, with std_c the channel's spread over all training patches: a
position can never be trusted more than f times the channel's whole spread allows, while positions that do
vary keep their own statistics. f = 0 is the plain per-position standardisation.

**Floor noise** (``floor_noise``, ``model.flow.standardize_floor_noise``). The floor only rescales: where every
training image is the same, the standardised training features are still one point, the flow learns a
density that narrow there, and a background that differs in test scores as an anomaly in every image.
With floor noise the training features get Gaussian noise of the floor's size (std f * std_c, per channel)
before they are standardised, so every position's standardised training features have unit variance and the
flow learns the spread the floor assumes. Only while training (``self.training``): scoring stays
deterministic and earlier tasks' outputs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moleflow.config.flow import STANDARDIZE_MODES

_CHUNK = 64  # images per pass when accumulating statistics (bounded float64 memory)


class TaskStandardizer(nn.Module):
    """x (B, H, W, D) -> (x - mean) / std with buffers mean, std of shape (D,) or (H, W, D)."""

    def __init__(
        self, dim: int, mode: str = "channel", eps: float = 1e-6, floor: float = 0.0, floor_noise: bool = False
    ) -> None:
        super().__init__()
        if mode not in STANDARDIZE_MODES[1:]:
            msg = f"TaskStandardizer mode must be 'channel' or 'position', got {mode!r} (model.flow.standardize)."
            raise ValueError(msg)
        if not floor >= 0 or (floor > 0 and mode != "position"):
            msg = f"The spread floor must be >= 0, and 0 unless mode='position' (standardize_floor), got {floor}."
            raise ValueError(msg)
        if floor_noise and not floor > 0:
            msg = "Floor noise needs a spread floor > 0 (standardize_floor_noise needs standardize_floor)."
            raise ValueError(msg)
        self.dim = dim
        self.mode = mode
        self.eps = eps
        self.floor = float(floor)
        self.floor_noise = bool(floor_noise)
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("std", torch.zeros(0))
        if self.floor_noise:  # only then: checkpoints without floor noise keep their keys
            self.register_buffer("noise_std", torch.zeros(0))  # (D,): f * std_c

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """Statistics of the task's training features F (N, H, W, D), accumulated in float64 by chunks."""
        if features.ndim != 4 or features.shape[-1] != self.dim or features.shape[0] < 2:
            msg = f"Standardisation needs training features (N >= 2, H, W, {self.dim}), got {tuple(features.shape)}."
            raise ValueError(msg)
        reduce = (0,) if self.mode == "position" else (0, 1, 2)
        total = s1 = s2 = None
        for start in range(0, features.shape[0], _CHUNK):
            x = features[start : start + _CHUNK].to(torch.float64)
            count = (
                x.numel() // (x.shape[1] * x.shape[2] * x.shape[3])
                if self.mode == "position"
                else x.numel() // x.shape[3]
            )
            a, b = x.sum(dim=reduce), x.pow(2).sum(dim=reduce)
            total, s1, s2 = (count, a, b) if s1 is None else (total + count, s1 + a, s2 + b)
        mean = s1 / total
        var = (s2 / total - mean.pow(2)).clamp_min(0) * total / (total - 1)  # unbiased
        if self.floor > 0 and self.mode == "position":  # the channel's spread over every training patch
            cells = mean.shape[0] * mean.shape[1]
            n_all = total * cells
            mean_c = s1.sum(dim=(0, 1)) / n_all
            var_c = (s2.sum(dim=(0, 1)) / n_all - mean_c.pow(2)).clamp_min(0) * n_all / (n_all - 1)
            var = var + self.floor**2 * var_c  # (H, W, D) + (D,): the floor of every position
            if self.floor_noise:
                self.noise_std = (self.floor * var_c.sqrt()).to(device=self.mean.device, dtype=torch.float32)
        device = self.mean.device
        self.mean = mean.to(device=device, dtype=torch.float32)
        self.std = var.sqrt().add(self.eps).to(device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            msg = "This task's feature statistics were never fitted (TaskStandardizer.fit before training)."
            raise RuntimeError(msg)
        if self.mode == "position" and x.shape[1:3] != self.mean.shape[:2]:
            msg = (
                f"Per-position statistics were fitted on a {tuple(self.mean.shape[:2])} grid but the features "
                f"have a {tuple(x.shape[1:3])} grid: use the training image size (data.image_size)."
            )
            raise ValueError(msg)
        if self.floor_noise and self.training:
            x = x + self.noise_std * torch.randn_like(x)
        return (x - self.mean) / self.std

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        names = ("mean", "std", "noise_std") if self.floor_noise else ("mean", "std")
        for name in names:  # fitted statistics come with their shape: make room before copying
            key = prefix + name
            if key in state_dict and getattr(self, name).shape != state_dict[key].shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        noise = f", floor_noise={self.floor_noise}" if self.floor_noise else ""
        return f"dim={self.dim}, mode={self.mode}, floor={self.floor}{noise}, fitted={self.fitted}"
