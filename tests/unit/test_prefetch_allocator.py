"""Threaded decoding, prefetching, and the allocator setting of the entry points."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

import pytest
import torch

from moleflow.utils.allocator import keep_freed_memory
from moleflow.utils.prefetch import map_threads, prefetch


def test_map_threads_keeps_order_and_raises_the_first_error() -> None:
    assert map_threads(lambda x: x * x, range(20), threads=4) == [x * x for x in range(20)]
    assert map_threads(lambda x: x, [], threads=4) == []

    def fail_on_odd(x: int) -> int:
        if x % 2:
            msg = f"bad {x}"
            raise ValueError(msg)
        return x

    with pytest.raises(ValueError, match="bad 1"):
        map_threads(fail_on_odd, range(6), threads=3)


def test_prefetch_loads_the_next_item_while_the_caller_works() -> None:
    """While the caller holds item k, item k + 1 is loaded (checked with events, not timing)."""
    loaded = {i: threading.Event() for i in range(4)}

    def load(i: int) -> int:
        loaded[i].set()
        return 10 * i

    seen = []
    for item, value in prefetch(range(4), load):
        seen.append((item, value))
        if item + 1 < 4:
            assert loaded[item + 1].wait(timeout=30), f"item {item + 1} was not loaded ahead"
    assert seen == [(i, 10 * i) for i in range(4)]
    assert list(prefetch([], load)) == []


def test_prefetch_raises_a_load_error_at_its_item() -> None:
    def load(i: int) -> int:
        if i == 2:
            msg = "unreadable"
            raise OSError(msg)
        return i

    got = []
    with pytest.raises(OSError, match="unreadable"):
        for item, _ in prefetch(range(5), load):
            got.append(item)
    assert got == [0, 1]


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33): what malloc holds, and how."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists on glibc only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap_and_keeps_them() -> None:
    """After the call a 64 MB tensor is not a fresh mmap (hblkhd, mapped bytes, stays put), and freeing it
    keeps its memory in malloc's heap (fordblks, free heap bytes, grows) instead of returning it."""
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    mapped_before = _mallinfo().hblkhd
    x = torch.empty(16 * 1024 * 1024, dtype=torch.float32).fill_(1.0)  # 64 MB, far above the mmap threshold
    assert _mallinfo().hblkhd - mapped_before < 1024 * 1024, "the tensor was mmapped: the setting is not applied"
    del x
    assert _mallinfo().fordblks >= 64 * 1024 * 1024, "freed memory was returned to the system, not kept"


def test_overlap_only_where_cores_are_left_for_decoding() -> None:
    from moleflow.utils.prefetch import decode_threads, overlap_pays_off

    assert overlap_pays_off("cuda")  # the model runs on the GPU: the CPU is free to decode
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(decode_threads())  # torch on every core: decode threads would compete
        assert not overlap_pays_off("cpu")
        torch.set_num_threads(1)
        assert overlap_pays_off("cpu") == (decode_threads() > 1)
    finally:
        torch.set_num_threads(threads)
