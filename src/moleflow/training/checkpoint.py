"""Checkpoints after each task, in Lightning's format, written atomically.

The file holds ``state_dict`` and ``hyper_parameters`` (so ``MoLEFlowLitModule.load_from_checkpoint``
works), plus a ``moleflow`` section with the task names and the results so far. It is written to a
temporary file, flushed to disk and renamed, so a kill while saving never leaves a broken checkpoint
behind (and a failed save removes its temporary file). Reading a truncated, corrupt or foreign file
raises :class:`CheckpointError` naming the path, never a bare pickle/zip/torch error.

Every checkpoint carries a content hash (:mod:`moleflow.utils.integrity`) that both readers verify: a file
changed after it was written (one flipped byte inside a tensor loads without error in ``torch.load``) is
refused with :class:`CheckpointIntegrityError`. A checkpoint of an older moleflow, without a hash, loads
with one warning.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from moleflow.training.lightning_module import VERIFIED_MARK, MoLEFlowLitModule
from moleflow.utils.files import atomic_write, unique_temporary
from moleflow.utils.integrity import IntegrityError, stamp, verify

# What torch.load / Lightning raise on a broken or foreign file: zip errors (RuntimeError, BadZipFile,
# OSError "Invalid argument" on a cut file), pickle errors on non-zip data, and Key/Index/Type/Attribute
# errors when a loadable object is not a checkpoint dict; Import errors for classes that no longer exist.
_READ_ERRORS = (
    RuntimeError,
    EOFError,
    OSError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ImportError,
)
_NOT_A_CHECKPOINT = (
    "it is truncated (killed while being copied?), corrupt, or not a checkpoint written by moleflow. "
    "Use another checkpoint of the run (checkpoints/task_XX_<name>.ckpt) or start a new run."
)


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read; the message names the file and what to do."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint's content does not match the hash stored in it (changed or damaged after writing)."""


def save_checkpoint(path: str | Path, module: MoLEFlowLitModule, extra: dict[str, Any] | None = None) -> Path:
    """Save ``module`` (all tasks so far) to ``path`` atomically, with its content hash."""
    path = Path(path)
    checkpoint: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": pl.__version__,
    }
    module.on_save_checkpoint(checkpoint)
    checkpoint["moleflow"].update(extra or {})
    write_checkpoint(checkpoint, path)
    return path


def write_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Stamp ``checkpoint`` with its content hash and write it to ``path`` atomically (old file kept on failure)."""
    checkpoint.pop(VERIFIED_MARK, None)  # a mark of the reader, never written
    stamp(checkpoint)
    with atomic_write(path) as f:  # the rename never exposes a file whose bytes are not on disk yet
        torch.save(checkpoint, f)
    return Path(path)


def link_checkpoint(source: str | Path, link: str | Path) -> Path:
    """Point ``link`` (e.g. last.ckpt) at ``source`` atomically: a hard link, or a copy where links fail."""
    source, link = Path(source), Path(link)
    tmp = unique_temporary(link)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)  # ``link`` still points at the previous checkpoint
        raise
    return link


def _check_readable(path: Path) -> None:
    """Reject a missing file, or one that is not a complete zip archive (what torch.save writes)."""
    if not path.is_file():
        msg = f"Checkpoint {path} does not exist (or is not a file); give the path of a .ckpt file."
        raise FileNotFoundError(msg)
    if not zipfile.is_zipfile(path):  # also catches a cut-off file: its zip directory is at the end
        msg = f"Cannot read checkpoint {path} ({path.stat().st_size} bytes): {_NOT_A_CHECKPOINT}"
        raise CheckpointError(msg)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The whole checkpoint dict of a moleflow checkpoint, its content hash verified.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, corrupt or foreign file.
        CheckpointIntegrityError: the content does not match its hash.
        ValueError: a torch file that is not a moleflow checkpoint.
    """
    path = Path(path)
    _check_readable(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except _READ_ERRORS as err:
        msg = f"Cannot read checkpoint {path} ({type(err).__name__}: {err}): {_NOT_A_CHECKPOINT}"
        raise CheckpointError(msg) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("moleflow"), dict):
        msg = (
            f"{path} is not a moleflow checkpoint (no 'moleflow' section): it was not written by moleflow's "
            "save_checkpoint; give a checkpoints/*.ckpt file of a moleflow run."
        )
        raise ValueError(msg)
    try:
        verify(checkpoint, path)
    except IntegrityError as err:
        raise CheckpointIntegrityError(str(err)) from None
    checkpoint[VERIFIED_MARK] = True  # in memory only: on_load_checkpoint need not hash it again
    return checkpoint


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The ``moleflow`` section of a checkpoint (task names, run config, results so far), hash verified."""
    return read_checkpoint(path)["moleflow"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> MoLEFlowLitModule:
    """Rebuild the module with every task's experts and router prototypes from a checkpoint file."""
    path = Path(path)
    try:
        checkpoint = read_checkpoint(path)
    except ValueError as err:  # a loadable torch file that is no moleflow checkpoint
        raise CheckpointError(str(err)) from err
    try:
        module = MoLEFlowLitModule(**dict(checkpoint["hyper_parameters"]))
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
        module = module.to(map_location)
    except torch.cuda.OutOfMemoryError:
        raise  # the file is fine: the device is full (map_location="cpu" avoids it)
    except _READ_ERRORS as err:
        msg = f"Cannot load checkpoint {path} ({type(err).__name__}: {err}): {_NOT_A_CHECKPOINT}"
        raise CheckpointError(msg) from err
    module.eval()
    return module
