"""Parameters, checkpoint size, and the pixel metrics' time and memory at MVTec size."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark.flop import expected_parameter_counts
from experiments.benchmark.measure import reset_peak_rss, status_kb
from experiments.benchmark.settings import MVTEC_TEST, PIXEL_BOUND_BYTES, PIXEL_BOUND_PIXELS, PIXEL_SIGMA, BenchSettings
from moleflow.config.flow import MoLEFlowConfig
from moleflow.evaluation.anomaly_map import pixel_anomaly_map
from moleflow.evaluation.metrics import binary_auroc_ap
from moleflow.training.lightning_module import MoLEFlowLitModule


# ------------------------------------------------------------------------------- 6. parameters, checkpoint
def bench_parameters_checkpoint(s: BenchSettings, module: MoLEFlowLitModule, scratch: Path) -> dict[str, Any]:
    """Parameter counts (measured and computed from shapes) and the size of the saved checkpoint."""
    counts = module.model.parameter_counts()
    expected = expected_parameter_counts(module.model.config, s.tasks)
    expected_main = expected_parameter_counts(MoLEFlowConfig(), len(MVTEC_TEST))
    path = scratch / f"bench_{s.tasks}_tasks.ckpt"
    how = "moleflow.training.module_checkpoints.save_checkpoint(MoLEFlowLitModule)"
    error = None
    t0 = time.perf_counter()
    try:
        from moleflow.training.module_checkpoints import save_checkpoint

        save_checkpoint(path, module.cpu())
    except Exception as err:  # noqa: BLE001 - report what blocked the measurement, fall back to the state dict
        error = f"{type(err).__name__}: {err}"
        how = "torch.save(module.state_dict()) (save_checkpoint failed)"
        torch.save(module.state_dict(), path)
    save_s = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return {
        "tasks": s.tasks,
        "measured": {"total": counts["total"], "shared": counts["shared"], "per_task": counts["per_task"]},
        "computed_from_shapes": expected,
        "matches_shapes": counts["shared"] == expected["shared"]
        and all(c == expected["per_task"] for c in counts["per_task"]),
        "main_15_tasks_computed": expected_main,
        "checkpoint": {"how": how, "bytes": size, "mb": size / 2**20, "save_s": save_s, "error": error},
        "float32_parameter_bytes": 4 * counts["total"],
    }


# ------------------------------------------------------------------------------------- 7. pixel metrics
def _pixel_inputs(n_images: int, size: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps like the evaluation's (NLL-scale patch maps, upsampled and blurred) and masks.

    64 distinct maps are made with the package's own post-processing and tiled with a per-image
    offset, so the scores have the value spread of real NLL maps (a few hundred to a few thousand,
    float32) without spending minutes on blurring 87 M pixels. Two images in three are anomalous.
    """
    gen = torch.Generator().manual_seed(3)
    k = min(64, n_images)
    patch = 1000.0 + 30.0 * torch.randn(k, grid, grid, generator=gen)
    defect = torch.zeros(k, grid, grid, dtype=torch.bool)
    lo, hi = grid // 3, grid // 3 + max(1, grid // 6)
    defect[:, lo:hi, lo : hi + 1] = True
    patch[defect] += 60.0
    maps = pixel_anomaly_map(patch, size, PIXEL_SIGMA)
    masks = torch.nn.functional.interpolate(defect[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0
    scores = torch.empty(n_images, size, size)
    labels = torch.zeros(n_images, size, size, dtype=torch.bool)
    for i in range(n_images):
        scores[i] = maps[i % k] + 0.37 * i
        if i % 3:
            labels[i] = masks[i % k]
    return scores.reshape(-1), labels.reshape(-1)


def bench_pixel_metrics(s: BenchSettings) -> dict[str, Any]:
    """binary_auroc_ap over all test pixels of a 15-task MVTec-size evaluation: time and extra memory."""
    scores, labels = _pixel_inputs(s.pixel_images, s.image_size, s.grid)
    n = scores.numel()
    reset = reset_peak_rss()
    rss0 = status_kb("VmRSS")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    auroc, ap = binary_auroc_ap(scores, labels)
    elapsed = time.perf_counter() - t0
    peak_traced = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    hwm = status_kb("VmHWM") if reset else None
    bound = PIXEL_BOUND_BYTES * n / PIXEL_BOUND_PIXELS
    return {
        "images": s.pixel_images,
        "image_size": s.image_size,
        "pixels": n,
        "full_size_pixels": PIXEL_BOUND_PIXELS,
        "scores": "float32 NLL-scale anomaly maps (upsampled + Gaussian-blurred patch maps), bool masks",
        "time_s": elapsed,
        "ns_per_pixel": 1e9 * elapsed / n,
        "extra_bytes_tracemalloc": peak_traced,
        "extra_bytes_rss": (hwm - rss0) * 1024 if hwm is not None and rss0 is not None else None,
        "bytes_per_pixel": peak_traced / n,
        "input_bytes": scores.numel() * scores.element_size() + labels.numel(),
        "bound_bytes": bound,
        "bound_rule": f"{PIXEL_BOUND_BYTES / 1e9:g} GB extra for {PIXEL_BOUND_PIXELS:,} pixels "
        "(1725 images x 224 x 224)" + ("" if n == PIXEL_BOUND_PIXELS else ", scaled linearly to the pixels measured"),
        "auroc": auroc,
        "ap": ap,
    }
