"""Router, positional code, losses, schedule and the Lightning module's guard."""

from __future__ import annotations

import math

import pytest
import torch

from moleflow.config.loss import LossConfig
from moleflow.models.positional import positional_encoding_2d
from moleflow.models.router import PrototypeRouter
from moleflow.training.lightning_module import MoLEFlowLitModule
from moleflow.training.losses import is_unusable_loss, moleflow_loss, tail_aware_loss, tail_k
from moleflow.training.optim import lr_factor


def test_router_picks_the_mahalanobis_nearest_task() -> None:
    gen = torch.Generator().manual_seed(0)
    router = PrototypeRouter(4)
    centres = [torch.tensor([0.0, 0, 0, 0]), torch.tensor([3.0, 0, 0, 0]), torch.tensor([0.0, 3, 0, 0])]
    for t, c in enumerate(centres):
        router.fit_task(t, c + 0.3 * torch.randn(50, 4, generator=gen))
    queries = torch.stack([c + 0.3 * torch.randn(4, generator=gen) for c in centres])
    routed, dist = router.route(queries)
    assert routed.tolist() == [0, 1, 2]
    diff = (queries[0].double() - router.means[0])[None]
    assert torch.allclose(dist[0], (diff @ router.precisions[0] @ diff.T)[0, 0])
    # only the first two tasks considered
    assert router.route(queries, num_tasks=2)[0][:2].tolist() == [0, 1]


def test_router_covariance_is_unbiased_plus_ridge() -> None:
    x = torch.randn(10, 3, dtype=torch.float64)
    router = PrototypeRouter(3, ridge=1e-5)
    router.fit_task(0, x)
    cov = torch.cov(x.T, correction=1) + 1e-5 * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(router.precisions[0], torch.linalg.inv(cov))


def test_router_with_one_image_and_no_tasks() -> None:
    router = PrototypeRouter(3)
    with pytest.raises(RuntimeError, match="no task prototypes"):
        router.route(torch.zeros(1, 3))
    router.fit_task(0, torch.ones(1, 3))
    assert router.route(torch.ones(2, 3))[0].tolist() == [0, 0]


def test_positional_code_halves_encode_column_and_row() -> None:
    code = positional_encoding_2d(4, 5, 16)
    assert code.shape == (4, 5, 16)
    assert torch.equal(code[0, :, :8], code[3, :, :8])  # first half: column only
    assert torch.equal(code[:, 0, 8:], code[:, 4, 8:])  # second half: row only
    # channel 2i = sin(pos * f_i), 2i + 1 = cos(pos * f_i), f_i = exp(-2i ln(1e4) / 8)
    f1 = math.exp(-2 * 1 * math.log(1e4) / 8)
    assert code[0, 3, 2].item() == pytest.approx(math.sin(3 * f1), abs=1e-6)
    assert code[2, 0, 8 + 3].item() == pytest.approx(math.cos(2 * f1), abs=1e-6)


def test_tail_aware_loss_by_hand() -> None:
    assert tail_k(784, 0.02) == 15 and tail_k(64, 0.02) == 1
    nll = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 2, 5)
    k = tail_k(10, 0.2)  # 2
    tail = (nll[0].flatten().topk(k).values.mean() + nll[1].flatten().topk(k).values.mean()) / 2
    expected = 0.3 * nll.mean() + 0.7 * tail
    assert torch.allclose(tail_aware_loss(nll, 0.7, 0.2), expected)
    assert torch.allclose(tail_aware_loss(nll, 0.0, 0.2), nll.mean())
    logdet = torch.full((2, 2, 5), 2.0)
    loss, _ = moleflow_loss(nll, logdet, LossConfig(tail_weight=0.7, tail_top_k_ratio=0.2, lambda_logdet=0.5))
    assert torch.allclose(loss, expected + 0.5 * 4.0)


def test_unusable_loss_and_config_checks() -> None:
    assert is_unusable_loss(torch.tensor(float("nan")), 1e8)
    assert is_unusable_loss(torch.tensor(float("inf")), 1e8)
    assert is_unusable_loss(torch.tensor(2e8), 1e8)
    assert not is_unusable_loss(torch.tensor(300.0), 1e8)
    with pytest.raises(ValueError, match="tail_top_k_ratio"):
        LossConfig(tail_top_k_ratio=0.0).validate()
    with pytest.raises(ValueError, match="tail_top_k_ratio"):
        LossConfig(tail_top_k_ratio=1.5).validate()


def test_lr_schedule_cosine_and_warmup() -> None:
    assert lr_factor(0, 60, 0, 0.01) == pytest.approx(1.0)
    assert lr_factor(59, 60, 0, 0.01) == pytest.approx(0.01)
    assert lr_factor(0, 60, 2, 0.01) == pytest.approx(0.5)
    assert lr_factor(1, 60, 2, 0.01) == pytest.approx(1.0)
    assert lr_factor(2, 60, 2, 0.01) == pytest.approx(1.0)
    assert lr_factor(59, 60, 2, 0.01) == pytest.approx(0.01)
    values = [lr_factor(e, 60, 2, 0.01) for e in range(2, 60)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def _tiny_module() -> MoLEFlowLitModule:
    flow = dict(embed_dim=16, ncl=2, hidden=16, lora_rank=2, scale_context_kernel=3)
    return MoLEFlowLitModule(flow=flow)


def test_guard_skips_and_counts_non_finite_batches() -> None:
    module = _tiny_module()
    module.start_task("a")
    bad = torch.full((2, 4, 4, 16), float("nan"))
    assert module.training_step((bad,), 0) is None
    assert module.skipped_batches["a"] == 1


def test_optimizer_holds_exactly_the_later_tasks_own_parameters() -> None:
    """Task b (after a) trains its own experts and adapter only (docs/method.md 3.4): named from the method, not
    from requires_grad, and checked by one optimizer step that moves b's expert and nothing shared or of a."""
    module = _tiny_module()
    module.start_task("a")
    module.start_task("b")

    class _Trainer:
        max_epochs = 3

    module._trainer = _Trainer()  # configure_optimizers reads max_epochs only
    opt = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.model.named_parameters()}
    in_opt = {names[id(p)] for group in opt.param_groups for p in group["params"]}
    expected = {n for n in names.values() if ".experts.1." in n or n.startswith("adapters.1.")}
    assert len(expected) >= 8 and in_opt == expected
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 3e-4)  # warm-up epoch 0 of a later task

    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    features = torch.randn(2, 4, 4, 16, generator=torch.Generator().manual_seed(0))
    nll, _ = module.model.nll(features, 1)
    nll.mean().backward()
    opt.step()
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= expected  # nothing shared and nothing of task a changed
    assert any(".experts.1." in n for n in moved)
