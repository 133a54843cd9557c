"""Images per second of the Python detector and of its exported files, side by side on the same batch.

    python -m experiments.benchmark.exported CKPT [--batch 8] [--repeats 5] [--threads N]
        [--formats torchscript,onnx,openvino]

The checkpoint is exported to a temporary folder in each format (each export checks its own parity), then the
Python detector (``run_batch``), TorchScript, ONNX Runtime and OpenVINO run the same seeded batch of normalised
images in one process: one untimed run each, then ``repeats`` rounds that time every runtime once in turn (a
change in machine load hits all alike). Reported: the median per runtime as images/s, with the largest score
difference to the Python model, as a Markdown table with the machine it ran on. PyTorch runs with ``--threads``
(default: every logical core); ONNX Runtime and OpenVINO with their own defaults (every physical / logical core).
Formats whose packages are not installed are listed as skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark.measure import machine_info, sync
from moleflow.inference import MoLEFlowDetector, load_exported
from moleflow.inference.runtimes import missing_packages

FORMATS = ("torchscript", "onnx", "openvino")
RUNTIME_NAMES = {
    "torchscript": "TorchScript",
    "pt2": "torch.export (pt2)",
    "onnx": "ONNX Runtime",
    "openvino": "OpenVINO",
}


def export_all(detector: MoLEFlowDetector, directory: Path, formats: Sequence[str]) -> tuple[dict[str, Path], dict]:
    """Export ``detector`` in each format whose packages are installed: ({format: file}, {format: skip reason})."""
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for fmt in formats:
        missing = missing_packages(fmt)
        if missing:
            skipped[fmt] = f"not installed: {', '.join(missing)}"
            continue
        started = time.perf_counter()
        files[fmt] = detector.export(directory / "model", format=fmt)
        print(f"exported {fmt} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return files, skipped


def measure(
    detector: MoLEFlowDetector, images: torch.Tensor, files: Mapping[str, Path], repeats: int = 5
) -> list[dict[str, Any]]:
    """Median images/s of the Python detector and of each exported file on ``images``, timed in turns."""
    runners: dict[str, Callable[[torch.Tensor], Any]] = {"Python (eager)": detector.run_batch}
    for fmt, path in files.items():
        module, _ = load_exported(path)
        runners[RUNTIME_NAMES[fmt]] = module
    reference = detector.run_batch(images)
    outputs = {}
    with torch.no_grad():
        for name, run in runners.items():  # the untimed first run: allocations, graph compilation
            outputs[name] = run(images)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(max(1, repeats)):
            for name, run in runners.items():
                started = time.perf_counter()
                run(images)
                sync(detector.device)
                times[name].append(time.perf_counter() - started)
    rows = []
    for name, runs in times.items():
        out = outputs[name]
        median = statistics.median(runs)
        rows.append(
            {
                "runtime": name,
                "images_per_s": images.shape[0] / median,
                "median_ms_per_batch": 1e3 * median,
                "max_abs_score_diff": float(
                    (torch.as_tensor(out["score"]).cpu() - reference["score"].cpu()).abs().max()
                ),
                "same_tasks": bool(torch.equal(torch.as_tensor(out["task"]).cpu().long(), reference["task"].cpu())),
            }
        )
    return rows


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def markdown(rows: Sequence[Mapping[str, Any]], batch: int, skipped: Mapping[str, str] | None = None) -> str:
    """The figures as a Markdown table, with the machine and the runtime versions."""
    m = machine_info(torch.device("cpu"))
    lines = [
        f"Batch of {batch} images, median of the timed rounds; PyTorch with {torch.get_num_threads()} threads, "
        "ONNX Runtime and OpenVINO with their default threads.",
        "",
        "| runtime | images/s | ms per batch | max abs score diff to Python | same tasks |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['images_per_s']:.1f} | {r['median_ms_per_batch']:.1f} | "
            f"{r['max_abs_score_diff']:.2g} | {'yes' if r['same_tasks'] else 'NO'} |"
        )
    for fmt, reason in (skipped or {}).items():
        lines.append(f"| {RUNTIME_NAMES[fmt]} | skipped ({reason}) | | | |")
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "onnxruntime", "openvino"))
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}, "
        f"{m['platform']}, Python {m['python']}; {versions}; load average at start {m['load_average_start']}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Images/s of the Python detector and its exported files.")
    parser.add_argument("ckpt", type=Path, help="a training checkpoint (or its calibrated copy)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from {FORMATS} and pt2")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: every logical core)")
    parser.add_argument("--allow-unverified", action="store_true", help="a checkpoint without integrity record")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    detector = MoLEFlowDetector.load(args.ckpt, auto_calibrate=False, allow_unverified=args.allow_unverified)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, detector.image_size, detector.image_size, generator=gen)
    with tempfile.TemporaryDirectory() as work:
        files, skipped = export_all(detector, Path(work), [f.strip() for f in args.formats.split(",") if f.strip()])
        rows = measure(detector, images, files, args.repeats)
    print(markdown(rows, args.batch, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
