"""Timing, peak memory and the machine description every figure is reported with."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.models.experts import TaskExpertLinear
from moleflow.models.moleflow import MoLEFlowModel


# ------------------------------------------------------------------------------------------ timing, memory
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _stats(times: list[float]) -> dict[str, Any]:
    return {"best_s": min(times), "median_s": statistics.median(times), "runs_s": times}


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """Best and median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    return _stats([_timed(fn, device) for _ in range(max(1, repeats))])


def time_pair(
    fa: Callable[[], Any], fb: Callable[[], Any], device: torch.device, repeats: int, warmup: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time two alternatives interleaved (a, b, a, b, ...): a change in machine load then hits both alike."""
    for _ in range(warmup):
        fa()
        fb()
    sync(device)
    ta, tb = [], []
    for _ in range(max(1, repeats)):
        ta.append(_timed(fa, device))
        tb.append(_timed(fb, device))
    return _stats(ta), _stats(tb)


@contextlib.contextmanager
def unmerged(model: MoLEFlowModel) -> Iterator[None]:
    """Inside ``merged_experts``: run the unmerged path for a moment, keeping the folded weights for later."""
    layers = [m for m in model.modules() if isinstance(m, TaskExpertLinear)]
    saved = [layer.merged for layer in layers]
    for layer in layers:
        layer.merged = None
    try:
        yield
    finally:
        for layer, merged in zip(layers, saved, strict=True):
            layer.merged = merged


def status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so each section gets its own peak; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ru_maxrss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class MemoryTracker:
    """Peak RSS per section (VmHWM after a reset; cumulative ru_maxrss where the reset is not allowed) and GPU peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_section_reset = reset_peak_rss() and status_kb("VmHWM") is not None
        self.sections: dict[str, dict[str, float | None]] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.per_section_reset:
            reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = status_kb("VmRSS")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak = status_kb("VmHWM") if self.per_section_reset else None
            wall = time.perf_counter() - t0
            print(f"[bench] {name}: {wall:.1f} s", file=sys.stderr, flush=True)
            self.sections[name] = {
                "wall_s": wall,
                "start_rss_mb": start / 1024 if start is not None else None,
                "peak_rss_mb": peak / 1024 if peak is not None else ru_maxrss_mb(),
                "gpu_peak_allocated_mb": (
                    torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
                ),
            }


# --------------------------------------------------------------------------------------------- 1. machine
def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    import timm

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": ram,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "dtype": "float32 (flow, backbone, matmul ceiling)"
        + ("; bfloat16 figures marked as such" if device.type == "cuda" else ""),
        "gpu": None,
        "gpu_memory_gb": None,
        "load_average_start": loadavg(),  # other work on the machine slows every figure down
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info
