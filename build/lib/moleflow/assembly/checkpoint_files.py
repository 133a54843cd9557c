"""Checkpoint files: written atomically with an integrity record, read without running any code.

A checkpoint is a ``torch.save`` zip of tensors and plain containers: ``state_dict``, ``hyper_parameters``
and a ``moleflow`` section (task names, results so far, the run's config, thresholds). It is written to a
temporary file, flushed to disk and renamed, so a kill while saving never leaves a broken checkpoint behind
(and a failed save removes its temporary file). Reading a truncated, corrupt or foreign file raises
:class:`CheckpointError` naming the path, never a bare pickle/zip/torch error.

Every checkpoint carries a content hash (:mod:`moleflow.assembly.integrity`) that :func:`read_checkpoint`
verifies: a file changed after it was written (one flipped byte inside a tensor loads without error in
``torch.load``) is refused with :class:`CheckpointIntegrityError`, and so is a file without one unless the
caller passes ``allow_unverified`` (a checkpoint of an older moleflow; :mod:`moleflow.assembly.convert_checkpoint`
writes a checked copy of a file the user trusts).

A checkpoint may come from elsewhere, so reading one runs no code: ``torch.load(weights_only=True)`` (tensors
and plain containers only, which is all moleflow writes), an optional SHA-256 of the file published by its
maker checked before anything is read, and every ``_target_`` of the stored config checked against moleflow's
own classes (:mod:`moleflow.assembly.trusted_targets`) before the reader returns. Nothing here knows Lightning:
:mod:`moleflow.training.module_checkpoints` turns a checked dict into the training module.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from moleflow.assembly.integrity import IntegrityError, MissingIntegrityError, file_sha256, stamp, verify
from moleflow.assembly.trusted_targets import UntrustedTargetError, check_stored_config, check_stored_entry
from moleflow.utils.files import atomic_write, unique_temporary

VERIFIED_MARK = "_moleflow_hash_verified"  # set in memory by read_checkpoint once the file was checked

# What torch.load / Lightning raise on a broken or foreign file: zip errors (RuntimeError, BadZipFile,
# OSError "Invalid argument" on a cut file), pickle errors on non-zip data, and Key/Index/Type/Attribute
# errors when a loadable object is not a checkpoint dict; Import errors for classes that no longer exist.
READ_ERRORS = (
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
NOT_A_CHECKPOINT = (
    "it is truncated (killed while being copied?), corrupt, or not a checkpoint written by moleflow. "
    "Use another checkpoint of the run (checkpoints/task_XX_<name>.ckpt) or start a new run."
)


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read; the message names the file and what to do."""


class NotAMoleflowCheckpointError(CheckpointError, ValueError):
    """A readable torch file that moleflow did not write (no ``moleflow`` section)."""


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint's content does not match the hash stored in it (changed or damaged after writing)."""


class MissingIntegrityRecordError(CheckpointIntegrityError):
    """A checkpoint has no integrity record and the caller did not allow unverified files."""


class UnsafeCheckpointError(CheckpointError):
    """A file holds Python objects other than tensors and plain data, or a stored config names untrusted code."""


class ChecksumMismatchError(CheckpointError):
    """The file's SHA-256 differs from the one its maker published (``expected_sha256``)."""


CONVERT_COMMAND = "python -m moleflow.assembly.convert_checkpoint"


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
        msg = f"Cannot read checkpoint {path} ({path.stat().st_size} bytes): {NOT_A_CHECKPOINT}"
        raise CheckpointError(msg)


def check_file_sha256(path: Path, expected: str | None) -> None:
    """Compare the file's SHA-256 with the one its maker published; nothing of the file is interpreted first.

    Raises:
        ValueError: ``expected`` is not 64 hexadecimal digits.
        ChecksumMismatchError: the file's hash differs.
    """
    if expected is None:
        return
    wanted = str(expected).strip().lower()
    if len(wanted) != 64 or any(c not in "0123456789abcdef" for c in wanted):
        msg = f"The expected SHA-256 must be 64 hexadecimal digits (as sha256sum prints it), got {expected!r}."
        raise ValueError(msg)
    actual = file_sha256(path)
    if actual != wanted:
        msg = (
            f"{path} has SHA-256 {actual}, not the expected {wanted}: it is not the file its maker published "
            "(changed, damaged or replaced). Refusing it; get the file again from its source."
        )
        raise ChecksumMismatchError(msg)


def read_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    expected_sha256: str | None = None,
    allow_unverified: bool = False,
) -> dict[str, Any]:
    """The whole checkpoint dict of a moleflow checkpoint, checked before anything is built from it.

    In order: the file exists and is a complete zip; its SHA-256 equals ``expected_sha256`` (when given);
    ``torch.load(weights_only=True)`` reads it (no code runs); it is a moleflow checkpoint; its integrity
    record is present (unless ``allow_unverified``) and matches; every ``_target_`` its stored config and
    hyper-parameters would build is trusted.

    Raises:
        FileNotFoundError: no such file.
        ChecksumMismatchError: the file is not the one whose SHA-256 was given.
        UnsafeCheckpointError: it holds objects other than tensors and plain data, or its stored config names
            code moleflow does not build from files.
        CheckpointError: truncated, corrupt or foreign file.
        CheckpointIntegrityError: the content does not match its hash, or there is none (not allowed).
        NotAMoleflowCheckpointError: a torch file that is not a moleflow checkpoint.
    """
    path = Path(path)
    _check_readable(path)
    check_file_sha256(path, expected_sha256)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower() and "weights_only" not in str(err).lower():
            msg = f"Cannot read checkpoint {path} ({type(err).__name__}: {err}): {NOT_A_CHECKPOINT}"
            raise CheckpointError(msg) from err
        msg = (
            f"{path} holds Python objects other than tensors and plain data, which moleflow never writes; reading "
            "them would run code chosen by whoever made the file, so it was not read. If you made the file yourself "
            f"with an older moleflow and trust it, write a checked copy: {CONVERT_COMMAND} {path} NEW.ckpt --trust"
        )
        raise UnsafeCheckpointError(msg) from None
    except READ_ERRORS as err:
        msg = f"Cannot read checkpoint {path} ({type(err).__name__}: {err}): {NOT_A_CHECKPOINT}"
        raise CheckpointError(msg) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("moleflow"), dict):
        msg = (
            f"{path} is not a moleflow checkpoint (no 'moleflow' section): it was not written by moleflow's "
            "save_checkpoint; give a checkpoints/*.ckpt file of a moleflow run."
        )
        raise NotAMoleflowCheckpointError(msg)
    try:
        verify(checkpoint, path, allow_unverified=allow_unverified)
    except MissingIntegrityError as err:
        raise MissingIntegrityRecordError(str(err)) from None
    except IntegrityError as err:
        raise CheckpointIntegrityError(str(err)) from None
    check_trusted(checkpoint, path)
    checkpoint[VERIFIED_MARK] = True  # in memory only: on_load_checkpoint need not hash it again
    return checkpoint


def check_trusted(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose stored config or hyper-parameters would build code moleflow does not trust."""
    source = f"Checkpoint {path}"
    try:
        check_stored_config(checkpoint["moleflow"].get("run_config"), source)
        hparams = checkpoint.get("hyper_parameters") or {}
        if not isinstance(hparams, dict):
            msg = f"{source}: its hyper_parameters are a {type(hparams).__name__}, not a mapping."
            raise UntrustedTargetError(msg)
        for group in ("optimizer", "scheduler"):
            check_stored_entry(hparams.get(group), f"model.{group}", source)
    except UntrustedTargetError as err:
        raise UnsafeCheckpointError(str(err)) from None


def read_checkpoint_info(
    path: str | Path, *, expected_sha256: str | None = None, allow_unverified: bool = False
) -> dict[str, Any]:
    """The ``moleflow`` section of a checkpoint (task names, run config, results so far), checked as above."""
    return read_checkpoint(path, expected_sha256=expected_sha256, allow_unverified=allow_unverified)["moleflow"]
