"""Files that several processes may share: atomic writes and inter-process locks.

A parallel multirun (``hydra/launcher=joblib``, SLURM arrays on a shared disk) runs several jobs that
may create the same file at the same moment: the generated data set, the packaged-weights cache, a
shared feature cache. Two rules keep them safe:

- every file is written under a name no other process uses (pid + random token), flushed to disk and
  renamed into place, so a reader sees the old file or the whole new one, never half of one;
- work that must happen once (generating a data set) runs under an exclusive :func:`file_lock`; the
  second process waits, then finds the work done.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

try:  # POSIX; on other systems the lock falls back to an exclusive-create lock file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def unique_temporary(path: str | Path) -> Path:
    """A hidden sibling of ``path`` that no other process or thread will pick: ``.name.<pid>.<token>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a unique temporary file for writing; on success fsync it and rename it onto ``path``.

    On any error (or interruption) the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temporary(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the rename must never expose a file whose bytes are not on disk yet
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float = 3600.0) -> Iterator[Path]:
    """Hold an exclusive inter-process lock on ``path`` (created if missing) for the ``with`` block.

    Uses ``fcntl.flock``, which the kernel releases when the holder dies, so a killed job never leaves
    a stale lock behind. Raises TimeoutError naming the lock file after ``timeout_s`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    if fcntl is None:  # pragma: no cover - exclusive-create fallback (a crash can leave the file behind)
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    msg = f"Timed out after {timeout_s:.0f} s waiting for lock {path}; remove it if no job holds it."
                    raise TimeoutError(msg) from None
                time.sleep(0.1)
        try:
            yield path
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"Timed out after {timeout_s:.0f} s waiting for lock {path} (held by another job)."
                    raise TimeoutError(msg) from None
                time.sleep(0.05)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """Replace inf/NaN floats by None, recursively, so the result is standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
