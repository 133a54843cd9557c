"""Loggers (CSV, W&B offline) receive per-task keys; the disk feature cache gives the same features."""

from __future__ import annotations

import torch

from moleflow.assembly.builders import build_datamodule
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.training.feature_cache import FeatureCache
from tests.helpers import TINY_OVERRIDES, compose_config


def _one_task(tmp_path, synthetic_root, logger: str):
    from train import train

    overrides = [
        *TINY_OVERRIDES,
        f"logger={logger}",
        f"data.root={synthetic_root}",
        "data.generate=null",
        "data.categories=[stripes]",
    ]
    cfg = compose_config(overrides, tmp_path)
    return train(cfg)


def test_csv_logger_gets_per_task_metric_keys(tmp_path, synthetic_root) -> None:
    _one_task(tmp_path, synthetic_root, "csv")
    files = list(tmp_path.glob("csv/**/metrics.csv"))
    assert files
    header = files[0].read_text().splitlines()[0]
    assert "task/stripes/image_auroc" in header and "task/stripes/train_loss_epoch" in header


def test_wandb_logs_offline_and_finishes(tmp_path, synthetic_root, monkeypatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _one_task(tmp_path, synthetic_root, "wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert wandb.run is None  # finished, so a next multirun job starts a new run


def test_disk_cache_matches_memory_cache(tmp_path, synthetic_root) -> None:
    from omegaconf import OmegaConf

    data = OmegaConf.create(
        {
            "root": str(synthetic_root),
            "categories": ["stripes"],
            "image_size": 64,
            "train_batch_size": 4,
            "eval_batch_size": 8,
            "num_workers": 0,
            "generate": None,
        }
    )
    dm = build_datamodule(data)
    dm.set_task(0)
    extractor = FeatureExtractor("resnet10t", ("layer2", "layer3"), embed_dim=16, pretrained=False)
    memory = FeatureCache(extractor, torch.device("cpu"), mode="memory")
    disk = FeatureCache(extractor, torch.device("cpu"), mode="disk", directory=tmp_path, fingerprint={"a": 1})
    a = memory.get("t/test", lambda: dm.test_dataloader_for(0), with_masks=True)
    b = disk.get("t/test", lambda: dm.test_dataloader_for(0), with_masks=True)
    reopened = FeatureCache(extractor, torch.device("cpu"), mode="disk", directory=tmp_path, fingerprint={"a": 1})
    c = reopened.get("t/test", lambda: dm.test_dataloader_for(0), with_masks=True)
    assert reopened.extractions == 0  # served from the files, no backbone run
    for fs in (b, c):
        assert torch.equal(fs.features, a.features) and torch.equal(fs.masks, a.masks)
        assert torch.equal(fs.labels, a.labels)
    # the cache reuses features: a second request runs no backbone
    memory.get("t/test", lambda: dm.test_dataloader_for(0), with_masks=True)
    assert memory.extractions == 1


def _data(root) -> object:
    from omegaconf import OmegaConf

    cfg = {"root": str(root), "categories": ["stripes"], "image_size": 64, "train_batch_size": 4}
    dm = build_datamodule(OmegaConf.create({**cfg, "eval_batch_size": 8, "num_workers": 0, "generate": None}))
    dm.set_task(0)
    return dm


def test_disk_cache_is_keyed_on_content(tmp_path, synthetic_root) -> None:
    """A shared cache folder never serves features of other images, another data root or other weights."""
    import os
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "stripes", root / "stripes")
    cache_dir = tmp_path / "cache"
    extractor = FeatureExtractor("resnet10t", ("layer2", "layer3"), embed_dim=16, pretrained=False)

    def get(extractor, root) -> tuple[FeatureCache, torch.Tensor]:
        dm = _data(root)
        cache = FeatureCache(extractor, torch.device("cpu"), mode="disk", directory=cache_dir, fingerprint={"a": 1})
        return cache, cache.get("00_stripes/train", dm.train_dataloader, with_masks=False).features.clone()

    first, before = get(extractor, root)
    again, same = get(extractor, root)
    assert (first.extractions, again.extractions) == (1, 0) and torch.equal(before, same)

    image = sorted((root / "stripes" / "train" / "good").glob("*.png"))[3]
    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    Image.fromarray(255 - pixels).save(image)  # same name, new content
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse file system may keep the mtime
    changed, after = get(extractor, root)
    assert changed.extractions == 1, "a changed image must be extracted again"
    assert not torch.equal(after[3], before[3]) and torch.equal(after[:3], before[:3])

    moved = tmp_path / "copy_of_data"
    shutil.copytree(root, moved)
    other_root, _ = get(extractor, moved)
    assert other_root.extractions == 1  # another data root: never served from the first root's files

    other_weights = FeatureExtractor("resnet10t", ("layer2", "layer3"), embed_dim=16, pretrained=False)
    with torch.no_grad():
        next(other_weights.parameters()).mul_(1.5)  # e.g. a fine-tuned backbone saved under the same name
    reweighted, _ = get(other_weights, root)
    assert reweighted.extractions == 1  # same backbone name and config, other weights


def test_a_multirun_is_one_wandb_group_with_task_ablation_and_experiment_tags(tmp_path) -> None:
    """A plain `-m ncl=4,6,8` gets a group of its own (task name + the multirun's start time); a single run keeps
    the task name; tables keep their table's group; tags name the task, ablation row and experiment."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    single = compose_config(["logger=wandb"], tmp_path / "single")
    assert single.group == "train" and single.logger.wandb.group == "train"

    def as_multirun(overrides: list[str], sweep: str) -> dict:
        """The job's W&B logger settings, resolved while Hydra's runtime is this multirun's."""
        cfg = compose_config(overrides, tmp_path / "job")
        with read_write(cfg.hydra), open_dict(cfg):
            cfg.hydra.mode = RunMode.MULTIRUN
            cfg.hydra.sweep.dir = str(tmp_path / "multiruns" / sweep)
        HydraConfig().set_config(cfg)
        return OmegaConf.to_container(cfg.logger.wandb, resolve=True)

    sweep = as_multirun(["logger=wandb", "ncl=4"], "2026-12-05_10-00-00_000001")
    assert sweep["group"] == "train-2026-12-05_10-00-00_000001"
    again = as_multirun(["logger=wandb", "ncl=8"], "2026-12-05_10-00-00_000001")
    assert again["group"] == sweep["group"]  # every job of one sweep: one group
    other = as_multirun(["logger=wandb", "ncl=6"], "2026-12-05_11-30-00_000002")
    assert other["group"] != sweep["group"]  # two sweeps, two dashboards
    table = as_multirun(["logger=wandb", "experiment=table1_core_ablation", "+ablation=no_lora"], "x")
    assert table["group"] == "table1_core_ablation"
    assert table["tags"] == ["task:table1_core_ablation", "ablation:no_lora", "experiment:table1_core_ablation"]
