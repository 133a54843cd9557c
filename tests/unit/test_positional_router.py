"""The positional router (issue 14): defects do not fool it where they fool the global-mean prototype router.

A generated case in feature space (B, H, W, D) that has what ELPV has: task A ("mono") is a tight, bright
product with dark chamfered corners; task B ("poly") is darker with a broad brightness spread and no corners.
A defective A image has a dark region of B-like patches over ~45 % of its area: its global mean moves along
the direction in which B varies a lot and A hardly at all, so the Mahalanobis-nearest prototype is B's.
"""

from __future__ import annotations

import math

import pytest
import torch

from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.cell_router import ranks
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.models.router import PositionalRouter, PrototypeRouter, build_router, next_up
from moleflow.thresholds.fitting import cross_validated_distances, tail_threshold

H = W = 14
D = 8
A_MEAN = torch.zeros(D)
B_MEAN = torch.zeros(D)
B_MEAN[0] = -2.0  # B is darker along channel 0 ("brightness")
C_MEAN = torch.zeros(D)
C_MEAN[1] = 3.0  # a category never trained


def _corners() -> torch.Tensor:
    mask = torch.zeros(H, W, dtype=torch.bool)
    for i in range(H):
        for j in range(W):
            if min(i, H - 1 - i) + min(j, W - 1 - j) < 3:
                mask[i, j] = True
    return mask


def _images(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind in ("a", "a_defective"):
        x = A_MEAN + 0.05 * torch.randn(n, H, W, D, generator=gen)
        x[..., 0] += 0.05 * torch.randn(n, 1, 1, generator=gen)  # small brightness spread
        x[:, _corners(), 1] = -1.5  # dark corners in channel 1
        if kind == "a_defective":
            for k in range(n):  # a dark B-like region, random place, ~45 % of the cell
                top = int(torch.randint(0, H - 9 + 1, (1,), generator=gen))
                left = int(torch.randint(0, W - 10 + 1, (1,), generator=gen))
                region = B_MEAN + 0.3 * torch.randn(9, 10, D, generator=gen)
                x[k, top : top + 9, left : left + 10] = region
        return x
    if kind == "b":
        x = B_MEAN + 0.3 * torch.randn(n, H, W, D, generator=gen)
        x[..., 0] += 1.0 * torch.randn(n, 1, 1, generator=gen)  # broad brightness spread
        return x
    if kind == "c":
        return C_MEAN + 0.3 * torch.randn(n, H, W, D, generator=gen)
    raise ValueError(kind)


def _fit(router, gen: torch.Generator):
    for t, kind in enumerate(("a", "b")):
        router.fit_task(t, router.summarize(_images(kind, 60, gen)))
    return router


def _routed(router, kind: str, gen: torch.Generator, n: int = 40) -> torch.Tensor:
    return router.route(router.summarize(_images(kind, n, gen)))[0]


def test_global_mean_router_misroutes_defects_the_positional_router_does_not() -> None:
    prototype = _fit(PrototypeRouter(D), torch.Generator().manual_seed(0))
    positional = _fit(PositionalRouter(D, grid=7, keep=0.25), torch.Generator().manual_seed(0))
    for router in (prototype, positional):  # defect-free images: both route home
        assert (_routed(router, "a", torch.Generator().manual_seed(1)) == 0).all()
        assert (_routed(router, "b", torch.Generator().manual_seed(2)) == 1).all()
    proto_home = (_routed(prototype, "a_defective", torch.Generator().manual_seed(3)) == 0).double().mean()
    pos_home = (_routed(positional, "a_defective", torch.Generator().manual_seed(3)) == 0).double().mean()
    assert proto_home < 0.5  # the failure of issue 14: most defective A images go to B
    assert pos_home == 1.0


def test_adding_a_task_never_changes_an_earlier_tasks_statistics_or_distances() -> None:
    gen = torch.Generator().manual_seed(0)
    router = PositionalRouter(D, grid=7, keep=0.25)
    router.fit_task(0, router.summarize(_images("a", 30, gen)))
    queries = router.summarize(_images("a_defective", 10, gen))
    before = router.distances(queries).clone()
    means, variances, floor = router.means[0].clone(), router.variances[0].clone(), router.floors()[0].clone()
    router.fit_task(1, router.summarize(_images("b", 30, gen)))
    router.fit_task(2, router.summarize(_images("c", 30, gen)))
    assert torch.equal(router.means[0], means) and torch.equal(router.variances[0], variances)
    assert torch.equal(router.distances(queries)[:, :1], before)  # bit-identical
    assert torch.equal(router.floors()[0], floor)
    assert router.distances(queries).shape == (10, 3)


def test_distances_are_the_mean_nll_of_the_best_cells_and_never_below_the_floor() -> None:
    gen = torch.Generator().manual_seed(0)
    router = PositionalRouter(D, grid=2, keep=0.5)
    router.fit_task(0, router.summarize(_images("b", 20, gen)))
    x = router.summarize(_images("a", 3, gen))
    mu, var = router.means[0], router.variances[0]
    cells = (0.5 * ((x.double() - mu) ** 2 / var + var.log()).sum(-1)).flatten(1)  # (3, 4) by hand
    expected = cells.sort(dim=1).values[:, :2].mean(dim=1)  # the best 2 of 4 cells
    assert torch.allclose(router.distances(x)[:, 0], expected)
    assert (router.distances(x)[:, 0] >= router.floors()[0]).all()
    assert router.kept_cells == 2


def test_unknown_category_is_flagged_defects_of_known_tasks_are_not() -> None:
    """Thresholds from cross-validated distances of training images (as predict calibrates them)."""
    gen = torch.Generator().manual_seed(0)
    router = PositionalRouter(D, grid=7, keep=0.25)
    thresholds = []
    for t, kind in enumerate(("a", "b")):
        train = router.summarize(_images(kind, 60, gen))
        router.fit_task(t, train)
        own = cross_validated_distances(train, router)
        thresholds.append(tail_threshold(own.numpy(), 0.01, float(router.floors()[t])))
    thr = torch.tensor(thresholds, dtype=torch.float64)

    def unknown(kind: str) -> float:
        d = router.distances(router.summarize(_images(kind, 40, torch.Generator().manual_seed(5))))
        return float((d > thr[None, :]).all(dim=1).double().mean())

    assert unknown("c") == 1.0  # never trained: every image flagged
    assert unknown("a") <= 0.05 and unknown("b") <= 0.05
    assert unknown("a_defective") <= 0.05  # a defect of a known task is not an unknown category


def test_model_builds_the_configured_router_and_rejects_bad_settings() -> None:
    model = MoLEFlowModel(MoLEFlowConfig(embed_dim=8, ncl=0, hidden=8, router="positional", router_grid=3))
    assert isinstance(model.router, PositionalRouter) and model.router.grid == 3
    assert isinstance(MoLEFlowModel(MoLEFlowConfig(embed_dim=8, ncl=0, hidden=8)).router, PrototypeRouter)
    with pytest.raises(ValueError, match="model.flow.router must be one of"):
        MoLEFlowConfig(router="median").validate()
    with pytest.raises(ValueError, match="router_keep"):
        MoLEFlowConfig(router_keep=0.0).validate()
    with pytest.raises(ValueError, match="router_grid"):
        build_router("positional", 8, grid=0)
    router = PositionalRouter(D, grid=20)
    with pytest.raises(ValueError, match="larger than the patch grid"):
        router.summarize(torch.zeros(1, H, W, D))
    assert math.isfinite(float(PositionalRouter(D).floors(0).sum()))


# ---------------------------------------------------------------- global vote (model/router=robust)
def _vote_router() -> PositionalRouter:
    """Three tasks whose local and global statistics are set by hand, so every rank is known."""
    router = PositionalRouter(2, grid=1, keep=1.0, global_vote=True)
    router.resize(3)
    router.means[:, 0, 0] = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    router.variances.fill_(1.0)
    assert router.global_router is not None
    router.global_router.means[:] = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    return router


def test_vote_picks_the_smallest_rank_sum_and_keeps_the_chosen_distance() -> None:
    router = _vote_router()
    x = torch.tensor([[1.0, 1.8]])[:, None, None, :]  # local ranks (0, 2, 1) by construction
    local = router.local_distances(x)
    assert local.argmin(dim=1).item() == 0
    # the global Gaussian ranks task 0 last and task 2 first: rank sums 2, 3, 1 -> task 2
    router.global_router.means[0] = torch.tensor([-9.0, -9.0], dtype=torch.float64)
    router.global_router.means[2] = torch.tensor([1.0, 1.8], dtype=torch.float64)
    d = router.distances(x)
    assert d.argmin(dim=1).item() == 2 and router.route(x)[0].item() == 2
    assert d[0, 2] == local[0, 2]  # the chosen task's distance is its own
    assert (d[0, :2] > d[0, 2]).all() and (d[0, :2] >= local[0, :2]).all()  # the others raised above it
    # equal rank sums go to the local router's choice: global ranks (1, 2, 0) give sums 1, 4, 1 -> task 0
    router.global_router.means[0] = torch.tensor([0.0, 4.0], dtype=torch.float64)
    assert ranks(router.global_router.distances(x.mean(dim=(1, 2)))).tolist() == [[1, 2, 0]]
    assert router.distances(x).argmin(dim=1).item() == 0
    router.global_router.means[0] = torch.tensor([-9.0, -9.0], dtype=torch.float64)
    dist, chosen = router.decide(x)  # the choice is returned too (for float32 runtimes, see decide)
    assert chosen.tolist() == [2] and torch.equal(dist, router.distances(x)) and router.route(x)[1] == dist[0, 2]


def test_ranks_and_next_up_are_the_sort_and_nextafter_they_replace() -> None:
    """Written with ops every exporter knows (no stable sort, no nextafter in ONNX), with the same values."""
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2, 5):
        d = torch.randint(-2, 3, (200, t), generator=gen).double()  # many ties
        d[torch.rand(d.shape, generator=gen) < 0.1] = math.nan
        d[torch.rand(d.shape, generator=gen) < 0.05] = math.inf
        assert torch.equal(ranks(d), torch.argsort(torch.argsort(d, dim=1, stable=True), dim=1))
    powers = torch.tensor([2.0**k for k in range(-1074, 1024)], dtype=torch.float64)
    x = torch.cat(
        [
            torch.randn(20000, dtype=torch.float64, generator=gen)
            * 10.0 ** torch.randint(-320, 300, (20000,), generator=gen, dtype=torch.float64),
            powers,
            -powers,
            torch.nextafter(powers, torch.zeros_like(powers)),
            torch.tensor([0.0, -0.0, math.inf, 1.7976931348623157e308, -1.7976931348623157e308], dtype=torch.float64),
        ]
    )
    assert torch.equal(next_up(x), torch.nextafter(x, torch.full_like(x, math.inf)))


def test_vote_keeps_earlier_statistics_and_one_task_routes_home() -> None:
    gen = torch.Generator().manual_seed(0)
    router = PositionalRouter(D, grid=7, keep=0.25, global_vote=True)
    router.fit_task(0, router.summarize(_images("a", 30, gen)))
    queries = router.summarize(_images("a_defective", 10, gen))
    assert torch.equal(router.distances(queries), router.local_distances(queries))  # one task: no vote
    state = {k: v.clone() for k, v in router.state_dict().items()}
    local = router.local_distances(queries).clone()
    router.fit_task(1, router.summarize(_images("b", 30, gen)))
    router.fit_task(2, router.summarize(_images("c", 30, gen)))
    for key, value in state.items():  # task 0's cell Gaussians and global Gaussian, bit-identical
        assert torch.equal(router.state_dict()[key][:1], value[:1]), key
    assert torch.equal(router.local_distances(queries)[:, :1], local)
    assert set(state) == {
        "means",
        "variances",
        "train_counts",
        "global_router.means",
        "global_router.precisions",
        "global_router.train_counts",
    }


def test_vote_routes_defect_free_and_defective_images_home_on_the_generated_case() -> None:
    """Three tasks (with two the vote can only tie): where the global mean fails, the rank sum still goes home."""
    voting = _fit(PositionalRouter(D, grid=7, keep=0.25, global_vote=True), torch.Generator().manual_seed(0))
    voting.fit_task(2, voting.summarize(_images("c", 60, torch.Generator().manual_seed(4))))
    assert (_routed(voting, "c", torch.Generator().manual_seed(5)) == 2).all()
    assert (_routed(voting, "a", torch.Generator().manual_seed(1)) == 0).all()
    assert (_routed(voting, "b", torch.Generator().manual_seed(2)) == 1).all()
    assert (_routed(voting, "a_defective", torch.Generator().manual_seed(3)) == 0).all()


def test_vote_needs_the_positional_router_and_has_its_own_state_keys() -> None:
    with pytest.raises(ValueError, match="router_global_vote needs model.flow.router=positional"):
        MoLEFlowModel(MoLEFlowConfig(embed_dim=8, ncl=0, hidden=8, router_global_vote=True))
    plain = PositionalRouter(D)
    assert plain.global_router is None and not any(k.startswith("global_router") for k in plain.state_dict())
    copy = PositionalRouter(D, grid=3, keep=0.5, global_vote=True, ridge=1e-3).empty_copy()
    assert copy.global_vote and copy.global_router is not None and copy.global_router.ridge == 1e-3


def test_config_check_refuses_the_vote_without_the_positional_router(tmp_path) -> None:
    from moleflow.config.checks import config_problems
    from tests.helpers import compose_config

    bad = compose_config(["model.flow.router_global_vote=true"], tmp_path)
    assert any("router_global_vote needs model.flow.router=positional" in p for p in config_problems(bad))
    assert not config_problems(compose_config(["model/router=robust"], tmp_path))
