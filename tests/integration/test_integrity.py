"""Checkpoint integrity: a content hash written with every checkpoint and calibrated copy, verified on every read."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from moleflow.assembly.checkpoint_files import (
    CheckpointIntegrityError,
    MissingIntegrityRecordError,
    read_checkpoint_info,
)
from moleflow.assembly.integrity import content_hash
from moleflow.inference import MoLEFlowDetector
from moleflow.thresholds.records import calibrated_path
from moleflow.training.lightning_module import MoLEFlowLitModule
from moleflow.training.module_checkpoints import load_checkpoint
from tests.helpers import TINY_OVERRIDES, compose_config, flip_tensor_byte


@pytest.fixture
def ckpt(tiny_run, tmp_path: Path) -> Path:
    _, run_dir, _ = tiny_run
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", target)
    return target


def test_checkpoint_carries_a_hash_of_its_content(ckpt: Path) -> None:
    raw = torch.load(ckpt, weights_only=False)
    stored = raw["moleflow"]["integrity"]
    assert stored["algorithm"] == "sha256" and stored["content"] == content_hash(raw)
    assert read_checkpoint_info(ckpt)["task_names"] == ["stripes", "checker", "dots"]


def test_one_flipped_byte_inside_a_tensor_is_refused(ckpt: Path, tiny_run) -> None:
    before = torch.load(ckpt, weights_only=False)["state_dict"]
    flip_tensor_byte(ckpt)
    after = torch.load(ckpt, weights_only=False)["state_dict"]  # torch itself loads it without a word
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1, changed
    for read in (read_checkpoint_info, load_checkpoint, MoLEFlowDetector.load):
        with pytest.raises(CheckpointIntegrityError, match="does not match its content hash") as err:
            read(ckpt)
        assert str(ckpt) in str(err.value), read.__name__
    with pytest.raises(CheckpointIntegrityError, match="content hash"):  # Lightning's loader goes through ours
        MoLEFlowLitModule.load_from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="weights_only=True only"):
        MoLEFlowLitModule.load_from_checkpoint(ckpt, weights_only=False)

    cfg, _, _ = tiny_run
    from train import train

    overrides = [*TINY_OVERRIDES, f"data.root={cfg.data.root}", "data.generate=null", f"resume={ckpt}"]
    with pytest.raises(CheckpointIntegrityError, match="does not match"):
        train(compose_config(overrides, ckpt.parent.parent / "resumed"))


def test_changed_metadata_is_refused(ckpt: Path) -> None:
    raw = torch.load(ckpt, weights_only=False)
    raw["moleflow"]["tracker"]["matrices"]["routed"]["image_auroc"][0][0] = 0.99  # a doctored result
    torch.save(raw, ckpt)
    with pytest.raises(CheckpointIntegrityError, match=str(ckpt)):
        read_checkpoint_info(ckpt)


def test_checkpoint_without_a_hash_is_refused_unless_allowed(ckpt: Path, caplog) -> None:
    raw = torch.load(ckpt, weights_only=True)
    del raw["moleflow"]["integrity"]  # as written by an older moleflow
    torch.save(raw, ckpt)
    for read in (read_checkpoint_info, load_checkpoint, MoLEFlowDetector.load, MoLEFlowLitModule.load_from_checkpoint):
        with pytest.raises(MissingIntegrityRecordError, match="no integrity record") as err:
            read(ckpt)
        assert str(ckpt) in str(err.value) and "convert_checkpoint" in str(err.value), read.__name__
    with caplog.at_level(logging.WARNING):
        assert read_checkpoint_info(ckpt, allow_unverified=True)["task_names"] == ["stripes", "checker", "dots"]
        assert load_checkpoint(ckpt, allow_unverified=True).task_names == ["stripes", "checker", "dots"]
        detector = MoLEFlowDetector.load(ckpt, auto_calibrate=False, allow_unverified=True)
        assert detector.task_names == ["stripes", "checker", "dots"]
    warnings = [r.getMessage() for r in caplog.records if "no integrity record" in r.getMessage()]
    assert len(warnings) == 1 and str(ckpt) in warnings[0]


def test_calibrated_copy_carries_its_own_hash(ckpt: Path) -> None:
    detector = MoLEFlowDetector.load(ckpt, save_calibration=True)
    copy = calibrated_path(ckpt)
    raw = torch.load(copy, weights_only=False)
    assert raw["moleflow"]["integrity"]["content"] == content_hash(raw)
    assert MoLEFlowDetector.load(copy, auto_calibrate=False).thresholds == detector.thresholds
    flip_tensor_byte(copy)
    with pytest.raises(CheckpointIntegrityError, match=str(copy)):
        MoLEFlowDetector.load(copy, auto_calibrate=False)
