"""training.photometric_copies in a continual run: the copies of the images a task learns from, and only those,
join its training features and statistics; the switch changes the model and keeps earlier tasks bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moleflow.assembly.builders import build_datamodule, build_extractor
from moleflow.data.photometric import copy_rows
from moleflow.evaluation.evaluate import EvaluationSpec, evaluate_task
from moleflow.training.continual import begin_task, extract_train_features, open_run
from moleflow.training.feature_cache import FeatureCache, extract_features
from moleflow.training.module_checkpoints import load_checkpoint
from tests.helpers import TINY_OVERRIDES, compose_config

COPIES = ["training.photometric_copies=2", "training.photometric_brightness=0.05", "training.photometric_noise=0.02"]


def _overrides(root: Path, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"data.root={root}", "data.generate=null", "data.categories=[stripes,dots]", *extra]


def test_copies_of_the_kept_images_join_the_statistics(tmp_path: Path, synthetic_root: Path) -> None:
    from moleflow.config.typed import job_settings

    extra = [*COPIES, "training.calibration_share=0.25", "model.flow.standardize=position"]
    cfg = job_settings(compose_config(_overrides(synthetic_root, *extra), tmp_path / "run"))
    run = open_run(cfg, tmp_path / "run", None)
    task = begin_task(run, 0)
    extract_train_features(run, task)
    n, kept = len(task.train_set), task.kept
    assert "photometric_copies_s" in task.times  # its own time (absent without copies)
    assert len(task.held) == 3 and task.copies.shape == (2 * len(kept), *task.train_set.features.shape[1:])

    loader = run.dm.photometric_copies_dataloader(2, 0.05, 0.02, seed=cfg.seed)
    direct = extract_features(run.extractor, loader, run.device, "copies", with_masks=False).features
    assert torch.equal(task.copies, direct[copy_rows(n, 2, kept)])  # the held-out images' copies left out
    assert not torch.allclose(task.copies[: len(kept)], task.train_set.features[kept])

    learned = torch.cat([task.train_set.features[kept], task.copies])
    standardizer = run.module.model.standardizers["0"]
    torch.testing.assert_close(standardizer.mean, learned.mean(dim=0))
    assert not torch.allclose(standardizer.mean, task.train_set.features[kept].mean(dim=0))


def test_copies_change_the_model_and_keep_forgetting_zero(tmp_path: Path, synthetic_root: Path) -> None:
    from train import train

    score_cfg = EvaluationSpec(top_k=3, pixel_sigma=4.0, image_size=64, batch_size=16)
    runs = {}
    for name, extra in (("plain", []), ("copies", COPIES)):
        cfg = compose_config(_overrides(synthetic_root, *extra, "report.figures=false"), tmp_path / name)
        assert train(cfg)["status"] == "finished"
        runs[name] = cfg
    ckpts = tmp_path / "copies" / "checkpoints"
    after_0 = load_checkpoint(ckpts / "task_00_stripes.ckpt").model
    after_1 = load_checkpoint(ckpts / "last.ckpt").model
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "task_00_stripes.ckpt").model
    changed = [k for k, v in after_0.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed  # trained on other features: the flow's weights differ

    cfg = runs["copies"]
    dm = build_datamodule(cfg.data)
    dm.set_task(0)
    cache = FeatureCache(build_extractor(cfg.model.backbone, int(cfg.model.flow.embed_dim)), torch.device("cpu"))
    test = cache.get("test0", lambda: dm.test_dataloader_for(0), with_masks=True)
    ev0 = evaluate_task(after_0, test, 0, "stripes", 1, score_cfg, torch.device("cpu"))
    ev1 = evaluate_task(after_1, test, 0, "stripes", 2, score_cfg, torch.device("cpu"))
    assert torch.equal(ev0.oracle_image_scores, ev1.oracle_image_scores)  # task 1's copies left task 0 alone
    assert torch.equal(ev0.oracle_pixel_maps, ev1.oracle_pixel_maps)


def test_copies_of_unchanged_images_are_refused_before_anything_is_built(tmp_path: Path) -> None:
    from moleflow.config.checks import validate_config

    unchanged = ["training.photometric_copies=1", "training.photometric_brightness=0", "training.photometric_noise=0"]
    with pytest.raises(ValueError, match=r"photometric_copies=1 with photometric_brightness=0 .* would add copies"):
        validate_config(compose_config([*TINY_OVERRIDES, *unchanged], tmp_path))
