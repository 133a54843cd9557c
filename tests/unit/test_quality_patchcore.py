"""The PatchCore baseline of `make quality`: same coreset as anomalib's, our weights in anomalib's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("anomalib")

from experiments.comparison.patchcore import (  # noqa: E402
    PatchCoreSettings,
    build_patchcore,
    coreset_indices,
    run_patchcore_task,
)
from moleflow.data import ContinualDataModule  # noqa: E402
from moleflow.models.feature_extractor import create_backbone  # noqa: E402

TINY = {"name": "resnet10t", "layers": ["layer2", "layer3"], "pretrained": False, "weights": None}


@pytest.mark.parametrize("ratio", [0.01, 0.05])
def test_buffered_sampler_selects_anomalibs_indices(ratio: float) -> None:
    embedding = torch.randn(4000, 24, generator=torch.Generator().manual_seed(1))
    ours = coreset_indices(embedding, PatchCoreSettings(coreset_ratio=ratio, sampler="buffered", seed=3))
    theirs = coreset_indices(embedding, PatchCoreSettings(coreset_ratio=ratio, sampler="anomalib", seed=3))
    assert ours == theirs and len(ours) == int(4000 * ratio) and len(set(ours)) == len(ours)
    other_seed = coreset_indices(embedding, PatchCoreSettings(coreset_ratio=ratio, sampler="buffered", seed=4))
    assert other_seed != ours


def test_patchcore_uses_our_backbone_weights() -> None:
    model = build_patchcore(TINY, PatchCoreSettings())
    ours = create_backbone(TINY["name"], TINY["layers"], pretrained=False)
    theirs = model.feature_extractor.feature_extractor.state_dict()
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items())


def test_patchcore_task_on_generated_data(synthetic_root: Path) -> None:
    dm = ContinualDataModule(synthetic_root, ["stripes", "dots"], image_size=64, eval_batch_size=8)
    result = run_patchcore_task(dm, 1, TINY, PatchCoreSettings(coreset_ratio=0.05), torch.device("cpu"))
    assert result["task"] == "dots" and result["pixel_metrics_available"]
    assert result["memory_bank"][0] == 12 * 8 * 8 and result["memory_bank"][1] == int(12 * 64 * 0.05)
    metrics = result["metrics"]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))
