"""Optimizer, schedule and callbacks are built from ``_target_`` entries: a new one is a YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, RichModelSummary, RichProgressBar
from omegaconf import OmegaConf
from timm.optim import AdamP

from moleflow.training.optim import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER, build_optimizer, lr_factor
from moleflow.training.trainer_parts import build_callbacks, build_module
from tests.helpers import TINY_OVERRIDES, compose_config


class _Trainer:
    max_epochs = 5


def _optimizer_and_schedule(cfg, tasks: int = 1) -> tuple[torch.optim.Optimizer, object]:
    module = build_module(cfg.model)
    for t in range(tasks):
        module.start_task(f"t{t}")
    module._trainer = _Trainer()  # configure_optimizers reads max_epochs only
    out = module.configure_optimizers()
    return out["optimizer"], out["lr_scheduler"]["scheduler"]


def test_default_optimizer_is_the_methods_adamp_and_a_yaml_file_selects_another(tmp_path: Path) -> None:
    opt, _ = _optimizer_and_schedule(compose_config(TINY_OVERRIDES, tmp_path))
    assert type(opt) is AdamP
    assert opt.defaults["lr"] == pytest.approx(3e-4) and opt.defaults["weight_decay"] == pytest.approx(0.01)

    cfg = compose_config([*TINY_OVERRIDES, "model/optimizer=adamw", "model.optimizer.lr=1e-3"], tmp_path)
    opt, _ = _optimizer_and_schedule(cfg)
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == pytest.approx(1e-3)


def test_any_optimizer_class_can_be_named_in_the_config(tmp_path: Path) -> None:
    cfg = compose_config([*TINY_OVERRIDES, "model.optimizer._target_=torch.optim.SGD"], tmp_path)
    opt, _ = _optimizer_and_schedule(cfg)
    assert type(opt) is torch.optim.SGD and opt.defaults["weight_decay"] == pytest.approx(0.01)


def test_a_bad_target_names_the_key() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"model\.optimizer\._target_='torch\.optim\.NoSuchThing' cannot be built"):
        build_optimizer(params, {**DEFAULT_OPTIMIZER, "_target_": "torch.optim.NoSuchThing"})
    with pytest.raises(ValueError, match=r"model\.optimizer needs a _target_"):
        build_optimizer(params, {"lr": 1e-3})
    with pytest.raises(ValueError, match=r"built a list, not an optimizer"):
        build_optimizer(params, {"_target_": "builtins.list"})


def test_schedule_from_config_is_the_methods_warmup_cosine(tmp_path: Path) -> None:
    cfg = compose_config(TINY_OVERRIDES, tmp_path)
    _, first = _optimizer_and_schedule(cfg, tasks=1)
    _, later = _optimizer_and_schedule(cfg, tasks=2)
    assert [first.lr_lambdas[0](e) for e in range(5)] == [lr_factor(e, 5, 0, 0.01) for e in range(5)]
    assert [later.lr_lambdas[0](e) for e in range(5)] == [lr_factor(e, 5, 2, 0.01) for e in range(5)]
    assert later.lr_lambdas[0](0) == pytest.approx(0.5)

    cfg = compose_config([*TINY_OVERRIDES, "model.scheduler.warmup_epochs=0"], tmp_path)
    _, later = _optimizer_and_schedule(cfg, tasks=2)
    assert later.lr_lambdas[0](0) == pytest.approx(1.0)


def test_adapt_lr_scale_scales_only_the_tasks_that_adapt_the_shared_flow(tmp_path: Path) -> None:
    cfg = compose_config([*TINY_OVERRIDES, "model.scheduler.adapt_lr_scale=3"], tmp_path)
    _, first = _optimizer_and_schedule(cfg, tasks=1)
    _, later = _optimizer_and_schedule(cfg, tasks=2)
    assert [first.lr_lambdas[0](e) for e in range(5)] == [lr_factor(e, 5, 0, 0.01) for e in range(5)]
    assert [later.lr_lambdas[0](e) for e in range(5)] == pytest.approx([3 * lr_factor(e, 5, 2, 0.01) for e in range(5)])
    separated = compose_config(
        [*TINY_OVERRIDES, "+ablation=complete_separated", "model.scheduler.adapt_lr_scale=3"], tmp_path
    )
    _, fresh = _optimizer_and_schedule(separated, tasks=2)  # a separated flow starts fresh: not adapting
    assert [fresh.lr_lambdas[0](e) for e in range(5)] == [lr_factor(e, 5, 0, 0.01) for e in range(5)]
    with pytest.raises(ValueError, match=r"adapt_lr_scale must be > 0"):
        _optimizer_and_schedule(
            compose_config([*TINY_OVERRIDES, "model.scheduler.adapt_lr_scale=0"], tmp_path), tasks=2
        )


def test_step_budget_warms_up_for_warmup_epochs_worth_of_steps() -> None:
    from moleflow.training.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, DEFAULT_SCHEDULER, total=300, units_per_epoch=12, warm_up=True)
    assert [sched.lr_lambdas[0](s) for s in (0, 23, 24, 299)] == [lr_factor(s, 300, 24, 0.01) for s in (0, 23, 24, 299)]


def test_callbacks_come_from_the_config_and_null_switches_one_off(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=generated_quick"], tmp_path)
    first = build_callbacks(cfg.callbacks, first_task=True)
    assert [type(c) for c in first] == [RichProgressBar, RichModelSummary]
    assert [type(c) for c in build_callbacks(cfg.callbacks, first_task=False)] == [RichProgressBar]

    cfg = compose_config(
        [
            "experiment=generated_quick",
            "callbacks.model_summary=null",
            "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
            "+callbacks.lr_monitor.logging_interval=step",
        ],
        tmp_path,
    )
    built = build_callbacks(cfg.callbacks, first_task=True)
    assert [type(c) for c in built] == [RichProgressBar, LearningRateMonitor]
    assert built[1].logging_interval == "step"


def test_a_callback_entry_without_target_is_refused(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=generated_quick", "+callbacks.oops.leave=true"], tmp_path)
    with pytest.raises(ValueError, match=r"callbacks\.oops must be a mapping with a _target_"):
        build_callbacks(cfg.callbacks, first_task=True)


def test_data_and_backbone_are_built_from_their_targets(tmp_path: Path) -> None:
    from moleflow.assembly.builders import build_datamodule, build_extractor
    from moleflow.data.datamodule import ContinualDataModule
    from moleflow.models.feature_extractor import FeatureExtractor

    cfg = compose_config([*TINY_OVERRIDES, "data.categories=[stripes]"], tmp_path, data_dir=tmp_path / "data")
    assert cfg.data._target_ == "moleflow.data.datamodule.ContinualDataModule"
    dm = build_datamodule(cfg.data)  # prepare_data writes the generated tree first
    assert type(dm) is ContinualDataModule and dm.task_names == ["stripes"]
    assert (dm.root / "stripes" / "train" / "good").is_dir() and dm.root.parent == Path(cfg.data.root)
    extractor = build_extractor(cfg.model.backbone, 32)
    assert type(extractor) is FeatureExtractor and extractor.embed_dim == 32

    # a run config saved before the groups named a _target_ still builds (predict on older checkpoints)
    legacy = {k: v for k, v in OmegaConf.to_container(cfg.model.backbone, resolve=True).items() if k != "_target_"}
    assert type(build_extractor(legacy, 32)) is FeatureExtractor

    with pytest.raises(TypeError, match=r"data\._target_ built a Linear, not a ContinualDataModule"):
        build_datamodule({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2})
    with pytest.raises(TypeError, match=r"model\.backbone\._target_ built a Identity, not a FeatureExtractor"):
        build_extractor({"_target_": "torch.nn.Identity"}, 2)
