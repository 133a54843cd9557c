"""One-off conversion of a checkpoint the user trusts into one that today's moleflow reads.

    python -m moleflow.assembly.convert_checkpoint OLD.ckpt NEW.ckpt --trust

moleflow reads checkpoints with ``torch.load(weights_only=True)`` and refuses files without an integrity
record, so that a file from elsewhere cannot run code or pass as undamaged. A checkpoint written by an older
moleflow may hold Python objects (numpy scalars, paths, Lightning's ``AttributeDict``) or lack the record.
This command reads such a file **with pickle** (only because the user states with ``--trust`` that they made
it or trust its source), turns its content into tensors and plain containers, refuses it if its stored config
names code moleflow does not build from files, stamps an integrity record and writes NEW atomically. NEW
then loads everywhere; OLD is left as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from moleflow.assembly.checkpoint_files import check_trusted, read_checkpoint, write_checkpoint
from moleflow.assembly.integrity import KEY, SECTION, IntegrityError, file_sha256, verify

log = logging.getLogger(__name__)


class ConversionError(ValueError):
    """The file cannot be turned into a plain moleflow checkpoint; the message says why."""


def plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` as tensors, numbers, strings, None and plain dicts/lists only (what weights_only reads)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, DictConfig | ListConfig):
        return plain(OmegaConf.to_container(value, resolve=True), where)
    if isinstance(value, Mapping):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value), where)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    msg = f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which has no plain-data form."
    raise ConversionError(msg)


def convert(source: str | Path, target: str | Path, trust: bool) -> Path:
    """Write a checked, plain copy of the trusted checkpoint ``source`` to ``target``; returns ``target``.

    Raises:
        ConversionError: ``trust`` is False, the paths are the same, the file is not a moleflow checkpoint,
            its content was changed after it was written, or it holds something without a plain form.
        UnsafeCheckpointError: its stored config names code moleflow does not build from files.
    """
    source, target = Path(source), Path(target)
    if not trust:
        msg = (
            f"Converting {source} reads it with pickle, which runs any code stored in it. Pass --trust only for a "
            "file you made yourself or whose source you trust."
        )
        raise ConversionError(msg)
    if source.resolve() == target.resolve():
        msg = f"Write the converted copy to a new file, not over {source} (the original stays as it is)."
        raise ConversionError(msg)
    raw = torch.load(source, map_location="cpu", weights_only=False)  # the user vouched for this file
    if not isinstance(raw, Mapping) or not isinstance(raw.get(SECTION), Mapping):
        msg = f"{source} is not a moleflow checkpoint (no '{SECTION}' section); nothing to convert."
        raise ConversionError(msg)
    checkpoint = plain(raw)
    if checkpoint[SECTION].get(KEY) is not None:
        try:
            verify(checkpoint, source)
        except IntegrityError as err:
            msg = f"{err} A damaged file is not converted."
            raise ConversionError(msg) from None
    check_trusted(checkpoint, source)
    write_checkpoint(checkpoint, target)
    read_checkpoint(target)  # the copy reads back the way every entry point reads it
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the checkpoint you trust")
    parser.add_argument("target", type=Path, help="the new file to write")
    parser.add_argument("--trust", action="store_true", help="I made this file or trust its source (it is unpickled)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.target, args.trust)
    except ConversionError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"Wrote {written} (SHA-256 {file_sha256(written)}): plain data with an integrity record.")


if __name__ == "__main__":
    main()
