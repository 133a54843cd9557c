"""Only necessary work: the backbone runs once per image with the cache, and the cache changes nothing else."""

from __future__ import annotations

import json

import torch

from tests.helpers import TINY_OVERRIDES, compose_config

EPOCHS = 2


def _run(tmp_path, synthetic_root, extra: list[str]):
    from train import train

    overrides = [
        *TINY_OVERRIDES,
        f"data.root={synthetic_root}",
        "data.generate=null",
        "data.categories=[stripes,dots]",
        f"training.epochs={EPOCHS}",
    ]
    train(compose_config([*overrides, *extra], tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    return metrics, ckpt["moleflow"]["loss_history"]


def test_cache_runs_backbone_once_per_image_and_changes_no_loss(tmp_path, synthetic_root) -> None:
    cached, cached_losses = _run(tmp_path / "cache", synthetic_root, ["training.feature_cache=memory"])
    fresh, fresh_losses = _run(tmp_path / "none", synthetic_root, ["training.feature_cache=none"])
    n_train, n_test = 12, 12  # per category of the generated tree
    # cache: every distinct image once (train and test of both tasks)
    assert cached["work"]["backbone_images"] == 2 * n_train + 2 * n_test
    # reference pipeline: training images every epoch, test images at every evaluation round (1 + 2 test sets)
    assert fresh["work"]["backbone_images"] == 2 * EPOCHS * n_train + 3 * n_test
    assert cached_losses == fresh_losses  # bit-identical training losses
    assert all(len(v) > 0 for v in cached_losses.values())
    for key in ("final", "per_task", "matrices", "routing"):
        assert cached[key] == fresh[key]


def test_bf16_inference_stays_close_to_fp32(tmp_path, synthetic_root) -> None:
    """runtime.amp=bf16 (backbone and flow inference) moves metrics by at most 0.05 AUROC on a tiny run."""
    fp32, _ = _run(tmp_path / "fp32", synthetic_root, [])
    bf16, _ = _run(tmp_path / "bf16", synthetic_root, ["runtime.amp=bf16", "runtime.channels_last=true"])
    for metric in ("image_auroc", "pixel_auroc"):
        assert abs(fp32["final"]["routed"][metric] - bf16["final"]["routed"][metric]) <= 0.05
    assert bf16["routing"]["accuracy"] == fp32["routing"]["accuracy"]
