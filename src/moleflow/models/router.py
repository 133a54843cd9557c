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

The classes live in :mod:`moleflow.models.global_routers` (prototype, nearest) and
:mod:`moleflow.models.cell_router`; this module chooses between them.
"""

from __future__ import annotations

from moleflow.config.flow import ROUTER_KINDS, vote_problem
from moleflow.models.cell_router import PositionalRouter, next_up
from moleflow.models.global_routers import NearestRouter, PrototypeRouter

__all__ = ["NearestRouter", "PositionalRouter", "PrototypeRouter", "build_router", "next_up"]


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
