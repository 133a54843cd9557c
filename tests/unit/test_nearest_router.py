"""The nearest-image router: a task made of several kinds of image routes home where one Gaussian per task fails.

A generated case in router-feature space (N, D): task "paper_tl" holds two kinds far apart along channel 0, task
"paper_rl" holds one kind sitting at the midpoint of "paper_tl"'s (where no "paper_tl" image is) and a larger
kind far along channel 1. "paper_tl"'s Gaussian is centred on the midpoint, so the prototype router sends the
first "paper_rl" kind there; the nearest stored image is its own task's.
"""

from __future__ import annotations

import pytest
import torch

from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.models.router import NearestRouter, PrototypeRouter, build_router
from moleflow.thresholds.fitting import outside_own_route, tail_threshold

D = 8
NOISE = 0.1


def _kind(center: list[float], n: int, gen: torch.Generator) -> torch.Tensor:
    c = torch.zeros(D)
    c[: len(center)] = torch.tensor(center)
    return c + NOISE * torch.randn(n, D, generator=gen)


def _tasks(gen: torch.Generator, scale: int = 1) -> dict[str, list[torch.Tensor]]:
    return {
        "paper_tl": [_kind([3.0], 30 * scale, gen), _kind([-3.0], 30 * scale, gen)],
        "paper_rl": [_kind([0.0], 10 * scale, gen), _kind([0.0, 10.0], 50 * scale, gen)],
    }


def _fitted(router, gen: torch.Generator):
    for t, kinds in enumerate(_tasks(gen).values()):
        router.fit_task(t, torch.cat(kinds))
    return router


def test_a_kind_at_another_tasks_centre_routes_home_by_its_nearest_image() -> None:
    gen = torch.Generator().manual_seed(0)
    test = _kind([0.0], 40, torch.Generator().manual_seed(9))  # paper_rl's first kind
    prototype = _fitted(PrototypeRouter(D), torch.Generator().manual_seed(0))
    assert (prototype.route(test)[0] == 0).float().mean() > 0.9  # the Gaussian of paper_tl takes them
    nearest = _fitted(NearestRouter(D), gen)
    assert nearest.route(test)[0].tolist() == [1] * 40
    for t, kinds in enumerate(_tasks(torch.Generator().manual_seed(3)).values()):  # every kind of both goes home
        assert nearest.route(torch.cat(kinds))[0].eq(t).all()


@pytest.mark.parametrize("neighbors", [1, 3, 50])
def test_distances_are_the_mean_of_the_k_nearest_squared_distances(neighbors: int) -> None:
    gen = torch.Generator().manual_seed(1)
    banks = [torch.randn(n, D, generator=gen, dtype=torch.float64) for n in (7, 20, 2)]  # widths differ
    router = NearestRouter(D, neighbors=neighbors)
    for t, bank in enumerate(banks):
        router.fit_task(t, bank)
    x = torch.randn(5, D, generator=gen, dtype=torch.float64)
    expected = torch.stack(
        [torch.cdist(x, b).pow(2).sort(dim=1).values[:, : min(neighbors, len(b))].mean(dim=1) for b in banks], dim=1
    )
    torch.testing.assert_close(router.distances(x), expected, rtol=1e-10, atol=1e-10)
    d, chosen = router.decide(x)
    assert torch.equal(chosen, expected.argmin(dim=1)) and bool((router.floors() == 0).all())
    assert torch.equal(router.distances(x, num_tasks=2), d[:, :2])


def test_a_later_wider_task_leaves_earlier_distances_bit_identical_and_the_state_reloads() -> None:
    gen = torch.Generator().manual_seed(2)
    router = NearestRouter(D, neighbors=3)
    router.fit_task(0, torch.randn(10, D, generator=gen))
    x = torch.randn(6, D, generator=gen)
    before = router.distances(x).clone()
    router.fit_task(1, torch.randn(40, D, generator=gen) + 5)  # widens the bank from 10 to 40 rows
    assert router.bank.shape == (2, 40, D) and router.train_counts.tolist() == [10, 40]
    assert torch.equal(router.distances(x)[:, 0], before[:, 0])

    model = MoLEFlowModel(MoLEFlowConfig(embed_dim=D, ncl=0, hidden=8, router="nearest", router_neighbors=3))
    model.router.load_state_dict(router.state_dict())
    assert isinstance(model.router, NearestRouter) and model.router.neighbors == 3
    assert torch.equal(model.router.distances(x), router.distances(x))
    fresh = NearestRouter(D, neighbors=3)
    fresh.resize(2)  # as a checkpoint loader does: the width comes from the stored state
    fresh.load_state_dict(router.state_dict())
    assert torch.equal(fresh.bank, router.bank)


def test_unknown_category_is_flagged_by_the_routed_tasks_own_threshold() -> None:
    gen = torch.Generator().manual_seed(4)
    router = NearestRouter(D)
    thresholds = []
    for t, kinds in enumerate(_tasks(gen, scale=10).values()):  # 120 held-out images per task
        train = torch.cat(kinds)
        held, kept = train[::5], train[torch.arange(len(train)) % 5 != 0]
        router.fit_task(t, kept)
        thresholds.append(tail_threshold(router.distances(held)[:, t].numpy(), 0.01, 0.0))
    thr = torch.tensor(thresholds, dtype=torch.float64)
    never = _kind([0.0, 0.0, 6.0], 20, gen)  # a category never trained
    d, chosen = router.decide(never)
    assert outside_own_route(d, thr, chosen).all()
    known = torch.cat(_tasks(torch.Generator().manual_seed(8))["paper_rl"])
    d, chosen = router.decide(known)
    assert chosen.eq(1).all() and outside_own_route(d, thr, chosen).float().mean() <= 0.05


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="router_neighbors"):
        MoLEFlowConfig(router="nearest", router_neighbors=0).validate()
    with pytest.raises(ValueError, match="router_neighbors"):
        build_router("nearest", D, neighbors=0)
    with pytest.raises(ValueError, match="no training images"):
        NearestRouter(D).fit_task(0, torch.zeros(0, D))
    with pytest.raises(RuntimeError, match="no task banks"):
        NearestRouter(D).distances(torch.zeros(1, D))
