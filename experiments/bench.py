"""Performance benchmark of MoLE-Flow (issue 8): how fast, against what the machine allows, and how much memory.

    python experiments/bench.py [--quick] [--out DIR] [--device cpu|cuda] [--threads N]

Everything is measured side by side in one process and written to DIR/bench.json and DIR/bench.md
(default DIR: logs/bench/<timestamp>); the Markdown is also printed. Sections:

1. machine; 2. dense matmul ceiling; 3. flow training step and inference pass (analytic FLOP, share
of the ceiling); 4. inference split into decode / data handling / backbone / routing / flow /
post-processing, routed mixed batch against a per-image loop, merged against unmerged experts;
5. one task end to end with the feature cache against re-extracting every epoch; 6. peak memory,
parameter counts, checkpoint size; 7. pixel-level AUROC/AP time and memory at MVTec size;
8. an extrapolated cost of the full MVTec MAIN run. Every target of the issue is reported held / not
held with the measured figure. Nothing is filled in: a figure is measured in this run or computed from
shapes, and says which.

Why random backbone weights: pretrained weights cannot be downloaded here, and a network's speed does
not depend on its weight values. Why perturbed experts: fresh LoRA experts are exactly zero, so merged
and unmerged scores would agree trivially; small random values make the comparison meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "src"):  # run as a script: the repo root (tests.helpers) and src (train.py)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from moleflow.data.images import load_rgb  # noqa: E402
from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec  # noqa: E402
from moleflow.evaluation.anomaly_map import image_scores_topk, pixel_anomaly_map, sanitize_nonfinite  # noqa: E402
from moleflow.evaluation.metrics import binary_auroc_ap  # noqa: E402
from moleflow.inference.inputs import to_model_inputs  # noqa: E402
from moleflow.models.experts import LoRAExpert, TaskExpertLinear  # noqa: E402
from moleflow.models.feature_extractor import FeatureExtractor, router_features  # noqa: E402
from moleflow.models.moleflow import SHARED_KEY, MoLEFlowConfig, MoLEFlowModel  # noqa: E402
from moleflow.models.subnet import ScaleContext  # noqa: E402
from moleflow.training.lightning_module import MoLEFlowLitModule  # noqa: E402
from moleflow.training.losses import LossConfig, moleflow_loss  # noqa: E402
from moleflow.training.optim import OptimConfig, build_optimizer  # noqa: E402
from moleflow.utils.allocator import keep_freed_memory  # noqa: E402
from moleflow.utils.prefetch import overlap_pays_off, prefetch  # noqa: E402

try:
    from experiments.bench_report import render_markdown
except ModuleNotFoundError:  # run as a script: python experiments/bench.py
    from bench_report import render_markdown  # type: ignore[no-redef]

# MVTec AD (data-set facts, alphabetical task order): normal training images and test images per category.
MVTEC_TRAIN = {
    "bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264, "hazelnut": 391, "leather": 245,
    "metal_nut": 220, "pill": 267, "screw": 320, "tile": 230, "toothbrush": 60, "transistor": 213, "wood": 247,
    "zipper": 240,
}  # fmt: skip
MVTEC_TEST = {
    "bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78, "hazelnut": 110, "leather": 124,
    "metal_nut": 115, "pill": 167, "screw": 160, "tile": 117, "toothbrush": 42, "transistor": 100, "wood": 79,
    "zipper": 151,
}  # fmt: skip
MAIN_EPOCHS = 60
MAIN_BATCH = 16
SCORE_TOP_K = 3
PIXEL_SIGMA = 4.0
# Documented memory bound of the pixel metrics: 2.5 GB extra for the 87 M pixels of a 15-task MVTec evaluation.
PIXEL_BOUND_BYTES = 2.5e9
PIXEL_BOUND_PIXELS = sum(MVTEC_TEST.values()) * 224 * 224
MERGE_RTOL, MERGE_ATOL = 1e-5, 1e-4  # merged vs unmerged NLL: |a - b| <= atol + rtol * |b| (torch.allclose)


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class BenchSettings:
    """What to measure at which sizes. ``full_settings`` is the representative configuration."""

    mode: str = "full"  # full | quick | smoke (tests)
    device: str = "cpu"
    threads: int | None = None
    batch: int = 16
    image_size: int = 224
    embed_dim: int = 768
    hidden: int = 768
    ncl: int = 6
    lora_rank: int = 64
    scale_context_kernel: int = 5
    spatial_context_kernel: int = 3
    tasks: int = 15
    warmup: int = 1
    repeats: int = 3
    mm_repeats: int = 5
    square: int = 2048  # large square matmul side (8192 on a GPU)
    backbone: str = "wide_resnet50_2"
    decode_source_size: int = 1024  # PNG side before load_rgb resizes it (MVTec AD images are 700-1024 px)
    mixed_tasks: int = 4  # distinct tasks in the routed mixed batch
    stream_batches: int = 4  # batches in the pipelined inference stream (decode overlapped with the model)
    e2e_backbone: str = "wide_resnet50_2"
    e2e_epochs: int = 3
    e2e_train_images: int = 16
    e2e_test_good: int = 4
    e2e_test_defect: int = 2  # per defect type (the generator draws 2 types)
    e2e_flow_overrides: list[str] = field(default_factory=list)  # empty: MAIN flow shapes
    e2e_rounds: int = 1  # runs per pipeline, in ABBA order; the fastest is reported
    e2e_warmup: bool = True  # a tiny run first, so one-off import/initialisation costs hit neither timed run
    pixel_images: int = sum(MVTEC_TEST.values())  # test images of the pixel-metric run (at image_size)
    keep_freed_memory: bool = True  # as runtime.keep_freed_memory (the training default); False: --system-allocator

    @property
    def grid(self) -> int:
        """Patch grid side: layer2 of the ResNet backbones has stride 8."""
        return -(-self.image_size // 8)

    @property
    def representative(self) -> bool:
        return self.mode == "full"

    def flow_config(self) -> MoLEFlowConfig:
        return MoLEFlowConfig(
            embed_dim=self.embed_dim,
            hidden=self.hidden,
            ncl=self.ncl,
            lora_rank=self.lora_rank,
            scale_context_kernel=self.scale_context_kernel,
            spatial_context_kernel=self.spatial_context_kernel,
        )


def full_settings(device: str = "cpu", threads: int | None = None) -> BenchSettings:
    """MAIN shapes: batch 16 at 224 px, D = 768, NCL = 6, rank 64, 15 tasks, WideResNet-50-2."""
    return BenchSettings(mode="full", device=device, threads=threads, square=8192 if device == "cuda" else 2048)


def quick_settings(device: str = "cpu", threads: int | None = None) -> BenchSettings:
    """Reduced sizes for development (< 1 min on 2 cores): the figures are NOT representative."""
    return replace(
        full_settings(device, threads),
        mode="quick",
        batch=2,
        tasks=2,
        repeats=1,
        mm_repeats=3,
        square=1024,
        decode_source_size=256,
        mixed_tasks=2,
        e2e_backbone="resnet10t",
        e2e_epochs=2,
        e2e_train_images=4,
        e2e_test_good=1,
        e2e_test_defect=1,
        e2e_flow_overrides=["ncl=2", "lora_rank=8", "model.flow.embed_dim=64", "model.flow.hidden=64"],
        pixel_images=100,  # 5.0 M pixels
    )


def smoke_settings() -> BenchSettings:
    """Tiny sizes for the test suite: every section runs in seconds; the figures mean nothing."""
    return replace(
        quick_settings("cpu"),
        mode="smoke",
        image_size=64,
        embed_dim=32,
        hidden=32,
        ncl=2,
        lora_rank=4,
        repeats=1,
        mm_repeats=2,
        square=256,
        backbone="resnet10t",
        decode_source_size=64,
        e2e_flow_overrides=["ncl=2", "lora_rank=4", "model.flow.embed_dim=32", "model.flow.hidden=32"],
        e2e_warmup=False,
        e2e_rounds=1,
        pixel_images=20,
    )


# ------------------------------------------------------------------------------------------ timing, memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _stats(times: list[float]) -> dict[str, Any]:
    return {"best_s": min(times), "median_s": statistics.median(times), "runs_s": times}


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, Any]:
    """Best and median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    return _stats([_timed(fn, device) for _ in range(max(1, repeats))])


def time_pair(
    fa: Callable[[], Any], fb: Callable[[], Any], device: torch.device, repeats: int, warmup: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time two alternatives interleaved (a, b, a, b, ...): a change in machine load then hits both alike."""
    for _ in range(warmup):
        fa()
        fb()
    _sync(device)
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


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so each section gets its own peak; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mb() -> float:
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class MemoryTracker:
    """Peak RSS per section (VmHWM after a reset; cumulative ru_maxrss where the reset is not allowed) and GPU peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.per_section_reset = _reset_peak_rss() and _status_kb("VmHWM") is not None
        self.sections: dict[str, dict[str, float | None]] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.per_section_reset:
            _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = _status_kb("VmRSS")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak = _status_kb("VmHWM") if self.per_section_reset else None
            wall = time.perf_counter() - t0
            print(f"[bench] {name}: {wall:.1f} s", file=sys.stderr, flush=True)
            self.sections[name] = {
                "wall_s": wall,
                "start_rss_mb": start / 1024 if start is not None else None,
                "peak_rss_mb": peak / 1024 if peak is not None else _ru_maxrss_mb(),
                "gpu_peak_allocated_mb": (
                    torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
                ),
            }


# --------------------------------------------------------------------------------------------- 1. machine
def _loadavg() -> list[float] | None:
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
        "load_average_start": _loadavg(),  # other work on the machine slows every figure down
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return info


# ---------------------------------------------------------------------------------------------- 2. ceiling
def _mm_rate(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict[str, Any]:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    flop = 2.0 * m * k * n
    timing = time_call(lambda: torch.mm(a, b), device, repeats, warmup=2)
    return {
        "shape": f"({m} x {k}) @ ({k} x {n})",
        "dtype": str(dtype).replace("torch.", ""),
        "gflop": flop / 1e9,
        **timing,
        "gflops_best": flop / timing["best_s"] / 1e9,
    }


def bench_ceiling(s: BenchSettings, device: torch.device) -> dict[str, Any]:
    """Dense torch.mm throughput at the flow's own shape (N x D @ D x hidden) and at a large square: the ceiling."""
    n = s.batch * s.grid * s.grid
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    rows = []
    for dtype in dtypes:
        rows.append({"what": "flow shape", **_mm_rate(n, s.embed_dim, s.hidden, dtype, device, s.mm_repeats)})
        rows.append({"what": "large square", **_mm_rate(s.square, s.square, s.square, dtype, device, s.mm_repeats)})
    best = {d: max(r["gflops_best"] for r in rows if r["dtype"] == d) for d in {r["dtype"] for r in rows}}
    return {
        "rows": rows,
        "ceiling_gflops": best["float32"],
        "ceiling_gflops_by_dtype": best,
        "definition": "best GFLOP/s of torch.mm over the measured shapes and the re-check after the flow passes "
        "(each: best of repeats after 2 warm-up calls)",
    }


# ------------------------------------------------------------------------------------------------- 3. flow
def subnet_linears(cfg: MoLEFlowConfig) -> list[tuple[int, int]]:
    """(in, out) of one coupling subnet's task-expert linears (method.md 3.4)."""
    c1 = cfg.embed_dim // 2
    c2 = cfg.embed_dim - c1
    h = cfg.hidden
    if cfg.scale_context_kernel > 0:
        return [(2 * c1, h), (h, c2), (c1, h), (h, c2)]  # s1 on [u1, ctx], s2, t1, t2
    return [(c1, h), (h, 2 * c2)]


def flow_flop_per_patch(cfg: MoLEFlowConfig, merged: bool) -> dict[str, float]:
    """Forward FLOP of the flow per patch, computed from the shapes (multiply-add = 2 FLOP).

    Per coupling block (C1 = D // 2 conditioning channels, hidden width H):
      subnet linears, 2 * in * out each: s1 (2 C1 -> H), s2 (H -> C2), t1 (C1 -> H), t2 (H -> C2)
        (without scale context: l1 (C1 -> H), l2 (H -> 2 C2));
      LoRA experts when unmerged: + 2 * r * (in + out) per linear (A x, then B (A x));
        merged (W + (alpha / r) B A): nothing extra;
      scale-context depthwise conv: 2 * k * k * C1 (k = scale_context_kernel);
      the coupling itself (tanh, exp, multiply-add, permutation, log-det sum): O(D), neglected.
    Once per patch: spatial context mixer (depthwise conv) 2 * k_s * k_s * D; the adapter, positional
    code and NLL (O(D) each) are neglected.
    The training step's count is :func:`train_step_flop`.
    """
    linears = subnet_linears(cfg)
    base = sum(2 * i * o for i, o in linears)
    lora = sum(2 * cfg.lora_rank * (i + o) for i, o in linears) if cfg.expert_mode == "lora" and not merged else 0
    ctx = 2 * cfg.scale_context_kernel**2 * (cfg.embed_dim // 2) if cfg.scale_context_kernel > 0 else 0
    mixer = 2 * cfg.spatial_context_kernel**2 * cfg.embed_dim if cfg.spatial_context_kernel > 0 else 0
    block = base + lora + ctx
    return {
        "subnet_linears": float(cfg.ncl * base),
        "lora": float(cfg.ncl * lora),
        "scale_context_conv": float(cfg.ncl * ctx),
        "mixer": float(mixer),
        "total": float(cfg.ncl * block + mixer),
    }


def train_step_flop(cfg: MoLEFlowConfig, patches: int) -> dict[str, float]:
    """FLOP of one task-0 training step of the flow as the code runs it, computed from the shapes.

    Backward = 2 x forward (input and weight gradients: in task 0 every linear and conv trains), so a
    step is 3 x the forward. While the base trains, a LoRA expert is folded into it before the matmul
    (``TaskExpertLinear``: F.linear(x, W + (alpha / r) B A, b + b_t)), so the forward is the merged
    one, plus per expert linear and step 2 * r * in * out for B A and 4 * r * in * out for the
    gradients of B and A from W's gradient. The AdamP update (O(parameters)) is left out.
    ``unfused_formula`` is what the method's formula costs term by term (3 x the unmerged forward),
    for comparison only.
    """
    merged = flow_flop_per_patch(cfg, merged=True)["total"]
    fold = 0.0
    if cfg.expert_mode == "lora":
        fold = cfg.ncl * sum(6 * cfg.lora_rank * i * o for i, o in subnet_linears(cfg))
    return {
        "total": 3 * merged * patches + fold,
        "fold_experts": fold,
        "unfused_formula": 3 * flow_flop_per_patch(cfg, merged=False)["total"] * patches,
    }


def expected_parameter_counts(cfg: MoLEFlowConfig, tasks: int) -> dict[str, int]:
    """Parameter counts computed from the shapes (method.md 9), to check parameter_counts() against."""
    linears = subnet_linears(cfg)
    c1 = cfg.embed_dim // 2
    k = cfg.scale_context_kernel
    subnet_base = sum(i * o + o for i, o in linears)
    ctx = (k * k * c1 + c1 + 1) if k > 0 else 0  # depthwise weights, bias, alpha logit
    ks = cfg.spatial_context_kernel
    mixer = (ks * ks * cfg.embed_dim + cfg.embed_dim + 1) if ks > 0 else 0
    shared = cfg.ncl * (subnet_base + ctx) + mixer
    expert = sum(cfg.lora_rank * (i + o) + o for i, o in linears) if cfg.expert_mode == "lora" else 0
    per_task = cfg.ncl * expert + (2 * cfg.embed_dim if cfg.adapter == "whitening" else 0)
    return {"shared": shared, "per_task": per_task, "total": shared + tasks * per_task}


MATMUL_OPS = ("mm", "gemm", "matmul", "nvjet", "cutlass")  # aten::addmm/mm/bmm on CPU, GEMM kernels on a GPU


def op_shares(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Where one pass spends its operator time (torch.profiler self time): matmul, convolution, the rest.

    Explains a low share of the matmul ceiling: time outside the matmuls (copies, concatenation,
    permutation, activations) runs at memory speed, not at matmul speed.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            fn()
            _sync(device)
        attr = "self_device_time_total" if cuda else "self_cpu_time_total"
        times: dict[str, float] = {}
        optimizer_us = 0.0
        for ev in prof.key_averages():
            if ev.key.startswith("Optimizer.step"):
                optimizer_us += float(ev.cpu_time_total)
            t = float(getattr(ev, attr, 0.0) or 0.0)
            if t > 0 and (not cuda or ev.device_type.name == "CUDA"):
                times[ev.key] = times.get(ev.key, 0.0) + t
    except Exception as err:  # noqa: BLE001 - a diagnostic only: report why it is missing
        return {"error": f"{type(err).__name__}: {err}"}
    total = sum(times.values()) or 1.0
    groups = {"matmul": 0.0, "convolution": 0.0, "other": 0.0}
    for name, t in times.items():
        low = name.lower()
        group = "matmul" if any(k in low for k in MATMUL_OPS) else "convolution" if "conv" in low else "other"
        groups[group] += t
    top_other = sorted(
        ((n, t) for n, t in times.items() if not any(k in n.lower() for k in (*MATMUL_OPS, "conv"))),
        key=lambda nt: -nt[1],
    )[:6]
    return {
        "clock": "GPU kernel time, grouped by kernel name (approximate)" if cuda else "CPU self time",
        "shares": {k: v / total for k, v in groups.items()},
        "top_other_ops": [{"op": n, "share": t / total} for n, t in top_other],
        "optimizer_step_share": optimizer_us / total if optimizer_us and not cuda else None,
    }


@torch.no_grad()
def _perturb_like_trained(model: MoLEFlowModel, seed: int = 0) -> None:
    """Give every expert and context conv small non-zero values (fresh ones are exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRAExpert):
            module.B.copy_(0.1 * torch.randn(module.B.shape, generator=gen))
            module.bias.copy_(0.01 * torch.randn(module.bias.shape, generator=gen))
        elif isinstance(module, ScaleContext):
            module.conv.weight.copy_(0.02 * torch.randn(module.conv.weight.shape, generator=gen))


def build_module(s: BenchSettings, device: torch.device) -> MoLEFlowLitModule:
    """The benchmark's model: ``s.tasks`` tasks, perturbed experts, one routing prototype per task."""
    torch.manual_seed(0)
    module = MoLEFlowLitModule(flow=asdict(s.flow_config()))
    for t in range(s.tasks):
        module.add_task(f"task_{t:02d}")
    _perturb_like_trained(module.model)
    gen = torch.Generator().manual_seed(1)
    d = s.embed_dim
    for t in range(s.tasks):  # synthetic router statistics: only the cost of routing matters here
        feats = torch.rand(d, generator=gen) + 0.2 * torch.randn(64, d, generator=gen)
        module.model.router.fit_task(t, feats)
    return module.to(device)


def bench_flow(s: BenchSettings, module: MoLEFlowLitModule, device: torch.device, ceiling: dict) -> dict[str, Any]:
    """Flow training step (task 0 trainable set, AdamP) and inference pass (merged experts) at batch ``s.batch``."""
    model = module.model
    cfg = model.config
    n = s.batch * s.grid * s.grid
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(s.batch, s.grid, s.grid, s.embed_dim, generator=gen).to(device)
    flop_unmerged = flow_flop_per_patch(cfg, merged=False)
    flop_merged = flow_flop_per_patch(cfg, merged=True)
    step_flop = train_step_flop(cfg, n)

    def summary(timing: dict, flop: float, ceil: float) -> dict[str, Any]:
        rate = flop / timing["best_s"] / 1e9
        return {**timing, "gflop": flop / 1e9, "gflops_best": rate, "ceiling_share": rate / ceil}

    # training step: loss = tail-aware + logdet, backward, clip 0.5 (as the Trainer), AdamP step
    names = model.set_trainable(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig())
    loss_cfg = LossConfig()
    model.train()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nll, logdet = model.nll(feats, 0)
        loss, _ = moleflow_loss(nll, logdet, loss_cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()

    train_t = time_call(train_step, device, s.repeats, s.warmup)
    train_ops = op_shares(train_step, device)
    train_info = {"trainable_parameters": sum(p.numel() for p in params), "trainable_tensors": len(names)}
    optimizer.zero_grad(set_to_none=True)  # frees the gradients before the inference passes
    model.set_trainable(-1)  # nothing trains any more (frozen for inference)
    model.eval()

    def nll() -> torch.Tensor:
        return model.nll(feats, 0)[0]

    def nll_unmerged() -> torch.Tensor:
        with unmerged(model):
            return nll()

    with torch.no_grad(), model.merged_experts():
        nll()  # folds task 0's experts into its weights: a one-off per task and evaluation round
        merged_t, unmerged_t = time_pair(nll, nll_unmerged, device, s.repeats, s.warmup)
        inference_ops = op_shares(nll, device)
        bf16_t = None
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16_t = time_call(nll, device, s.repeats, s.warmup)
    # the ceiling again, right after the flow: the larger of the two is used (a conservative ceiling)
    recheck = _mm_rate(n, s.embed_dim, s.hidden, torch.float32, device, s.mm_repeats)
    ceiling["recheck_after_flow"] = recheck
    ceiling["ceiling_gflops"] = max(ceiling["ceiling_gflops"], recheck["gflops_best"])
    ceiling["ceiling_gflops_by_dtype"]["float32"] = ceiling["ceiling_gflops"]
    ceil32 = ceiling["ceiling_gflops"]
    merged = summary(merged_t, flop_merged["total"] * n, ceil32)
    out: dict[str, Any] = {
        "batch": s.batch,
        "patches": n,
        "flop_per_patch_forward_unmerged": flop_unmerged,
        "flop_per_patch_forward_merged": flop_merged,
        "flop_formula": flow_flop_per_patch.__doc__,
        "train_step": {**summary(train_t, step_flop["total"], ceil32), **train_info},
        "train_step_flop": step_flop,
        "train_step_flop_formula": train_step_flop.__doc__,
        "inference": merged,
        "inference_unmerged": summary(unmerged_t, flop_unmerged["total"] * n, ceil32),
        "unmerged_over_merged_time": unmerged_t["best_s"] / merged_t["best_s"],
        "timing": "merged and unmerged timed interleaved; shares use the best run",
        "operator_time": {"train_step": train_ops, "inference": inference_ops},
    }
    if bf16_t is not None:
        out["inference_bf16_autocast"] = summary(
            bf16_t, flop_merged["total"] * n, ceiling["ceiling_gflops_by_dtype"]["bfloat16"]
        )
    return out


# -------------------------------------------------------------------------------------------- 4. inference
def write_decode_images(directory: Path, count: int, size: int, image_size: int) -> list[Path]:
    """PNGs of ``size`` px for the decode stage: generated textures, upscaled, with the generator's pixel noise.

    Drawn at ``image_size`` with the synthetic generator (fast), then resized to ``size`` and re-noised
    (std 3, as the generator) so the PNGs do not compress better than photographs would.
    """
    cats = list(SYNTHETIC_CATEGORIES)
    per_cat = -(-count // len(cats))
    src = generate_synthetic_mvtec(
        directory / "src", cats, num_train=per_cat, num_test_good=1, num_test_defect=1, image_size=image_size
    )
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        img = Image.open(src / cats[i % len(cats)] / "train" / "good" / f"{i // len(cats):03d}.png").convert("RGB")
        if size != image_size:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float64) + rng.normal(0.0, 3.0, (size, size, 3))
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        path = directory / f"{i:03d}.png"
        img.save(path, format="PNG")
        paths.append(path)
    return paths


class _BackboneClock:
    """Times the CNN inside FeatureExtractor.forward with hooks, to split it from the patch embedding."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self._start = 0.0
        backbone.register_forward_pre_hook(self._pre)
        backbone.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        _sync(self.device)
        self.elapsed += time.perf_counter() - self._start


STAGES = ("decode", "data handling", "backbone CNN", "patch embedding", "routing", "flow", "post-processing")
OTHER_STAGES = ("decode", "data handling", "routing", "post-processing")


def _decode(inputs: list[Any], s: BenchSettings) -> list[torch.Tensor]:
    """Files or camera frames -> (3, S, S) tensors exactly as the detector reads them.

    ``to_model_inputs``: files through load_rgb on a thread pool (all cores); uint8 frames converted
    and resized like a file's pixels.
    """
    return [item.tensor for item in to_model_inputs(inputs, s.image_size)]


def _compute(
    images: list[torch.Tensor],
    s: BenchSettings,
    extractor: FeatureExtractor,
    clock: _BackboneClock,
    model: MoLEFlowModel,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor]:
    """Decoded images -> scores and maps, timed per stage; returns the stage times (s) and the features."""
    times: dict[str, float] = {}
    t1 = time.perf_counter()
    batch = torch.stack(images).to(device, non_blocking=True)
    _sync(device)
    t2 = time.perf_counter()
    times["data handling"] = t2 - t1
    clock.elapsed = 0.0
    feats = extractor(batch)
    _sync(device)
    t3 = time.perf_counter()
    times["backbone CNN"] = clock.elapsed
    times["patch embedding"] = (t3 - t2) - clock.elapsed
    tasks, _ = model.router.route(router_features(feats), s.tasks)
    _sync(device)
    t4 = time.perf_counter()
    times["routing"] = t4 - t3
    nll = model.nll_routed(feats, tasks)
    _sync(device)
    t5 = time.perf_counter()
    times["flow"] = t5 - t4
    nll, _ = sanitize_nonfinite(nll.float())
    scores = image_scores_topk(nll, SCORE_TOP_K)
    maps = pixel_anomaly_map(nll, s.image_size, PIXEL_SIGMA)
    scores, maps = scores.cpu(), maps.cpu()
    times["post-processing"] = time.perf_counter() - t5
    return times, feats


def _pipeline(
    paths: list[Any],
    s: BenchSettings,
    extractor: FeatureExtractor,
    clock: _BackboneClock,
    model: MoLEFlowModel,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor]:
    """One batch of files or frames, one stage after the other (decode not overlapped), timed per stage."""
    t0 = time.perf_counter()
    images = _decode(paths, s)
    decode = time.perf_counter() - t0
    times, feats = _compute(images, s, extractor, clock, model, device)
    return {"decode": decode, **times}, feats


def _stream(
    paths: list[Path],
    s: BenchSettings,
    extractor: FeatureExtractor,
    clock: _BackboneClock,
    model: MoLEFlowModel,
    device: torch.device,
    overlap: bool,
) -> dict[str, float]:
    """``s.stream_batches`` batches through ``moleflow.utils.prefetch`` as ``MoLEFlowDetector.predict`` runs
    them: with ``overlap`` batch k + 1 is decoded while batch k is in the model, without it the two take
    turns. Returns the wall time and the stage times summed inside it."""
    t0 = time.perf_counter()
    sums = dict.fromkeys(STAGES[1:], 0.0)
    for _, images in prefetch([paths] * s.stream_batches, lambda chunk: _decode(chunk, s), enabled=overlap):
        times, _ = _compute(images, s, extractor, clock, model, device)
        for k, v in times.items():
            sums[k] += v
    return {"wall": time.perf_counter() - t0, **sums}


def _breakdown(runs: list[dict[str, float]], batch: int) -> dict[str, Any]:
    """Median stage times over runs, shares of their sum, and the 'neither backbone nor flow' share."""
    med = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    total = sum(med.values())
    other = sum(med[k] for k in OTHER_STAGES)
    return {
        "batch_size": batch,
        "stages": {k: {"ms": 1e3 * v, "ms_per_image": 1e3 * v / batch, "share": v / total} for k, v in med.items()},
        "total_ms": 1e3 * total,
        "total_ms_per_image": 1e3 * total / batch,
        "other_share": other / total,
        "other_share_with_embedding": (other + med["patch embedding"]) / total,
        "statistic": f"median of {len(runs)} timed runs after warm-up",
    }


def _stream_summary(
    runs: dict[bool, list[dict[str, float]]], s: BenchSettings, serial: dict[str, Any], policy: bool
) -> dict[str, Any]:
    """The stream as predict runs it (``policy``), against the other choice, and what is not the model.

    'Other' is the wall time less the backbone, embedding and flow times of the one-batch serial
    runs: time the model loses to decode threads competing for the cores counts as overhead.
    """
    images = s.batch * s.stream_batches
    core_per_image = sum(serial["stages"][k]["ms_per_image"] for k in ("backbone CNN", "patch embedding", "flow"))
    out: dict[str, Any] = {
        "batches": s.stream_batches,
        "batch_size": s.batch,
        "images": images,
        "overlap_as_predict": policy,
        "serial_model_ms_per_image": core_per_image,
        "statistic": f"median of {len(runs[policy])} timed runs after warm-up",
        "definition": "other = stream wall time - (backbone CNN + patch embedding + flow) of the serial one-batch "
        "runs: decode that is not hidden, decode threads slowing the model, data handling, routing, "
        "post-processing",
    }
    for overlap, label in ((True, "overlapped"), (False, "in_turn")):
        med = {k: statistics.median(r[k] for r in runs[overlap]) for k in runs[overlap][0]}
        wall = 1e3 * med["wall"] / images
        out[label] = {
            "wall_ms_per_image": wall,
            "ms_per_image": {k: 1e3 * v / images for k, v in med.items() if k != "wall"},
            "other_share": (wall - core_per_image) / wall,
        }
    out["overlapped_over_in_turn_time"] = out["overlapped"]["wall_ms_per_image"] / out["in_turn"]["wall_ms_per_image"]
    out["other_share"] = out["overlapped" if policy else "in_turn"]["other_share"]
    return out


def bench_inference(
    s: BenchSettings, module: MoLEFlowLitModule, device: torch.device, scratch: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-batch and per-image inference split by stage; routed mixed batch vs per-image loop; merged vs unmerged.

    Returns the results and a dict of intermediate figures for the estimate.
    """
    model = module.model.eval()
    paths = write_decode_images(scratch / "decode", s.batch, s.decode_source_size, s.image_size)
    extractor = FeatureExtractor(name=s.backbone, layers=("layer2", "layer3"), embed_dim=s.embed_dim, pretrained=False)
    extractor = extractor.to(device)
    if extractor.grid_size(s.image_size) != (s.grid, s.grid):
        msg = f"grid {extractor.grid_size(s.image_size)} differs from the assumed {s.grid} x {s.grid}"
        raise RuntimeError(msg)
    clock = _BackboneClock(extractor.backbone, device)
    out: dict[str, Any] = {
        "backbone": f"{s.backbone} features_only layer2+layer3, RANDOM weights (pretrained weights cannot be "
        "downloaded here; the time does not depend on the weight values)",
        "decode_source": f"{s.batch} generated PNGs of {s.decode_source_size} px, load_rgb -> {s.image_size} px "
        "on a thread pool (as MoLEFlowDetector.predict)",
        "tasks_in_model": s.tasks,
    }
    batch_feats = {}
    with torch.no_grad(), model.merged_experts():
        # a camera frame: the first image's pixels as an in-memory uint8 array (no file, no PNG decode)
        frame = np.asarray(Image.open(paths[0]).convert("RGB"))
        for label, batch_paths in (("batch", paths), ("single", paths[:1]), ("single_frame", [frame])):
            for _ in range(s.warmup):  # also folds the experts into the weights (one-off per task and round)
                _pipeline(batch_paths, s, extractor, clock, model, device)
            runs = []
            for _ in range(s.repeats):
                times, batch_feats[label] = _pipeline(batch_paths, s, extractor, clock, model, device)
                runs.append(times)
            out[label] = _breakdown(runs, len(batch_paths))
        stream_runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(s.repeats):  # interleaved, so machine noise hits both alike
            for overlap in (True, False):
                stream_runs[overlap].append(_stream(paths, s, extractor, clock, model, device, overlap))
        out["stream"] = _stream_summary(stream_runs, s, out["batch"], overlap_pays_off(device))
        feats = batch_feats["batch"]
        tasks_routed, _ = model.router.route(router_features(feats), s.tasks)
        out["batch"]["distinct_routed_tasks"] = int(torch.unique(tasks_routed).numel())

        # routed mixed batch: one flow pass per distinct task, against one pass per image
        mixed = (torch.arange(s.batch) % min(s.mixed_tasks, s.tasks)).to(device)
        passes = {"n": 0}

        def count(*_: Any) -> None:
            passes["n"] += 1

        handle = model.flows[SHARED_KEY].register_forward_pre_hook(count)
        split_nll = model.nll_routed(feats, mixed)
        split_passes = passes["n"]
        handle.remove()

        def split() -> torch.Tensor:
            return model.nll_routed(feats, mixed)

        def loop() -> torch.Tensor:
            return torch.cat([model.nll(feats[b : b + 1], int(mixed[b]))[0] for b in range(s.batch)])

        def split_unmerged() -> torch.Tensor:
            with unmerged(model):
                return split()

        split_t, loop_t = time_pair(split, loop, device, s.repeats, s.warmup)
        merged_t, unmerged_t = time_pair(split, split_unmerged, device, s.repeats, s.warmup)
        loop_nll, unmerged_nll = loop(), split_unmerged()
        layers = [m for m in model.modules() if isinstance(m, TaskExpertLinear)]
        merge = time_call(lambda: [layer.merged_weight(0) for layer in layers], device, s.repeats, s.warmup)
    out["routed_mixed"] = {
        "batch_size": s.batch,
        "distinct_tasks": int(torch.unique(mixed).numel()),
        "flow_passes_split": split_passes,
        "split_by_task": split_t,
        "per_image_loop": loop_t,
        "loop_over_split_time": loop_t["best_s"] / split_t["best_s"],
        "max_abs_diff_split_vs_loop": float((split_nll - loop_nll).abs().max()),
        "timing": "interleaved, merged experts",
    }
    diff = (split_nll - unmerged_nll).abs()
    out["merged_vs_unmerged"] = {
        "merged": merged_t,
        "unmerged": unmerged_t,
        "unmerged_over_merged_time": unmerged_t["best_s"] / merged_t["best_s"],
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / unmerged_nll.abs().clamp_min(1e-12)).max()),
        "nll_range": [float(unmerged_nll.min()), float(unmerged_nll.max())],
        "tolerance": f"torch.allclose(merged, unmerged, rtol={MERGE_RTOL:g}, atol={MERGE_ATOL:g})",
        "within_tolerance": bool(torch.allclose(split_nll, unmerged_nll, rtol=MERGE_RTOL, atol=MERGE_ATOL)),
        "merge_ms_per_task": 1e3 * merge["best_s"],
        "merge_note": "W + (alpha / r) B A for every expert linear of one task: once per task per evaluation round",
        "timing": "interleaved, on the routed mixed batch",
    }
    if device.type == "cuda":  # the GPU options of issue 8.4: channels_last + bf16 autocast for the backbone
        images = torch.stack([load_rgb(p, s.image_size)[0] for p in paths]).to(device)
        fp32 = time_call(lambda: extractor(images), device, s.repeats, s.warmup)
        extractor.configure_runtime(channels_last=True, amp_dtype=torch.bfloat16)
        fast = time_call(lambda: extractor(images), device, s.repeats, s.warmup)
        extractor.configure_runtime(channels_last=False, amp_dtype=None)
        out["backbone_gpu_options"] = {
            "fp32": fp32,
            "channels_last_bf16": fast,
            "speedup": fp32["best_s"] / fast["best_s"],
        }
    extra = {"merge_s_per_task": merge["best_s"]}
    return out, extra


# ------------------------------------------------------------------------------------------ 5. end to end
def _train_run(overrides: list[str], out: Path) -> tuple[float, dict[str, Any], dict[str, list[float]]]:
    from tests.helpers import compose_config
    from train import train

    cfg = compose_config(overrides, out)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False, mmap=True)
    return wall, metrics, ckpt["moleflow"]["loss_history"]


def bench_end_to_end(s: BenchSettings, device: torch.device, scratch: Path) -> dict[str, Any]:
    """One task (feature extraction + training epochs + evaluation) with the feature cache against re-extraction."""
    data_root = scratch / "e2e_data"
    size = s.image_size
    common = [
        "data=generated",
        "data.categories=[stripes]",
        "logger=none",
        f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
        "trainer.model_summary=false",
        "report.figures=false",
    ]
    backbone = [f"model/backbone={'tiny_random' if s.e2e_backbone == 'resnet10t' else s.e2e_backbone}"]
    backbone.append("model.backbone.pretrained=false")
    if s.e2e_warmup:  # one-off costs (imports, first Trainer) must not land on the first timed run
        _train_run(
            [
                *common,
                f"data.root={scratch / 'e2e_warmup_data'}",
                "model/backbone=tiny_random",
                "data.image_size=64",
                "data.generate.image_size=64",
                "data.generate.num_train=2",
                "data.generate.num_test_good=1",
                "data.generate.num_test_defect=1",
                "data.train_batch_size=2",
                "training.epochs=1",
                "ncl=1",
                "lora_rank=2",
                "model.flow.embed_dim=16",
                "model.flow.hidden=16",
            ],
            scratch / "e2e_warmup",
        )
    overrides = [
        *common,
        *backbone,
        f"data.root={data_root}",
        f"data.image_size={size}",
        f"data.generate.image_size={size}",
        f"data.generate.num_train={s.e2e_train_images}",
        f"data.generate.num_test_good={s.e2e_test_good}",
        f"data.generate.num_test_defect={s.e2e_test_defect}",
        f"data.train_batch_size={s.batch}",
        f"data.eval_batch_size={s.batch}",
        f"training.epochs={s.e2e_epochs}",
        *s.e2e_flow_overrides,
    ]
    n_train = s.e2e_train_images
    n_test = s.e2e_test_good + 2 * s.e2e_test_defect
    runs: dict[str, Any] = {}
    losses = {}
    order = ["memory", "none"] + ["none", "memory"] * (s.e2e_rounds - 1)  # ABBA: load drift hits both alike
    for i, mode in enumerate(order):
        wall, metrics, loss = _train_run([*overrides, f"training.feature_cache={mode}"], scratch / f"e2e_{i}_{mode}")
        losses.setdefault(mode, loss)
        timings = next(iter(metrics["timings"]["per_task"].values()))
        walls = [*runs.get(mode, {}).get("walls_s", []), wall]
        if mode not in runs or wall < runs[mode]["wall_s"]:
            runs[mode] = {
                "wall_s": wall,
                "backbone_images": metrics["work"]["backbone_images"],
                "timings_s": {k: v for k, v in timings.items() if isinstance(v, int | float)},
                "image_auroc": metrics["final"]["routed"]["image_auroc"],
            }
        runs[mode]["walls_s"] = walls
    return {
        "command": "train(compose_config([...])) from src/train.py, as the CLI: " + " ".join(overrides),
        "backbone": f"{s.e2e_backbone} with RANDOM weights (model.backbone.pretrained=false)",
        "flow": "MAIN shapes" if not s.e2e_flow_overrides else "reduced: " + " ".join(s.e2e_flow_overrides),
        "images": {"train": n_train, "test": n_test, "size_px": size},
        "epochs": s.e2e_epochs,
        "batch": s.batch,
        "runs_per_pipeline": s.e2e_rounds,
        "statistic": "fastest run per pipeline (ABBA order)" if s.e2e_rounds > 1 else "one run per pipeline",
        "cache": runs["memory"],
        "reextract": runs["none"],
        "reextract_over_cache_time": runs["none"]["wall_s"] / runs["memory"]["wall_s"],
        "expected_backbone_images": {"cache": n_train + n_test, "reextract": s.e2e_epochs * n_train + n_test},
        "losses_bit_identical": losses["memory"] == losses["none"],
    }


# ------------------------------------------------------------------------------- 6. parameters, checkpoint
def bench_parameters_checkpoint(s: BenchSettings, module: MoLEFlowLitModule, scratch: Path) -> dict[str, Any]:
    """Parameter counts (measured and computed from shapes) and the size of the saved checkpoint."""
    counts = module.model.parameter_counts()
    expected = expected_parameter_counts(module.model.config, s.tasks)
    expected_main = expected_parameter_counts(MoLEFlowConfig(), len(MVTEC_TEST))
    path = scratch / f"bench_{s.tasks}_tasks.ckpt"
    how = "moleflow.training.checkpoint.save_checkpoint(MoLEFlowLitModule)"
    error = None
    t0 = time.perf_counter()
    try:
        from moleflow.training.checkpoint import save_checkpoint

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
    reset = _reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    auroc, ap = binary_auroc_ap(scores, labels)
    elapsed = time.perf_counter() - t0
    peak_traced = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    hwm = _status_kb("VmHWM") if reset else None
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


# ------------------------------------------------------------------------------------------- 8. estimate
def estimate_full_run(s: BenchSettings, res: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Cost of the full MVTec MAIN run (15 tasks x 60 epochs) extrapolated from this run's measured figures."""
    names = list(MVTEC_TEST)
    steps_per_epoch = sum(MVTEC_TRAIN[c] // MAIN_BATCH for c in names)  # drop_last per task
    images = sum(MVTEC_TRAIN.values()) + sum(MVTEC_TEST.values())
    image_evals = sum(MVTEC_TEST[c] * (len(names) - i) for i, c in enumerate(names))  # tasks 0..t after task t
    merges = sum(range(1, len(names) + 1))
    step_s = res["flow"]["train_step"]["median_s"] * MAIN_BATCH / s.batch
    stages = res["inference"]["batch"]["stages"]
    per_image = {k: v["ms_per_image"] / 1e3 for k, v in stages.items()}
    pix = res["pixel_metrics"]
    lines = {
        "training": {
            "seconds": step_s * steps_per_epoch * MAIN_EPOCHS,
            "rule": f"train step {step_s:.3f} s x {steps_per_epoch} steps/epoch (sum of floor(n_train / 16) per task) "
            f"x {MAIN_EPOCHS} epochs; task 0's step (all shared weights train) for every task: an upper bound",
        },
        "decode_and_backbone": {
            "seconds": (per_image["decode"] + per_image["data handling"] + per_image["backbone CNN"]
                        + per_image["patch embedding"]) * images,
            "rule": f"(decode + data handling + backbone CNN + patch embedding) per image x {images} images "
            "(3629 train + 1725 test, each once: feature cache)",
        },
        "evaluation_flow": {
            "seconds": (per_image["routing"] + per_image["flow"] + per_image["post-processing"]) * image_evals
            + merges * extra["merge_s_per_task"],
            "rule": f"(routing + flow + post-processing) per image x {image_evals} image evaluations (after task t, "
            f"the test sets of tasks 0..t; misrouted images would add a second pass) + {merges} expert merges",
        },
        "evaluation_pixel_metrics": {
            "seconds": pix["ns_per_pixel"] * 1e-9 * 2 * image_evals * 224 * 224,
            "rule": "pixel AUROC/AP time per pixel x 2 (oracle and routed) x image evaluations x 224 x 224",
        },
    }  # fmt: skip
    total = sum(v["seconds"] for v in lines.values())
    feature_cache_gb = images * s.grid * s.grid * s.embed_dim * 4 / 1e9 if s.image_size == 224 else None
    return {
        "label": "extrapolation from this machine's measured figures"
        + ("" if s.representative else f" ({s.mode} mode: batch {s.batch}, NOT representative)"),
        "lines": lines,
        "total_seconds": total,
        "total_hours": total / 3600,
        "feature_cache_gb_computed": feature_cache_gb,
        "notes": [
            "MVTec AD image counts are data-set facts; every time is measured above.",
            f"The train step time is scaled linearly from batch {s.batch} to 16." if s.batch != MAIN_BATCH else "",
            "Lightning overhead per step and the per-task setup are not included (see the end-to-end section).",
        ],
    }


# -------------------------------------------------------------------------------------------- targets
def _target(name: str, rule: str, measured: float, unit: str, held: bool, detail: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "target": rule,
        "measured": float(measured),
        "unit": unit,
        "held": bool(held),
        "detail": detail,
    }


def evaluate_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets, each held or not with its measured figure."""
    flow, inf, e2e, pix = res["flow"], res["inference"], res["end_to_end"], res["pixel_metrics"]
    mixed, merged = inf["routed_mixed"], inf["merged_vs_unmerged"]
    targets = [
        _target(
            "flow training step reaches >= 50 % of the matmul ceiling",
            ">= 50 %",
            100 * flow["train_step"]["ceiling_share"],
            "% of ceiling",
            flow["train_step"]["ceiling_share"] >= 0.5,
            f"{flow['train_step']['gflops_best']:.1f} of {res['ceiling']['ceiling_gflops']:.1f} GFLOP/s",
        ),
        _target(
            "flow inference pass (merged experts) reaches >= 50 % of the matmul ceiling",
            ">= 50 %",
            100 * flow["inference"]["ceiling_share"],
            "% of ceiling",
            flow["inference"]["ceiling_share"] >= 0.5,
            f"{flow['inference']['gflops_best']:.1f} of {res['ceiling']['ceiling_gflops']:.1f} GFLOP/s",
        ),
    ]
    stream = inf["stream"]
    targets.append(
        _target(
            f"inference ({stream['batches']} batches of {stream['batch_size']} PNG files as predict runs them): "
            "neither backbone nor flow <= 10 % of the total",
            "<= 10 %",
            100 * stream["other_share"],
            "% of wall time",
            stream["other_share"] <= 0.10,
            f"decode {'overlapped with' if stream['overlap_as_predict'] else 'taking turns with'} the model "
            f"(predict's choice here); overlapping takes {stream['overlapped_over_in_turn_time']:.2f}x the time of "
            "taking turns",
        )
    )
    labels = {
        "batch": f"one batch of {inf['batch']['batch_size']} PNG files, nothing overlapped",
        "single_frame": "one image from a camera frame (uint8 array in memory)",
        "single": "one image from a PNG file",
    }
    for label, what in labels.items():
        b = inf[label]
        decode = b["stages"]["decode"]["share"]
        note = (
            f"; decoding the one {res['meta']['settings']['decode_source_size']}-px PNG alone is {100 * decode:.1f} %"
            " and cannot be overlapped with anything (one zlib stream, no other image to work on)"
            if label == "single"
            else ""
        )
        targets.append(
            _target(
                f"inference ({what}): neither backbone nor flow <= 10 % of the total",
                "<= 10 %",
                100 * b["other_share"],
                "% of total",
                b["other_share"] <= 0.10,
                f"decode + data handling + routing + post-processing; {100 * b['other_share_with_embedding']:.1f} % "
                f"if the patch embedding is counted as 'other' too{note}",
            )
        )
    targets += [
        _target(
            "a routed batch is split by task, one flow pass per sub-batch (no per-image loop)",
            "flow passes == distinct tasks",
            mixed["flow_passes_split"],
            f"flow passes for {mixed['distinct_tasks']} tasks",
            mixed["flow_passes_split"] == mixed["distinct_tasks"],
            f"per-image loop takes {mixed['loop_over_split_time']:.2f}x the split batch's time",
        ),
        _target(
            "merged experts (W + scale B A) score like the unmerged path",
            merged["tolerance"],
            merged["max_abs_diff"],
            "max abs NLL difference",
            merged["within_tolerance"],
            f"max rel diff {merged['max_rel_diff']:.2e}; unmerged takes {merged['unmerged_over_merged_time']:.2f}x",
        ),
        _target(
            "pixel AUROC/AP over a 15-task MVTec-size evaluation within the memory bound",
            f"<= {pix['bound_bytes'] / 1e9:.3g} GB extra for {pix['pixels']:,} pixels",
            pix["extra_bytes_tracemalloc"] / 1e9,
            "GB extra (tracemalloc peak)",
            pix["extra_bytes_tracemalloc"] <= pix["bound_bytes"],
            f"{pix['bytes_per_pixel']:.1f} B/pixel, {pix['time_s']:.2f} s",
        ),
        _target(
            "the backbone runs once per distinct image with the cache",
            "backbone images == train + test images",
            e2e["cache"]["backbone_images"],
            "backbone images",
            e2e["cache"]["backbone_images"] == e2e["expected_backbone_images"]["cache"],
            f"re-extracting: {e2e['reextract']['backbone_images']}; "
            f"losses bit-identical: {e2e['losses_bit_identical']}",
        ),
    ]
    return targets


# ------------------------------------------------------------------------------------------------ driver
def run_benchmark(s: BenchSettings, out_dir: Path, command: str = "") -> dict[str, Any]:
    """Run every section, write bench.json and bench.md to ``out_dir``; returns the results."""
    started = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    if s.device == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda but torch sees no CUDA device."
        raise SystemExit(msg)
    device = torch.device(s.device)
    allocator = "glibc malloc, default settings"
    if s.keep_freed_memory and keep_freed_memory():
        allocator = "glibc malloc keeping freed memory (runtime.keep_freed_memory, as training)"
    out_dir.mkdir(parents=True, exist_ok=True)
    mem = MemoryTracker(device)
    notes = []
    if not s.representative:
        notes.append(f"{s.mode} mode: not representative (reduced sizes: batch {s.batch}, {s.tasks} tasks, "
                     f"{s.pixel_images} images for the pixel metrics, {s.repeats} timed repeats; "
                     "for development only)")  # fmt: skip
    res: dict[str, Any] = {
        "meta": {
            "command": command,
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "mode": s.mode,
            "representative": s.representative,
            "notes": notes,
            "settings": asdict(s),
        }
    }
    scratch = Path(tempfile.mkdtemp(prefix="moleflow_bench_"))
    try:
        res["machine"] = {**machine_info(device), "allocator": allocator}
        with mem.section("ceiling"):
            res["ceiling"] = bench_ceiling(s, device)
        with mem.section("build model"):
            module = build_module(s, device)
        with mem.section("flow"):
            res["flow"] = bench_flow(s, module, device, res["ceiling"])
        with mem.section("inference"):
            res["inference"], extra = bench_inference(s, module, device, scratch)
        with mem.section("parameters and checkpoint"):
            params = bench_parameters_checkpoint(s, module, scratch)
        del module
        with mem.section("end to end"):
            res["end_to_end"] = bench_end_to_end(s, device, scratch)
        with mem.section("pixel metrics"):
            res["pixel_metrics"] = bench_pixel_metrics(s)
        res["memory"] = {
            "per_section": mem.sections,
            "per_section_peak": "VmHWM reset per section" if mem.per_section_reset else "cumulative ru_maxrss",
            "peak_rss_mb": _ru_maxrss_mb(),
            "gpu_peak_allocated_mb": max(
                (v["gpu_peak_allocated_mb"] or 0.0 for v in mem.sections.values()), default=None
            )
            if device.type == "cuda"
            else None,
            **params,
        }
        res["estimate"] = estimate_full_run(s, res, extra)
        res["targets"] = evaluate_targets(res)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res["meta"]["duration_s"] = time.perf_counter() - started
    if "machine" in res:
        res["machine"]["load_average_end"] = _loadavg()
    (out_dir / "bench.json").write_text(json.dumps(_finite(res), indent=2))
    (out_dir / "bench.md").write_text(render_markdown(res))
    return res


def _finite(x: Any) -> Any:
    """NaN / inf -> None, so bench.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (< 1 min on 2 cores); not representative")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default logs/bench/<timestamp>)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="leave glibc malloc as it is (default: keep freed memory, as runtime.keep_freed_memory does)",
    )
    args = parser.parse_args(argv)
    settings = (quick_settings if args.quick else full_settings)(args.device, args.threads)
    settings = replace(settings, keep_freed_memory=not args.system_allocator)
    out = args.out or ROOT / "logs" / "bench" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    command = " ".join(["python experiments/bench.py", *(sys.argv[1:] if argv is None else argv)])
    res = run_benchmark(settings, out, command)
    print(render_markdown(res))
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
