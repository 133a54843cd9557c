"""Prototype router (docs/method.md 6): per-task Gaussian prototypes, Mahalanobis argmin at test time.

Each task t keeps the mean mu_t and the precision (Sigma_t + ridge I)^-1 of its training images'
router features (the global average of the patch features, (B, D)). Statistics are kept in
float64 because with few training images Sigma_t is near singular and float32 inverses lose the
ranking between tasks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class PrototypeRouter(nn.Module):
    """Holds (T, D) means and (T, D, D) precisions as buffers; ``route`` picks the nearest task."""

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
        if task > self.num_tasks:
            msg = f"Prototypes must be added in task order: got task {task} with {self.num_tasks} known."
            raise ValueError(msg)
        self.resize(task + 1)
        x = features.detach().to(device=self.means.device, dtype=torch.float64)
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
        t = self.num_tasks if num_tasks is None else num_tasks
        if t < 1:
            msg = "The router has no task prototypes yet; train at least one task first."
            raise RuntimeError(msg)
        x = features.to(device=self.means.device, dtype=torch.float64)
        diff = x[:, None, :] - self.means[None, :t, :]  # (B, T, D)
        return torch.einsum("btd,tde,bte->bt", diff, self.precisions[:t], diff)

    @torch.no_grad()
    def route(self, features: torch.Tensor, num_tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed task ids (B,) int64 and the distance to the chosen prototype (B,)."""
        d = self.distances(features, num_tasks)
        best, idx = d.min(dim=1)
        return idx, best
