"""Performance benchmark of MoLE-Flow (issue 8): how fast, against what the machine allows, and how much memory.

    python -m experiments.bench [--quick] [--out DIR] [--device cpu|cuda] [--threads N]

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
import datetime as dt
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark.end_to_end import bench_end_to_end
from experiments.benchmark.flow import bench_ceiling, bench_flow, build_module
from experiments.benchmark.inference import bench_inference
from experiments.benchmark.measure import MemoryTracker, loadavg, machine_info, ru_maxrss_mb
from experiments.benchmark.report import render_markdown
from experiments.benchmark.settings import BenchSettings, full_settings, quick_settings
from experiments.benchmark.sizes import bench_parameters_checkpoint, bench_pixel_metrics
from experiments.benchmark.targets import estimate_full_run, evaluate_targets
from moleflow.utils.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]


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
            "peak_rss_mb": ru_maxrss_mb(),
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
        res["machine"]["load_average_end"] = loadavg()
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
    command = " ".join(["python -m experiments.bench", *(sys.argv[1:] if argv is None else argv)])
    res = run_benchmark(settings, out, command)
    print(render_markdown(res))
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
