"""The ``positional`` router: per-task diagonal Gaussians per cell of a pooled feature grid, optionally voting
with the global ``prototype`` router. What it does and why: :mod:`moleflow.models.router`.

``ranks`` and ``next_up`` are written with plain comparisons and arithmetic so that the vote exports to ONNX.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.models.global_routers import PrototypeRouter, routed, scored_tasks, task_inputs

log = logging.getLogger(__name__)


class PositionalRouter(nn.Module):
    """Per-task diagonal Gaussians per cell of a G x G pooled feature grid; see the module docstring.

    Buffers: ``means`` and ``variances`` (T, G, G, D) float64 (variances include the floor), ``train_counts`` (T,);
    with ``global_vote`` also ``global_router`` (a :class:`PrototypeRouter` of the mean of the G x G cells).
    """

    kind = "positional"

    def __init__(
        self,
        dim: int,
        grid: int = 4,
        keep: float = 0.5,
        variance_floor: float = 1e-2,
        global_vote: bool = False,
        ridge: float = 1e-5,
    ) -> None:
        super().__init__()
        if grid < 1:
            msg = f"model.flow.router_grid must be >= 1 (cells per side), got {grid}."
            raise ValueError(msg)
        if not 0.0 < keep <= 1.0:
            msg = f"model.flow.router_keep must be in (0, 1] (share of the cells that decide), got {keep}."
            raise ValueError(msg)
        if variance_floor <= 0.0:
            msg = f"model.flow.router_variance_floor must be > 0, got {variance_floor}."
            raise ValueError(msg)
        self.dim = dim
        self.grid = grid
        self.keep = keep
        self.variance_floor = variance_floor
        self.global_vote = global_vote
        # Only built with the vote, so checkpoints of the plain positional router keep their state keys.
        self.global_router = PrototypeRouter(dim, ridge=ridge) if global_vote else None
        self.register_buffer("means", torch.zeros(0, grid, grid, dim, dtype=torch.float64))
        self.register_buffer("variances", torch.ones(0, grid, grid, dim, dtype=torch.float64))
        self.register_buffer("train_counts", torch.zeros(0, dtype=torch.int64))

    @property
    def num_tasks(self) -> int:
        return int(self.means.shape[0])

    @property
    def kept_cells(self) -> int:
        """How many of the G * G cells of an image decide its distance to a task."""
        return max(1, math.ceil(self.keep * self.grid * self.grid))

    def summarize(self, features: torch.Tensor) -> torch.Tensor:
        """Router input of patch features F (B, H, W, D): their average per cell of a G x G grid (B, G, G, D)."""
        if features.shape[1] < self.grid or features.shape[2] < self.grid:
            msg = f"router_grid={self.grid} is larger than the patch grid {tuple(features.shape[1:3])}."
            raise ValueError(msg)
        pooled = F.adaptive_avg_pool2d(features.permute(0, 3, 1, 2).float(), self.grid)
        return pooled.permute(0, 2, 3, 1).contiguous()

    def empty_copy(self) -> PositionalRouter:
        ridge = self.global_router.ridge if self.global_router is not None else 1e-5
        return PositionalRouter(self.dim, self.grid, self.keep, self.variance_floor, self.global_vote, ridge)

    def resize(self, num_tasks: int) -> None:
        """Make room for ``num_tasks`` tasks (zero means, unit variances), e.g. before loading a checkpoint."""
        extra = num_tasks - self.num_tasks
        if extra <= 0:
            return
        shape = (extra, self.grid, self.grid, self.dim)
        dev = self.means.device
        self.means = torch.cat([self.means, torch.zeros(shape, dtype=torch.float64, device=dev)])
        self.variances = torch.cat([self.variances, torch.ones(shape, dtype=torch.float64, device=dev)])
        self.train_counts = torch.cat([self.train_counts, torch.zeros(extra, dtype=torch.int64, device=dev)])
        if self.global_router is not None:
            self.global_router.resize(num_tasks)

    @torch.no_grad()
    def fit_task(self, task: int, summaries: torch.Tensor) -> None:
        """Set task's cell Gaussians from its training images' router inputs (N, G, G, D).

        The variance floor is ``variance_floor`` times the task's own mean variance (its images only, so a
        later task never changes it); it keeps a channel that barely varies in training from deciding alone.
        """
        x = task_inputs(self, task, summaries, self.means.device)
        self.resize(task + 1)
        n = x.shape[0]
        mean = x.mean(dim=0)
        if n >= 2:
            var = x.var(dim=0, correction=1)
        else:
            log.warning("Task %d has %d training image(s): its routing variances are the floor only.", task, n)
            var = torch.zeros_like(mean)
        scale = float(var.mean()) if n >= 2 and float(var.mean()) > 0 else 1.0
        self.means[task] = mean
        self.variances[task] = var + self.variance_floor * scale
        self.train_counts[task] = n
        if self.global_router is not None:
            self.global_router.fit_task(task, summaries.mean(dim=(1, 2)))

    @torch.no_grad()
    def cell_nll(self, summaries: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Gaussian NLL (without the 2 pi term) of every cell under every task: (B, G, G, D) -> (B, T, G * G)."""
        t = scored_tasks(self, num_tasks, "statistics")
        x = summaries.to(device=self.means.device, dtype=torch.float64)
        mu, var = self.means[:t], self.variances[:t]  # (T, G, G, D)
        out = []
        for k in range(t):  # one task at a time: (B, G, G, D) temporaries, not (B, T, G, G, D)
            z = (x - mu[k]) ** 2 / var[k] + var[k].log()
            out.append(0.5 * z.sum(dim=-1).flatten(1))
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def local_distances(self, summaries: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Mean NLL (B, T) of each image's ``keep`` best-fitting cells under each task (no vote)."""
        nll = self.cell_nll(summaries, num_tasks)
        return torch.topk(nll, self.kept_cells, dim=-1, largest=False).values.mean(dim=-1)

    @torch.no_grad()
    def distances(self, summaries: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Distance (B, T) of each image to each task: :meth:`local_distances`.

        With ``global_vote`` the other tasks' distances are raised to just above the voted task's (see the
        module docstring), so ``argmin`` gives the vote; the voted task's own distance is unchanged.
        """
        return self.decide(summaries, num_tasks)[0]

    @torch.no_grad()
    def decide(self, summaries: torch.Tensor, num_tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (B, T) (:meth:`distances`) and the chosen task (B,) int64.

        The choice is returned as well as encoded in the distances: a runtime that computes the float64
        distances in float32 (OpenVINO) loses the one-ulp raise, but not the choice made from integer ranks.
        """
        dist = self.local_distances(summaries, num_tasks)
        if self.global_router is None or dist.shape[1] < 2:
            return dist, dist.argmin(dim=1)
        glob = self.global_router.distances(summaries.mean(dim=(1, 2)), dist.shape[1])
        t = dist.shape[1]
        rank_local, rank_global = ranks(dist), ranks(glob)
        chosen = ((rank_local + rank_global) * t + rank_local).argmin(dim=1, keepdim=True)  # (B, 1)
        floor = dist.gather(1, chosen)
        raised = torch.maximum(dist, next_up(floor))
        is_chosen = torch.arange(t, device=dist.device)[None, :] == chosen
        return torch.where(is_chosen, dist, raised), chosen.squeeze(1)

    def floors(self, num_tasks: int | None = None) -> torch.Tensor:
        """A value no distance to task t goes below (T,): the smallest cell's ``0.5 * sum_d log var_d``."""
        t = self.num_tasks if num_tasks is None else num_tasks
        return (0.5 * self.variances[:t].log().sum(dim=-1)).flatten(1).min(dim=1).values.cpu()

    @torch.no_grad()
    def route(self, summaries: torch.Tensor, num_tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed task ids (B,) int64 and the distance to the chosen task (B,)."""
        return routed(*self.decide(summaries, num_tasks))


def ranks(d: torch.Tensor) -> torch.Tensor:
    """Rank (0 = nearest) of every task per image, (B, T) -> (B, T) int64; ties keep task order, NaN last.

    Counted by pairwise comparison (what a stable argsort of the argsort gives, for the few tasks a model has)
    because a stable sort has no ONNX operator.
    """
    mine, other = d[:, :, None], d[:, None, :]  # [b, i, j]: task i's and task j's distances
    mine_nan, other_nan = mine.isnan(), other.isnan()
    smaller = (other < mine) | (mine_nan & ~other_nan)
    equal = (other == mine) | (mine_nan & other_nan)
    index = torch.arange(d.shape[1], device=d.device)
    earlier = index[None, None, :] < index[None, :, None]  # j < i
    return (smaller | (equal & earlier)).sum(dim=2)


_HALF_ULP_PLUS = 2.0**-53 + 2.0**-105  # |y| times this is a little over half an ulp of y
_SMALLEST = 2.0**-1074  # the smallest positive (subnormal) float64
_TINY, _SCALE = 2.0**-900, 2.0**106  # below _TINY the step is found on x * _SCALE (exact), where it is not lost


def next_up(x: torch.Tensor) -> torch.Tensor:
    """``torch.nextafter(x, inf)`` of float64 ``x`` by plain arithmetic (nextafter has no ONNX operator).

    ``y + |y| * (2^-53 + 2^-105)`` rounds to the float64 next above ``y`` for every normal ``y`` (powers of two and
    negative numbers included), so the difference is the exact step; tiny ``x`` are scaled by a power of two
    first, and the step is at least the smallest subnormal (zero, subnormals). ``inf`` stays ``inf``.
    """
    tiny = x.abs() < _TINY
    y = torch.where(tiny, x * _SCALE, x)
    step = (y + y.abs() * _HALF_ULP_PLUS) - y
    step = torch.where(tiny, step / _SCALE, step).clamp(min=_SMALLEST)
    return torch.where(x == math.inf, x, x + step)
