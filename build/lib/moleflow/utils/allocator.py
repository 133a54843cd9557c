"""Keep freed tensor memory in the process on Linux/glibc instead of mapping it afresh for each tensor.

Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
unmaps it on free, so each new (12544, 768) float32 activation of a batch of 16 (38.5 MB) is
page-faulted in again, page by page. Measured on a 2-core Xeon: a multiply into a new (12544, 768)
tensor took 14 ms this way and 3.3 ms with the memory kept (``make bench`` shows the effect on a
whole training step). PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for the same reason;
these two ``mallopt`` settings get most of it with nothing to install. The cost: memory freed by
tensors is reused by the process rather than returned to the system (up to ``keep_bytes`` is kept).
CUDA tensors are not affected (PyTorch caches GPU memory itself).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_applied = False


def keep_freed_memory(keep_bytes: int = _INT_MAX) -> bool:
    """Serve large tensors from malloc's heap and keep up to ``keep_bytes`` of freed memory; True if applied.

    A no-op (False) on anything but Linux with glibc. Process-wide, so it is called by the entry
    points (train, eval, predict, the benchmark), never on import.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not libc.gnu_get_libc_version:  # glibc only: musl has mallopt as a stub
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    keep = max(0, min(int(keep_bytes), _INT_MAX))
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, keep) == 1
    if ok:
        _applied = True
        log.debug("glibc malloc: no per-tensor mmap, up to %d bytes of freed memory kept", keep)
    return ok
