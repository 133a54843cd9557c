"""Task-expert linears and the model's task lifecycle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.experts import TaskExpertLinear
from moleflow.models.moleflow import MoLEFlowModel


def small_config(**kw) -> MoLEFlowConfig:
    base = dict(embed_dim=16, ncl=2, hidden=16, lora_rank=4, scale_context_kernel=3, spatial_context_kernel=3)
    base.update(kw)
    return MoLEFlowConfig(**base)


def _train_randomly(model: MoLEFlowModel, seed: int) -> None:
    """Change every trainable parameter, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_new_expert_equals_base(mode: str) -> None:
    layer = TaskExpertLinear(6, 5, mode=mode, rank=2)
    x = torch.randn(4, 6)
    before = layer(x, 1)
    layer.add_expert(1)
    assert torch.equal(layer(x, 1), before) if mode == "lora" else torch.allclose(layer(x, 1), before)


def test_merged_weight_matches_forward() -> None:
    layer = TaskExpertLinear(6, 5, mode="lora", rank=2, alpha=3.0)
    layer.add_expert(0)
    with torch.no_grad():
        layer.experts["0"].B.normal_()
        layer.experts["0"].bias.normal_()
    x = torch.randn(4, 6)
    w, b = layer.merged_weight(0)
    assert torch.allclose(torch.nn.functional.linear(x, w, b), layer(x, 0), atol=1e-6)


@pytest.mark.parametrize("expert_mode", ["lora", "full", "none"])
def test_new_task_leaves_every_output_unchanged(expert_mode: str) -> None:
    """Adding task 1 must not change task 0's outputs, and task 1 starts from task 0's shared solution."""
    torch.manual_seed(0)
    model = MoLEFlowModel(small_config(expert_mode=expert_mode))
    model.add_task()
    model.set_trainable(0)
    _train_randomly(model, 0)
    feats = torch.randn(2, 4, 4, 16)
    z0, ld0 = model(feats, 0)
    model.add_task()
    z0_after, ld0_after = model(feats, 0)
    assert torch.equal(z0, z0_after) and torch.equal(ld0, ld0_after)
    # task 1's flow part is the base at init: with the same adapter it equals the base-only output
    with torch.no_grad():
        model.adapters["1"].load_state_dict(model.adapters["0"].state_dict())
    if expert_mode == "none":
        z1, _ = model(feats, 1)
        assert torch.allclose(z1, z0)


def test_trainable_sets_follow_the_method_table() -> None:
    model = MoLEFlowModel(small_config(dia_blocks=1))
    model.add_task()
    names0 = set(model.set_trainable(0))
    assert any(".base." in n for n in names0)
    assert any(".experts.0." in n for n in names0)
    assert any("scale_context" in n for n in names0)
    assert any(n.startswith("mixers.") for n in names0)
    assert any(n.startswith("adapters.0.") for n in names0)
    assert any(n.startswith("dia.0.") for n in names0)
    model.add_task()
    names1 = set(model.set_trainable(1))
    assert names1, "task 1 must train something"
    for n in names1:
        assert MoLEFlowModel.parameter_owner(n) == 1, n
    assert any(".experts.1." in n for n in names1)
    assert any(n.startswith("adapters.1.") for n in names1)
    assert any(n.startswith("dia.1.") for n in names1)


def _documented_counts() -> dict[str, int]:
    """The table of docs/method.md section 9: {quantity: parameters}."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()
    section = text.split("## 9.", 1)[1]
    rows = re.findall(r"^\| ([^|]+?) \| ([\d,]+) \|$", section, flags=re.M)
    return {label: int(count.replace(",", "")) for label, count in rows}


def test_parameter_counts_match_docs_method_section_9() -> None:
    """Every count docs/method.md states for MAIN (D = 768, NCL = 6, r = 64) is the built model's."""
    model = MoLEFlowModel(MoLEFlowConfig())
    model.add_task()
    subnet = model.flows["shared"].blocks[0].subnet
    small = MoLEFlowModel(MoLEFlowConfig(lora_rank=16))
    small.add_task()
    small.add_task()
    dia = MoLEFlowModel(MoLEFlowConfig(ncl=0, dia_blocks=1))
    dia.add_task()
    counts = model.parameter_counts()
    assert counts["per_task"] == [1_932_288]
    assert small.parameter_counts()["per_task"] == [494_592, 494_592]
    built = {
        "one MoLE subnet's base linears": sum(
            p.numel() for layer in subnet.expert_linears() for p in layer.base.parameters()
        ),
        "one subnet's scale-context convolution and alpha": sum(p.numel() for p in subnet.scale_context.parameters()),
        "spatial context mixer (k = 3)": sum(p.numel() for p in model.mixers["shared"].parameters()),
        "shared flow (6 subnets' bases and context convolutions, plus the mixer)": counts["shared"],
        "per task at r = 64: 6 subnets x (4,992 r expert weights + 2,304 task biases) + 1,536 adapter values": counts[
            "per_task"
        ][0],
        "per task at r = 16": small.parameter_counts()["per_task"][1],
        "one DIA block": sum(p.numel() for p in dia.dia["0"].parameters()),
    }
    assert _documented_counts() == built
    assert counts["shared"] == 6 * (1_476_864 + 9_985) + 7_681


@pytest.mark.parametrize(
    ("key", "value"),
    [("ncl", -1), ("dia_blocks", -1), ("lora_rank", 0), ("expert_mode", "big"), ("embed_dim", 10)],
)
def test_bad_model_config_names_the_key(key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        MoLEFlowModel(small_config(**{key: value}))


def test_routed_scoring_equals_per_task_scoring() -> None:
    torch.manual_seed(0)
    model = MoLEFlowModel(small_config())
    for t in range(3):
        model.add_task()
        model.set_trainable(t)
        _train_randomly(model, t)
    feats = torch.randn(5, 4, 4, 16)
    tasks = torch.tensor([2, 0, 2, 1, 0])
    routed = model.nll_routed(feats, tasks)
    for b in range(5):
        single = model.nll(feats[b : b + 1], int(tasks[b]))[0][0]
        assert torch.allclose(routed[b], single, atol=1e-4)


@pytest.mark.parametrize("expert_mode", ["lora", "full", "none"])
def test_merged_experts_give_the_same_scores(expert_mode: str) -> None:
    """Inference with experts folded into the base weights equals the three-matmul path (float rounding)."""
    torch.manual_seed(0)
    model = MoLEFlowModel(small_config(expert_mode=expert_mode, dia_blocks=1))
    for t in range(3):
        model.add_task()
        model.set_trainable(t)
        _train_randomly(model, t)
    feats = torch.randn(4, 4, 4, 16)
    tasks = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        plain = model.nll_routed(feats, tasks)
        with model.merged_experts():
            merged = model.nll_routed(feats, tasks)
        again = model.nll_routed(feats, tasks)
    assert torch.allclose(merged, plain, rtol=1e-5, atol=1e-3)
    assert torch.equal(again, plain)  # leaving the context restores the exact training path


def test_training_with_the_expert_folded_in_gives_the_unmerged_gradients() -> None:
    """While the base trains (task 0) the layer computes F.linear(x, W + s B A, b + b_t): same values and gradients."""
    layer = TaskExpertLinear(6, 5, mode="lora", rank=2, alpha=3.0)
    layer.add_expert(0)
    expert = layer.experts["0"]
    with torch.no_grad():
        expert.B.normal_()
        expert.bias.normal_()
    x = torch.randn(4, 6, requires_grad=True)
    params = [x, layer.base.weight, layer.base.bias, expert.A, expert.B, expert.bias]
    merged = layer(x, 0)
    reference = layer.base(x) + expert.delta(x)  # the method's formula, term by term
    assert torch.allclose(merged, reference, atol=1e-6)
    grads_merged = torch.autograd.grad(merged.pow(2).sum(), params)
    grads_reference = torch.autograd.grad(reference.pow(2).sum(), params)
    for got, want in zip(grads_merged, grads_reference, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    layer.base.requires_grad_(False)  # later tasks: base frozen, so the low-rank path (cheaper backward) is used
    assert torch.equal(layer(x, 0), reference)
