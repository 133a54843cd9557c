"""A checkpoint from elsewhere runs no code: not while it is read, not while anything is rebuilt from it.

Two crafted files, each tried at every entry point that reads a checkpoint (predict, eval, predict's export
mode, resume, the detector API, Lightning's ``load_from_checkpoint``):

* a pickle payload: an object whose unpickling calls ``open(MARKER, "w")`` (creates a file);
* a real checkpoint whose stored config names a function with a side effect (``builtins.open(VICTIM, "w")``,
  which truncates VICTIM), nested in the backbone's settings or as the schedule's own ``_target_``,
  re-stamped with moleflow's own integrity record (whoever crafts a file can write a matching hash).

Each must be refused and the side effect must not happen.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from moleflow.assembly.checkpoint_files import (
    ChecksumMismatchError,
    MissingIntegrityRecordError,
    UnsafeCheckpointError,
    read_checkpoint,
    read_checkpoint_info,
)
from moleflow.assembly.convert_checkpoint import ConversionError, convert
from moleflow.assembly.integrity import file_sha256, stamp
from moleflow.inference import MoLEFlowDetector
from moleflow.inference.runner import run_from_config
from moleflow.training.lightning_module import MoLEFlowLitModule
from tests.helpers import TINY_OVERRIDES, compose_config

PRECIOUS = "a file the user can write, which must keep its content"


class _OpenOnUnpickle:
    """Unpickling this calls ``open(path, "w")``: the payload of the crafted pickle file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return open, (self.path, "w")


@pytest.fixture
def ckpt(tiny_run, tmp_path: Path) -> Path:
    """A copy of the tiny run's last checkpoint (a real, current moleflow checkpoint)."""
    _, run_dir, _ = tiny_run
    target = tmp_path / "run" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", target)
    return target


def _pickle_payload(path: Path, marker: Path) -> None:
    torch.save({"moleflow": {"task_names": ["x"]}, "state_dict": {}, "payload": _OpenOnUnpickle(marker)}, path)


def _crafted_config(path: Path, victim: Path, where: str) -> None:
    """Make ``path``'s stored config call ``open(victim, "w")`` when built, and re-stamp its integrity record."""
    raw = torch.load(path, weights_only=True)
    call = {"_target_": "builtins.open", "_args_": [str(victim), "w"]}
    if where == "nested":
        raw["moleflow"]["run_config"]["model"]["backbone"]["weights"] = call
    elif where == "scheduler":
        raw["hyper_parameters"]["scheduler"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
        raw["moleflow"]["run_config"]["model"]["scheduler"] = dict(raw["hyper_parameters"]["scheduler"])
    else:  # the data module's own target
        raw["moleflow"]["run_config"]["data"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    stamp(raw)
    torch.save(raw, path)


def _entry_points(tiny_run, synthetic_root: Path, out: Path) -> dict[str, Callable[[Path], object]]:
    """Every way a user hands moleflow a checkpoint, as a call on the checkpoint's path."""
    from eval import evaluate
    from train import train

    cfg, _, _ = tiny_run
    images = synthetic_root / "stripes" / "test" / "good"

    def predict(path: Path) -> object:
        pred_cfg = compose_config([f"ckpt={path}", f"input={images}"], out / "predict", config_name="predict")
        return run_from_config(pred_cfg, out / "predict")

    def export(path: Path) -> object:
        exp_cfg = compose_config(["mode=export", f"ckpt={path}"], out / "export", config_name="predict")
        return run_from_config(exp_cfg, out / "export")

    def eval_(path: Path) -> object:
        spec = {"ckpt_path": str(path), "score_top_k": [3], "data_root": None, "pixel_sigma": None, "device": "cpu"}
        return evaluate(OmegaConf.create({**spec, "paths": {"output_dir": str(out / "eval")}}))

    def resume(path: Path) -> object:
        overrides = [*TINY_OVERRIDES, f"data.root={cfg.data.root}", "data.generate=null", f"resume={path}"]
        return train(compose_config(overrides, out / "resumed"))

    return {
        "predict": predict,
        "export": export,
        "eval": eval_,
        "resume": resume,
        "detector": lambda path: MoLEFlowDetector.load(path, auto_calibrate=False),
        "load_from_checkpoint": MoLEFlowLitModule.load_from_checkpoint,
    }


ENTRY_POINTS = ["predict", "export", "eval", "resume", "detector", "load_from_checkpoint"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_pickle_payload_is_refused_without_running(entry: str, tiny_run, synthetic_root: Path, tmp_path) -> None:
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "marker"
    _pickle_payload(evil, marker)
    assert torch.load(evil, weights_only=False) is not None and marker.exists()  # the payload is real...
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="objects other than tensors and plain data") as err:
        _entry_points(tiny_run, synthetic_root, tmp_path)[entry](evil)
    assert not marker.exists(), "unpickling ran the payload"  # ...and moleflow never runs it
    assert "convert_checkpoint" in str(err.value)


@pytest.mark.parametrize("where", ["nested", "scheduler", "data"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_stored_target_with_a_side_effect_is_refused_before_building(
    entry: str, where: str, ckpt: Path, tiny_run, synthetic_root: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    _crafted_config(ckpt, victim, where)
    with pytest.raises(UnsafeCheckpointError, match="builtins.open") as err:
        _entry_points(tiny_run, synthetic_root, tmp_path)[entry](ckpt)
    assert victim.read_text() == PRECIOUS, "a stored _target_ was called"
    assert str(ckpt) in str(err.value)


def test_a_current_checkpoint_round_trips(ckpt: Path, tiny_run) -> None:
    _, _, payload = tiny_run
    sha = file_sha256(ckpt)
    detector = MoLEFlowDetector.load(ckpt, auto_calibrate=False, expected_sha256=sha.upper())
    assert detector.task_names == payload["tasks"]
    module = MoLEFlowLitModule.load_from_checkpoint(ckpt, expected_sha256=sha)
    original = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in original.items())


def test_a_wrong_expected_sha256_is_refused_before_reading(ckpt: Path, synthetic_root, tmp_path) -> None:
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError, match=f"not the expected {wrong}"):
        MoLEFlowDetector.load(ckpt, auto_calibrate=False, expected_sha256=wrong)
    with pytest.raises(ChecksumMismatchError, match="not the expected"):
        MoLEFlowLitModule.load_from_checkpoint(ckpt, expected_sha256=wrong)
    with pytest.raises(ChecksumMismatchError, match="not the expected"):
        read_checkpoint(ckpt, expected_sha256=wrong)
    pred_cfg = compose_config(
        [f"ckpt={ckpt}", f"input={synthetic_root}", f"ckpt_sha256={wrong}"], tmp_path / "p", config_name="predict"
    )
    with pytest.raises(ChecksumMismatchError):
        run_from_config(pred_cfg, tmp_path / "p")
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        read_checkpoint(ckpt, expected_sha256="abc")


def test_a_checkpoint_without_its_integrity_record_is_refused(ckpt: Path, tiny_run, synthetic_root, tmp_path) -> None:
    raw = torch.load(ckpt, weights_only=True)
    del raw["moleflow"]["integrity"]
    torch.save(raw, ckpt)
    for call in _entry_points(tiny_run, synthetic_root, tmp_path).values():  # every entry point refuses it
        with pytest.raises(MissingIntegrityRecordError, match="no integrity record"):
            call(ckpt)
    pred_cfg = compose_config(
        [f"ckpt={ckpt}", "mode=export", "allow_unverified=true"], tmp_path / "e", config_name="predict"
    )
    assert Path(run_from_config(pred_cfg, tmp_path / "e")["exported"]).is_file()  # the explicit setting says so


def test_convert_writes_a_checked_copy_of_a_trusted_old_file(ckpt: Path, tmp_path: Path) -> None:
    raw = torch.load(ckpt, weights_only=True)
    del raw["moleflow"]["integrity"]  # an older moleflow: no record, and Python objects in its results
    raw["moleflow"]["summary_extra"] = {"auroc": np.float64(0.75), "where": Path("/data/run")}
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(old)
    with pytest.raises(ConversionError, match="--trust"):
        convert(old, tmp_path / "new.ckpt", trust=False)
    new = convert(old, tmp_path / "new.ckpt", trust=True)
    info = read_checkpoint_info(new)
    assert info["summary_extra"] == {"auroc": 0.75, "where": "/data/run"}
    assert MoLEFlowLitModule.load_from_checkpoint(new).task_names == ["stripes", "checker", "dots"]
    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    _crafted_config(ckpt, victim, "nested")
    with pytest.raises(UnsafeCheckpointError):  # trusting a file does not make its stored code trusted
        convert(ckpt, tmp_path / "crafted_copy.ckpt", trust=True)
    assert victim.read_text() == PRECIOUS and not (tmp_path / "crafted_copy.ckpt").exists()
