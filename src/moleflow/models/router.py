"""Routers: which task's expert scores an image. Chosen by ``model.flow.router``.

``prototype`` (docs/method.md 6, MAIN): each task t keeps the mean mu_t and the precision (Sigma_t + ridge I)^-1
of its training images' router features (the global average of the patch features, (B, D)), and an image
goes to the Mahalanobis-nearest task. Statistics are kept in float64 because with few training images
Sigma_t is near singular and float32 inverses lose the ranking between tasks.

``positional`` (issue 14, docs/routing.md): the global average is what a defect moves. A dark, cracked
mono-crystalline solar cell averages to something close to a poly-crystalline one, and the prototype router
sends 37 % of them to the poly expert although every defect-free one routes home. The positional router
keeps *where* things are: the patch-feature grid is average-pooled to G x G cells and each task keeps a
diagonal Gaussian per cell (mean and variance of every channel over its training images). An image's
distance to task t is the Gaussian negative log-likelihood per cell,
``0.5 * sum_d ((x_d - mu_d)^2 / var_d + log var_d)``, averaged over the ``keep`` share of its cells that fit
task t best: a defect that spoils some cells leaves the rest to decide. The log-variance term makes a broad
task (poly's mottled grain) pay for its breadth, so an image does not go there merely because everything is
likely under a wide Gaussian. Each task's statistics come from its own training images only and never change
afterwards (zero forgetting). Distances can be negative; ``floors()`` gives, per task, a value no distance
goes below (the unknown-category threshold works on ``distance - floor``).

``global_vote`` (``model.flow.router_global_vote``): with few deciding cells, a broad task whose cells are each
wide (Magnetic Tile's varied tiles) can win an ordinary image of another task on a handful of cells. The
global Gaussian of the prototype router, which sees the whole image, never does that, and fails on the
opposite case (a defect moving the whole image). With the vote, each task keeps both statistics; the image
goes to the task with the smallest sum of its two ranks (positional and global), ties going to the
positional router's choice. The distances stay the positional ones, raised for the other tasks to just above
the chosen task's, so that every caller's ``argmin`` is the vote and the unknown-category thresholds keep
their meaning.

``nearest`` (docs/routing.md): a task made of several kinds of image (PIPED's five paper types photographed in
reflected light, pooled into one task) is no Gaussian: a single mean and spread per task, global or per cell,
sit between its kinds and reach out to a neighbouring task's. The nearest-image router keeps each task's
training images' global averages (the router features of the prototype router, (N_t, D)) and sends an image
to the task whose ``neighbors`` nearest stored images are nearest on average (squared Euclidean distance).
Each task's bank holds its own images only and never changes afterwards (zero forgetting). It stores N_t x D
numbers per task (200 images of D = 152: 240 kB in float64), not patches.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config.flow import ROUTER_KINDS, vote_problem

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
        return _routed(*self.decide(features, num_tasks))


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
        if task > self.num_tasks:
            msg = f"Tasks must be added in order: got task {task} with {self.num_tasks} known."
            raise ValueError(msg)
        self.resize(task + 1)
        x = summaries.detach().to(device=self.means.device, dtype=torch.float64)
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
        t = self.num_tasks if num_tasks is None else num_tasks
        if t < 1:
            msg = "The router has no task statistics yet; train at least one task first."
            raise RuntimeError(msg)
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
        rank_local, rank_global = _ranks(dist), _ranks(glob)
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
        return _routed(*self.decide(summaries, num_tasks))


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
        if task > self.num_tasks:
            msg = f"Tasks must be added in order: got task {task} with {self.num_tasks} known."
            raise ValueError(msg)
        x = features.detach().to(device=self.bank.device, dtype=torch.float64)
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
        t = self.num_tasks if num_tasks is None else num_tasks
        if t < 1:
            msg = "The router has no task banks yet; train at least one task first."
            raise RuntimeError(msg)
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


def _routed(dist: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen task (B,), its distance (B,)) from :meth:`decide`'s distances (B, T) and choice (B,)."""
    return chosen, dist.gather(1, chosen[:, None]).squeeze(1)


def _ranks(d: torch.Tensor) -> torch.Tensor:
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


def build_router(
    kind: str,
    dim: int,
    ridge: float = 1e-5,
    grid: int = 4,
    keep: float = 0.5,
    variance_floor: float = 1e-2,
    global_vote: bool = False,
    neighbors: int = 1,
) -> PrototypeRouter | PositionalRouter | NearestRouter:
    """The router ``model.flow.router`` names."""
    problem = vote_problem(kind, global_vote)
    if problem is not None:
        raise ValueError(problem)
    if kind == "prototype":
        return PrototypeRouter(dim, ridge=ridge)
    if kind == "positional":
        return PositionalRouter(dim, grid, keep, variance_floor, global_vote, ridge)
    if kind == "nearest":
        return NearestRouter(dim, neighbors)
    msg = f"model.flow.router must be one of {ROUTER_KINDS}, got {kind!r}."
    raise ValueError(msg)
