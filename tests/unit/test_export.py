"""The exported pipeline computes what the Python model computes, for every model variant, with a free batch size.

The export traces the detector's own pipeline and the model's own layers (no export-only copy of the flow),
so every variant here, the feature standardizer included, must export without export code of its own.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from moleflow.config.flow import MoLEFlowConfig
from moleflow.evaluation.anomaly_map import sanitize_nonfinite
from moleflow.evaluation.scoring import sanitize_per_image, score_maps
from moleflow.inference.export import ExportableMoLEFlow, ExportError
from moleflow.inference.pipeline import RoutedPipeline
from moleflow.models.feature_extractor import router_features
from moleflow.models.moleflow import MoLEFlowModel

D, GRID, TASKS, IMAGE = 16, (4, 4), 3, 16
VARIANTS = {
    "main": {},
    "full_rank_experts": {"expert_mode": "full"},
    "no_experts": {"expert_mode": "none"},
    "separate": {"base_sharing": "separate"},
    "sequential": {"base_sharing": "sequential", "expert_mode": "none"},
    "dia_only": {"ncl": 0, "dia_blocks": 3},
    "no_scale_context_no_mixer": {"scale_context_kernel": 0, "spatial_context_kernel": 0},
    "no_adapter_no_positional": {"adapter": "none", "positional_encoding": False},
    "separate_full_dia": {"base_sharing": "separate", "expert_mode": "full", "dia_blocks": 2},
    "standardize_channel": {"standardize": "channel"},
    "standardize_position_no_adapter": {"standardize": "position", "adapter": "none"},
}


def _features(task: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, H, W, D) features whose global average sits near a task-specific centre."""
    centre = torch.zeros(D)
    centre[task * 4 : task * 4 + 4] = 3.0
    return centre + 0.5 * torch.randn(n, *GRID, D, generator=gen)


def _trained_like(overrides: dict) -> MoLEFlowModel:
    """A 3-task model whose parameters (experts included) are all perturbed, and fitted prototypes."""
    values = {"embed_dim": D, "ncl": 2, "hidden": D, "lora_rank": 2, **overrides}
    model = MoLEFlowModel(MoLEFlowConfig(**values))
    gen = torch.Generator().manual_seed(0)
    for t in range(TASKS):
        model.add_task()
        feats = _features(t, 12, gen)
        model.fit_task_statistics(t, feats)  # no-op without a standardizer
        model.router.fit_task(t, router_features(feats))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _python_reference(model: MoLEFlowModel, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    dists = model.router.distances(router_features(feats), TASKS)
    best, tasks = dists.min(dim=1)
    _, scores, pixels, _ = score_maps(model.nll_routed(feats, tasks), 3, IMAGE, 1.0)
    return {"task": tasks, "routing_distance": best, "score": scores, "anomaly_map": pixels}


def _head(
    model: MoLEFlowModel, score_thresholds: list[float] | None = None, route_thresholds: list[float] | None = None
) -> ExportableMoLEFlow:
    """The exported pipeline on features (the backbone replaced by the identity)."""
    pipeline = RoutedPipeline(nn.Identity(), model, IMAGE, score_top_k=3, pixel_sigma=1.0, every_task=True)
    return ExportableMoLEFlow(pipeline, score_thresholds or [0.0] * 3, route_thresholds or [1e9] * 3).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_traced_head_matches_python_model(variant: str) -> None:
    model = _trained_like(VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    example = _features(1, 2, gen)  # one task only: the others see empty batches while tracing
    batch = torch.cat([_features(t, 2, gen) for t in (2, 0, 1, 2)])  # another batch size, every task present
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_head(model), example, strict=False, check_trace=False)
        got = traced(batch)
        ref = _python_reference(model, batch)
    assert sorted(set(ref["task"].tolist())) == [0, 1, 2]
    assert torch.equal(got["task"], ref["task"])
    torch.testing.assert_close(got["routing_distance"], ref["routing_distance"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["score"], ref["score"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["anomaly_map"], ref["anomaly_map"], rtol=1e-4, atol=1e-3)
    assert got["is_defective"].all() and not got["is_unknown"].any()  # thresholds 0 and 1e9
    one = traced(batch[2:3])  # a batch of one image, of a task absent from the example
    assert torch.equal(one["task"], ref["task"][2:3])
    torch.testing.assert_close(one["score"], ref["score"][2:3], rtol=1e-4, atol=1e-3)


def test_torch_export_program_matches_python_model() -> None:
    model = _trained_like({"dia_blocks": 1, "standardize": "position"})
    gen = torch.Generator().manual_seed(2)
    example = torch.cat([_features(t, 1, gen) for t in range(TASKS)])
    batch = torch.cat([_features(t, 2, gen) for t in range(TASKS)])
    head = _head(model)
    with torch.no_grad():
        head(example)  # fills the positional-code cache, as write_export does
    dim = torch.export.Dim("batch", min=1)
    program = torch.export.export(head, (example,), dynamic_shapes={"images": {0: dim}})
    got = program.module()(batch)
    ref = _python_reference(model, batch)
    assert torch.equal(got["task"], ref["task"])
    torch.testing.assert_close(got["score"], ref["score"], rtol=1e-4, atol=1e-3)


def test_unknown_and_defective_follow_thresholds() -> None:
    model = _trained_like({})
    gen = torch.Generator().manual_seed(3)
    feats = torch.cat([_features(t, 1, gen) for t in range(TASKS)])
    far = 40.0 + feats[:1]  # far from every prototype
    ref = _python_reference(model, feats)
    score_thr = [float(ref["score"][0]) + 1.0, float(ref["score"][1]) - 1.0, float(ref["score"][2]) + 1.0]
    route_thr = [float(ref["routing_distance"].max()) * 2] * 3
    head = _head(model, score_thr, route_thr)
    with torch.no_grad():
        out = head(torch.cat([feats, far]))
    assert out["is_defective"].tolist() == [False, True, False, False]
    assert out["is_unknown"].tolist() == [False, False, False, True]


def test_export_needs_the_every_task_pipeline() -> None:
    model = _trained_like({})
    with pytest.raises(ExportError, match="every_task"):
        ExportableMoLEFlow(RoutedPipeline(nn.Identity(), model, IMAGE, 3, 1.0), [0.0] * 3, [1e9] * 3)


def test_routed_nll_every_task_equals_per_distinct_task() -> None:
    """The traceable dispatch (every task, possibly empty batches) computes the eager dispatch's values."""
    model = _trained_like({"standardize": "channel", "dia_blocks": 1})
    gen = torch.Generator().manual_seed(4)
    feats = torch.cat([_features(t, 2, gen) for t in (1, 1, 0)])
    tasks = torch.tensor([1, 1, 1, 1, 0, 0])
    torch.testing.assert_close(model.nll_routed(feats, tasks, every_task=True), model.nll_routed(feats, tasks))
    assert model.nll(feats[:0], 2)[0].shape == (0, *GRID)  # an empty batch runs through every layer


def test_per_image_sanitize_matches_evaluation_per_image() -> None:
    x = torch.randn(4, 3, 3)
    x[0, 0, 0] = float("nan")
    x[1, 1, 1] = float("inf")
    x[1, 2, 2] = float("-inf")
    x[2] = float("nan")
    clean, replaced = sanitize_per_image(x)
    for b in range(4):
        ref, n = sanitize_nonfinite(x[b : b + 1])
        assert torch.equal(clean[b : b + 1], ref) and int(replaced[b]) == n


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_detector_exports_with_the_quality_switches(fmt: str, tmp_path) -> None:
    """pool_concat embedding, per-position standardizer, no adapter: exported end to end, parity-checked."""
    from omegaconf import OmegaConf

    from moleflow.assembly.builders import build_extractor
    from moleflow.inference import MoLEFlowDetector, load_exported
    from tests.helpers import CONF_DIR

    backbone = OmegaConf.load(CONF_DIR / "model" / "backbone" / "tiny_random.yaml")
    backbone.embedding = "pool_concat"
    torch.manual_seed(0)
    extractor = build_extractor(backbone, 384).eval()  # pool_concat: D = 128 + 256 channels
    model = MoLEFlowModel(
        MoLEFlowConfig(embed_dim=384, ncl=1, hidden=32, lora_rank=2, standardize="position", adapter="none")
    )
    gen = torch.Generator().manual_seed(5)
    images = [torch.randn(4, 3, 32, 32, generator=gen) + 2.0 * t for t in range(2)]  # two "categories"
    with torch.no_grad():
        for t, batch in enumerate(images):
            model.add_task()
            feats = extractor(batch)
            model.fit_task_statistics(t, feats)
            model.router.fit_task(t, router_features(feats))
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    detector = MoLEFlowDetector(extractor, model.eval(), ["a", "b"], image_size=32, score_top_k=2, pixel_sigma=1.0)
    probe = torch.cat([images[0][:2], images[1][:1]])
    module, meta = load_exported(detector.export(tmp_path / f"model.{fmt}", format=fmt, check_images=probe))
    assert meta["format"] == fmt
    batch = torch.cat([images[1][1:], images[0][2:]])
    with torch.no_grad():
        got, ref = module(batch), detector.run_batch(batch)
    assert set(ref["task"].tolist()) == {0, 1} and torch.equal(got["task"], ref["task"])
    torch.testing.assert_close(got["score"], ref["score"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["anomaly_map"], ref["anomaly_map"], rtol=1e-4, atol=1e-3)
