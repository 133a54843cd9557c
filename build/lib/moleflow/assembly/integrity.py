"""Content hashes of checkpoints, so that a changed byte is caught when a file is read, not hours later.

``torch.load`` does not check the zip's CRCs: a checkpoint with one flipped byte inside a tensor loads
without a word (router precisions silently changed). Every checkpoint moleflow writes therefore carries
a SHA-256 of what it holds, in ``checkpoint["moleflow"]["integrity"]``, and every reader verifies it.

The hash covers the model (``state_dict``: each tensor's name, dtype, shape and raw bytes), the
``hyper_parameters`` and the ``moleflow`` section (task names, results so far, run config, calibration),
in a canonical order that does not depend on dict insertion order or on the device a tensor was
mapped to. Lightning's own keys (its version, which its loader may migrate) are left out.

The stored hash catches damage, not malice: whoever crafts a file can write a matching hash. Against a file
from elsewhere, moleflow reads checkpoints with ``torch.load(weights_only=True)`` (no code runs while
reading), builds nothing a stored config names unless it is trusted (:mod:`moleflow.assembly.trusted_targets`),
and compares the file's own SHA-256 (:func:`file_sha256`) with one published by whoever made it, when given.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

SECTION = "moleflow"
KEY = "integrity"  # in checkpoint["moleflow"]
ALGORITHM = "sha256"
FORMAT_VERSION = 1
HASHED_KEYS = ("state_dict", "hyper_parameters", SECTION)
_warned_unhashed: set[str] = set()


class IntegrityError(RuntimeError):
    """A checkpoint's content does not match the hash stored in it: the file was changed or damaged."""


class MissingIntegrityError(IntegrityError):
    """A checkpoint has no integrity record (an older moleflow, or a file not written by moleflow)."""


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes (what ``sha256sum`` prints): to compare with a hash its maker published."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Add ``value`` to ``digest`` in a canonical, type-tagged form (tensors by their bytes)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        digest.update(f"A{a.dtype.str}{a.shape}|".encode())
        digest.update(memoryview(a.view(np.uint8).reshape(-1)))
    elif isinstance(value, Mapping):
        items = sorted(((str(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        digest.update(f"D{len(items)}|".encode())
        for key, item in items:
            digest.update(f"{len(key)}:{key}".encode())
            _feed(digest, item)
    elif isinstance(value, list | tuple):
        digest.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    elif isinstance(value, float):
        text = repr(value) if math.isfinite(value) else str(value)  # repr is exact; nan/inf spelled one way
        digest.update(f"F{text}|".encode())
    elif value is None or isinstance(value, bool | int | str):
        digest.update(f"{type(value).__name__[0]}{len(str(value))}:{value}|".encode())
    elif isinstance(value, Path):
        _feed(digest, str(value))
    else:  # anything else moleflow does not write; its repr is stable for the plain types that remain
        digest.update(f"O{type(value).__qualname__}:{value!r}|".encode())


def value_hash(value: Any) -> str:
    """SHA-256 of any nest of dicts, lists, scalars and tensors (e.g. a state dict), order-independent for dicts."""
    digest = hashlib.new(ALGORITHM)
    _feed(digest, value)
    return digest.hexdigest()


def content_hash(checkpoint: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's model, hyper-parameters and moleflow section (without the stored hash)."""
    digest = hashlib.new(ALGORITHM)
    for key in HASHED_KEYS:
        value = checkpoint.get(key)
        if key == SECTION and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k != KEY}
        digest.update(f"{key}=".encode())
        _feed(digest, value)
    return digest.hexdigest()


def stamp(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Store the content hash in ``checkpoint["moleflow"]["integrity"]`` (call last, right before saving)."""
    section = checkpoint.setdefault(SECTION, {})
    section.pop(KEY, None)
    section[KEY] = {"algorithm": ALGORITHM, "content": content_hash(checkpoint), "version": FORMAT_VERSION}
    return checkpoint


def verify(checkpoint: Mapping[str, Any], source: str | Path, allow_unverified: bool = False) -> bool:
    """Check the stored content hash; True if it matches.

    A checkpoint without a record is refused unless ``allow_unverified`` (then False, with one warning per
    file): an unhashed file cannot be told apart from a changed one.

    Raises:
        MissingIntegrityError: there is no record and ``allow_unverified`` is False.
        IntegrityError: the content differs from the hash, naming ``source``.
    """
    section = checkpoint.get(SECTION)
    stored = section.get(KEY) if isinstance(section, Mapping) else None
    if stored is None:
        if not allow_unverified:
            msg = (
                f"Checkpoint {source} has no integrity record (written by a moleflow older than 'Reliability, round "
                "2', or not by moleflow), so a changed or damaged file cannot be detected. Refusing it. If you trust "
                "the file, either load it once with allow_unverified=true (predict/eval/resume setting, or "
                "MoLEFlowDetector.load(..., allow_unverified=True)), or write a checked copy with: python -m "
                f"moleflow.assembly.convert_checkpoint {source} NEW.ckpt --trust"
            )
            raise MissingIntegrityError(msg)
        if str(source) not in _warned_unhashed:
            _warned_unhashed.add(str(source))
            log.warning(
                "Checkpoint %s has no integrity record: its integrity cannot be checked. Loaded anyway "
                "(allow_unverified=true); re-save it with moleflow.assembly.convert_checkpoint to add one.",
                source,
            )
        return False
    if not isinstance(stored, Mapping) or stored.get("algorithm") != ALGORITHM or "content" not in stored:
        msg = f"Checkpoint {source} has an unreadable integrity record {stored!r}; it was changed or damaged."
        raise IntegrityError(msg)
    actual = content_hash(checkpoint)
    if actual != stored["content"]:
        msg = (
            f"Checkpoint {source} does not match its content hash (stored {stored['content'][:16]}..., "
            f"content {actual[:16]}...): the file was changed or damaged after it was written. Refusing it; use "
            "another checkpoint of the run (checkpoints/task_XX_<name>.ckpt) or a backup copy."
        )
        raise IntegrityError(msg)
    return True
