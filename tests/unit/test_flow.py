"""Coupling flow and DIA: exact inverse, log-det against autograd, identity at zero blocks."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from moleflow.models.coupling import CouplingBlock, CouplingFlow
from moleflow.models.dia import DIA
from moleflow.models.experts import TaskExpertLinear

GRID = (2, 3, 3)  # (B, H, W): N = 18 patches


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Randomise every parameter so the test does not pass because of zero initialisations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _flow(num_blocks: int = 3, dim: int = 8, scale_context_kernel: int = 3) -> CouplingFlow:
    flow = CouplingFlow(num_blocks, dim, hidden=16, scale_context_kernel=scale_context_kernel, rank=2)
    flow.add_expert(0)
    _perturb(flow)
    return flow.double()


@pytest.mark.parametrize("scale_context_kernel", [0, 3])
@pytest.mark.parametrize("expert_mode", ["lora", "full", "none"])
def test_flow_round_trip_is_exact(scale_context_kernel: int, expert_mode: str) -> None:
    flow = CouplingFlow(4, 8, hidden=16, scale_context_kernel=scale_context_kernel, expert_mode=expert_mode, rank=2)
    flow.add_expert(0)
    _perturb(flow)
    flow = flow.double()
    x = torch.randn(18, 8, dtype=torch.float64)
    z, logdet = flow(x, 0, GRID)
    assert not torch.allclose(z, x)
    assert torch.allclose(flow.inverse(z, 0, GRID), x, atol=1e-12)
    assert logdet.shape == (18,)


def test_logdet_matches_autograd_jacobian_per_patch() -> None:
    """Each patch is an independent sample: its log|det| must equal autograd's on that patch's Jacobian."""
    flow = _flow(num_blocks=3, dim=8, scale_context_kernel=0)
    x = torch.randn(5, 8, dtype=torch.float64)
    _, logdet = flow(x, 0, (5, 1, 1))
    for n in range(5):
        jac = jacobian(lambda v, n=n: flow(v[None], 0, (1, 1, 1))[0][0], x[n])
        assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, logdet[n], atol=1e-10)


def test_logdet_matches_autograd_with_scale_context_on_whole_grid() -> None:
    """With scale context the patches are coupled; the total log-det equals the full Jacobian's."""
    flow = _flow(num_blocks=2, dim=4)
    grid = (1, 2, 2)
    x = torch.randn(4 * 4, dtype=torch.float64)
    jac = jacobian(lambda v: flow(v.reshape(4, 4), 0, grid)[0].reshape(-1), x)
    _, logdet = flow(x.reshape(4, 4), 0, grid)
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, logdet.sum(), atol=1e-10)


def test_single_block_forward_inverse_and_logdet_sum() -> None:
    block = CouplingBlock(6, hidden=8, scale_context_kernel=0, rank=2)
    block.subnet.add_expert(0)
    _perturb(block)
    block = block.double()
    x = torch.randn(7, 6, dtype=torch.float64)
    y, ld = block(x, 0, (7, 1, 1))
    assert torch.allclose(block.inverse(y, 0, (7, 1, 1)), x, atol=1e-12)
    # log-det(forward) + log-det(inverse) = 0, computed via autograd on the inverse
    jac_inv = jacobian(lambda v: block.inverse(v[None], 0, (1, 1, 1))[0], y[0])
    assert torch.allclose(
        torch.linalg.slogdet(jac_inv).logabsdet + ld[0], torch.zeros((), dtype=torch.float64), atol=1e-10
    )


def test_zero_blocks_is_identity() -> None:
    flow = CouplingFlow(0, 8)
    x = torch.randn(10, 8)
    z, ld = flow(x, 0, (10, 1, 1))
    assert torch.equal(z, x)
    assert torch.equal(ld, torch.zeros(10))


def test_negative_block_count_rejected() -> None:
    with pytest.raises(ValueError, match="ncl"):
        CouplingFlow(-1, 8)


def test_dia_round_trip_and_logdet() -> None:
    dia = DIA(6, num_blocks=3)
    _perturb(dia, seed=1)
    dia = dia.double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y, ld = dia(x)
    assert torch.allclose(dia.inverse(y), x, atol=1e-12)
    jac = jacobian(lambda v: dia(v[None])[0][0], x[0])
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, ld[0], atol=1e-10)


def test_new_dia_is_identity() -> None:
    dia = DIA(8, num_blocks=2)
    x = torch.randn(3, 8)
    y, ld = dia(x)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(3))


def test_hand_written_coupling_backwards_pass_gradcheck() -> None:
    """The fused affine step and the in-place concat-permute have hand-written backwards: check them numerically."""
    from moleflow.models.coupling import _AffineCoupling, _ConcatPermute

    gen = torch.Generator().manual_seed(0)
    u2, s_raw, t_raw = (torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: _AffineCoupling.apply(a, b, c, 0.1, 1.9), (u2, s_raw, t_raw))
    u1 = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(6, generator=gen)
    dest = torch.argsort(perm)
    out = _ConcatPermute.apply(u1, u2, dest[:3], dest[3:])
    assert torch.equal(out, torch.cat([u1, u2], dim=1)[:, perm])
    assert torch.autograd.gradcheck(lambda a, b: _ConcatPermute.apply(a, b, dest[:3], dest[3:]), (u1, u2))


@pytest.mark.parametrize("scale_context_kernel", [0, 3])
def test_training_and_inference_paths_give_identical_values(scale_context_kernel: int) -> None:
    """With gradients the block runs its autograd functions, without them plain ops: the values must be bit-equal."""
    flow = CouplingFlow(3, 8, hidden=16, scale_context_kernel=scale_context_kernel, rank=2)
    flow.add_expert(0)
    _perturb(flow)
    for layer in flow.modules():  # a frozen base: the expert linears themselves take one path in both modes
        if isinstance(layer, TaskExpertLinear):
            layer.base.requires_grad_(False)
    x = torch.randn(18, 8, requires_grad=True)
    z, logdet = flow(x, 0, GRID)
    with torch.no_grad():
        z_eval, logdet_eval = flow(x, 0, GRID)
    assert torch.equal(z, z_eval) and torch.equal(logdet, logdet_eval)


@pytest.mark.slow
def test_runtime_compile_matches_eager_values_and_gradients() -> None:
    """runtime.compile=true compiles flow.forward (with the hand-written autograd functions inside)."""
    torch.manual_seed(0)
    flow = CouplingFlow(2, 16, hidden=32, scale_context_kernel=3, rank=4)
    flow.add_expert(0)
    _perturb(flow)
    x = torch.randn(2 * 4 * 4, 16)

    def grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        flow.zero_grad(set_to_none=True)
        z, logdet = flow(x, 0, (2, 4, 4))
        (z.pow(2).sum() - logdet.sum()).backward()
        return z.detach(), [p.grad.clone() for p in flow.parameters() if p.grad is not None]

    z_eager, g_eager = grads()
    flow.forward = torch.compile(flow.forward)
    z_compiled, g_compiled = grads()
    assert torch.allclose(z_eager, z_compiled, atol=1e-5)
    assert len(g_eager) == len(g_compiled) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(g_eager, g_compiled, strict=True))
