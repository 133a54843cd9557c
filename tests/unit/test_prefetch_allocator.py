"""Threaded decoding, prefetching, and the allocator setting of the entry points."""

from __future__ import annotations

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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists on glibc only")
def test_keep_freed_memory_applies_on_glibc() -> None:
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    x = torch.randn(4096, 2048)  # 32 MB: above glibc's largest mmap threshold
    assert torch.equal((x * 2) / 2, x)


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
