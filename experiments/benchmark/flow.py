"""Dense matmul ceiling, and the flow's training step and inference pass against it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from experiments.benchmark.flop import flow_flop_per_patch, train_step_flop
from experiments.benchmark.measure import sync, time_call, time_pair, unmerged
from experiments.benchmark.settings import BenchSettings
from moleflow.config.loss import LossConfig
from moleflow.models.experts import LoRAExpert
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.models.subnet import ScaleContext
from moleflow.training.lightning_module import MoLEFlowLitModule
from moleflow.training.losses import moleflow_loss
from moleflow.training.optim import DEFAULT_OPTIMIZER, build_optimizer


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
            sync(device)
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
    optimizer = build_optimizer(params, DEFAULT_OPTIMIZER)
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
