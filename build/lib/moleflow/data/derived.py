"""Files a reader derives from a data set (rasterised masks, cut tiles), kept beside it and keyed by settings.

Some data sets need files the project writes itself: BSData's masks are polygons, PIPED's masks mark the
impurity in black, CrackForest has no normal images until tiles are cut from it. Such files live in

    ROOT/.moleflow_derived/<reader>-<key>/      (with index.json: what was written, and from what)

where the key hashes the reader's version, its settings and the names and sizes of the input files, so that
two runs with different settings write two folders and never delete each other's files, and changed inputs
give a new folder instead of stale files. A folder is built in a temporary folder beside it and renamed into
place only when complete (``os.replace``): a killed run leaves a ``.<name>.tmp-*`` folder that is never
read, so a folder that exists is trusted and reused. When ROOT cannot be written, the folders go to
``$XDG_CACHE_HOME/moleflow/derived/<hash of ROOT>/`` (``~/.cache`` by default), with a warning saying where.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

DERIVED_DIR = ".moleflow_derived"
INDEX = "index.json"


def settings_key(reader: str, version: int, settings: Mapping[str, Any]) -> str:
    """Short hash of what the derived files depend on: the reader, its version and its settings."""
    text = json.dumps({"reader": reader, "version": version, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def input_fingerprint(root: Path, files: Iterable[Path]) -> str:
    """Hash of the inputs' paths (relative to root) and sizes: cheap, and changes when a file is added or edited."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def cache_base(root: Path) -> Path:
    """Where derived folders go when ROOT is read-only: a per-root folder of the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(str(root.resolve()).encode("utf-8")).hexdigest()[:12]
    return cache / "moleflow" / "derived" / tag


def _make_temp(base: Path, name: str) -> Path | None:
    """A fresh temporary folder in ``base`` (created if needed), or None when base cannot be written."""
    try:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
    except OSError:
        return None


def derived_folder(
    root: Path,
    reader: str,
    version: int,
    settings: Mapping[str, Any],
    build: Callable[[Path], Any],
) -> tuple[Path, Any]:
    """The folder of derived files for these settings, and the index ``build`` returned when it wrote them.

    An existing folder (under ROOT, else in the cache) is reused. Otherwise ``build(folder)`` writes the files
    into an empty temporary folder and returns a JSON-able index of them, which is stored in index.json; the
    folder is then renamed into place. A build that fails or is interrupted leaves nothing that is trusted.

    Raises:
        OSError: Neither ROOT nor the cache folder can be written.
    """
    root = Path(root)
    name = f"{reader}-{settings_key(reader, version, settings)}"
    bases = [root / DERIVED_DIR, cache_base(root)]
    for base in bases:
        index_file = base / name / INDEX
        if index_file.is_file():
            return base / name, json.loads(index_file.read_text(encoding="utf-8"))["items"]
    tmp = _make_temp(bases[0], name)
    if tmp is None:
        tmp = _make_temp(bases[1], name)
        if tmp is None:
            msg = (
                f"Cannot write derived files of {reader} under {bases[0]} nor under {bases[1]}: make one of them "
                "writable (or set XDG_CACHE_HOME to a writable folder)."
            )
            raise OSError(msg)
        warnings.warn(
            f"{root} is not writable: the files {reader} derives from it go to {bases[1]}.", UserWarning, stacklevel=3
        )
    final = tmp.parent / name
    try:
        items = build(tmp)
        record = {"reader": reader, "version": version, "settings": dict(settings), "items": items}
        (tmp / INDEX).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / INDEX).is_file():  # not a concurrent run that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            items = json.loads((final / INDEX).read_text(encoding="utf-8"))["items"]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, items
