"""The routers that judge an image by its global feature average: ``prototype`` and ``nearest``.

What each does and why: :mod:`moleflow.models.router`. Router features are (B, D), the patch features' average.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


class _GlobalAverageRouter(nn.Module):
    """What the routers that judge an image by its global feature average share: that input, and zero floors.

    A subclass defines ``num_tasks``, the tasks it holds, and ``distances`` (B, T) of images to each task.
    """

    def summarize(self, features: torch.Tensor) -> torch.Tensor:
        """Router input of patch features F (B, H, W, D): their global average (B, D)."""
        return features.mean(dim=(1, 2))

    def floors(self, num_tasks: int | None = None) -> torch.Tensor:
        """Lower bound of each task's distances (T,): 0, squared distances are >= 0."""
        t = self.num_tasks if num_tasks is None else num_tasks
        return torch.zeros(t, dtype=torch.float64)

    @torch.no_grad()
    def decide(self, features: torch.Tensor, num_tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (B, T) and the chosen (nearest) task (B,) int64: the first of equal nearest ones."""
        d = self.distances(features, num_tasks)
        return d, d.argmin(dim=1)

    @torch.no_grad()
    def route(self, features: torch.Tensor, num_tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed task ids (B,) int64 and the distance to the chosen task (B,)."""
        return routed(*self.decide(features, num_tasks))


class PrototypeRouter(_GlobalAverageRouter):
    """Holds (T, D) means and (T, D, D) precisions as buffers; ``route`` picks the nearest task."""

    kind = "prototype"

    def __init__(self, dim: int, ridge: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.ridge = ridge
        self.register_buffer("means", torch.zeros(0, dim, dtype=torch.float64))
        self.register_buffer("precisions", torch.zeros(0, dim, dim, dtype=torch.float64))
        self.register_buffer("train_counts", torch.zeros(0, dtype=torch.int64))

    @property
    def num_tasks(self) -> int:
        return int(self.means.shape[0])

    def empty_copy(self) -> PrototypeRouter:
        """A router of the same kind and settings with no tasks (cross-validated thresholds fit these)."""
        return PrototypeRouter(self.dim, ridge=self.ridge)

    def resize(self, num_tasks: int) -> None:
        """Make room for ``num_tasks`` prototypes (zeros), e.g. before loading a checkpoint's state."""
        extra = num_tasks - self.num_tasks
        if extra <= 0:
            return
        d = self.dim
        dev = self.means.device
        self.means = torch.cat([self.means, torch.zeros(extra, d, dtype=torch.float64, device=dev)])
        eye = torch.eye(d, dtype=torch.float64, device=dev).expand(extra, d, d)
        self.precisions = torch.cat([self.precisions, eye])
        self.train_counts = torch.cat([self.train_counts, torch.zeros(extra, dtype=torch.int64, device=dev)])

    @torch.no_grad()
    def fit_task(self, task: int, features: torch.Tensor) -> None:
        """Set task's prototype from its training router features (N, D)."""
        x = task_inputs(self, task, features, self.means.device)
        self.resize(task + 1)
        n = x.shape[0]
        mean = x.mean(dim=0)
        if n >= 2:
            cov = torch.cov(x.T, correction=1)
        else:
            log.warning("Task %d has %d training image(s): its routing covariance is the ridge only.", task, n)
            cov = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=x.device)
        cov = cov + self.ridge * torch.eye(self.dim, dtype=torch.float64, device=x.device)
        try:
            precision = torch.linalg.inv(cov)
        except RuntimeError:  # singular despite the ridge
            log.warning("Routing covariance of task %d is singular; using the pseudo-inverse.", task)
            precision = torch.linalg.pinv(cov, hermitian=True)
        self.means[task] = mean
        self.precisions[task] = precision
        self.train_counts[task] = n

    @torch.no_grad()
    def distances(self, features: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Squared Mahalanobis distances (B, T) of router features (B, D) to the first T prototypes."""
        t = scored_tasks(self, num_tasks, "prototypes")
        x = features.to(device=self.means.device, dtype=torch.float64)
        diff = x[:, None, :] - self.means[None, :t, :]  # (B, T, D)
        return torch.einsum("btd,tde,bte->bt", diff, self.precisions[:t], diff)


class NearestRouter(_GlobalAverageRouter):
    """Per-task banks of training router features; see the module docstring.

    Buffers: ``bank`` (T, N, D) float64, each task's rows first and zeros after (N: the largest task's count, so
    a later, larger task widens it without changing earlier rows), ``train_counts`` (T,).
    """

    kind = "nearest"

    def __init__(self, dim: int, neighbors: int = 1) -> None:
        super().__init__()
        if neighbors < 1:
            msg = f"model.flow.router_neighbors must be >= 1, got {neighbors}."
            raise ValueError(msg)
        self.dim = dim
        self.neighbors = neighbors
        self.register_buffer("bank", torch.zeros(0, 0, dim, dtype=torch.float64))
        self.register_buffer("train_counts", torch.zeros(0, dtype=torch.int64))

    @property
    def num_tasks(self) -> int:
        return int(self.bank.shape[0])

    def empty_copy(self) -> NearestRouter:
        return NearestRouter(self.dim, self.neighbors)

    def _grow(self, num_tasks: int, capacity: int) -> None:
        """At least ``num_tasks`` banks of at least ``capacity`` rows; existing rows kept, new ones zero."""
        t, n, d = self.bank.shape
        if num_tasks <= t and capacity <= n:
            return
        grown = torch.zeros(max(t, num_tasks), max(n, capacity), d, dtype=torch.float64, device=self.bank.device)
        grown[:t, :n] = self.bank
        self.bank = grown
        extra = max(0, num_tasks - t)
        self.train_counts = torch.cat(
            [self.train_counts, torch.zeros(extra, dtype=torch.int64, device=self.train_counts.device)]
        )

    def resize(self, num_tasks: int) -> None:
        """Make room for ``num_tasks`` (empty) banks, e.g. before loading a checkpoint's state."""
        self._grow(num_tasks, 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        """Take the stored bank's width (the largest task's image count), which the config does not say."""
        stored = state_dict.get(prefix + "bank")
        if isinstance(stored, torch.Tensor) and stored.dim() == 3:
            self._grow(stored.shape[0], stored.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit_task(self, task: int, features: torch.Tensor) -> None:
        """Store task's training router features (N, D) as its bank."""
        x = task_inputs(self, task, features, self.bank.device)
        if x.shape[0] < 1:
            msg = f"Task {task} has no training images to route by."
            raise ValueError(msg)
        self._grow(task + 1, x.shape[0])
        self.bank[task] = 0.0
        self.bank[task, : x.shape[0]] = x
        self.train_counts[task] = x.shape[0]

    @torch.no_grad()
    def distances(self, features: torch.Tensor, num_tasks: int | None = None) -> torch.Tensor:
        """Mean squared distance (B, T) of router features (B, D) to each task's ``neighbors`` nearest images.

        A task with fewer images than ``neighbors`` averages over all of them.
        """
        t = scored_tasks(self, num_tasks, "banks")
        x = features.to(device=self.bank.device, dtype=torch.float64)
        bank, counts = self.bank[:t], self.train_counts[:t]  # (T, N, D), (T,)
        # |x - b|^2 = |x|^2 - 2 x.b + |b|^2 without a (B, T, N, D) temporary
        squared = (x * x).sum(-1)[:, None, None] - 2 * torch.einsum("bd,tnd->btn", x, bank) + (bank * bank).sum(-1)
        stored = torch.arange(bank.shape[1], device=x.device)[None, :] < counts[:, None]  # (T, N)
        squared = torch.where(stored[None], squared.clamp(min=0.0), torch.full_like(squared, math.inf))
        k = min(self.neighbors, bank.shape[1])
        nearest = torch.topk(squared, k, dim=-1, largest=False).values  # (B, T, k)
        per_task = counts.clamp(max=k)  # (T,)
        used = torch.arange(k, device=x.device)[None, :] < per_task[:, None]  # (T, k)
        summed = torch.where(used[None], nearest, torch.zeros_like(nearest)).sum(-1)
        return summed / per_task.clamp(min=1).to(torch.float64)


def routed(dist: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen task (B,), its distance (B,)) from :meth:`decide`'s distances (B, T) and choice (B,)."""
    return chosen, dist.gather(1, chosen[:, None]).squeeze(1)


def task_inputs(router: nn.Module, task: int, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A router's training inputs for ``task``, detached and float64 on ``device``; tasks must come in order."""
    if task > router.num_tasks:
        msg = f"Tasks must be added in order: got task {task} with {router.num_tasks} known."
        raise ValueError(msg)
    return inputs.detach().to(device=device, dtype=torch.float64)


def scored_tasks(router: nn.Module, num_tasks: int | None, held: str) -> int:
    """How many tasks a distance call scores (all the router holds unless ``num_tasks``); at least one is needed."""
    t = router.num_tasks if num_tasks is None else num_tasks
    if t < 1:
        msg = f"The router has no task {held} yet; train at least one task first."
        raise RuntimeError(msg)
    return t
