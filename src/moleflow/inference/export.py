"""Export the whole routed multi-task model (backbone, router, adapters, mixer, flow with experts, DIA,
scoring, thresholds) as one file that runs without moleflow, timm or Lightning installed.

**Format: TorchScript (default, ``.pt``), or a ``torch.export`` program (``.pt2``).** TorchScript needs
nothing beyond PyTorch itself (ONNX export needs the ``onnx``/``onnxscript`` packages and checking it
needs ``onnxruntime``, none of which this project depends on), it loads with ``torch.jit.load`` in Python
*and* in C++ (libtorch) with no Python at all, and it keeps the router's float64 Mahalanobis arithmetic
exactly. PyTorch 2.9+ marks TorchScript as deprecated in favour of ``torch.export``; the same module
exports as a ``.pt2`` program too (``format="pt2"``, loaded with ``torch.export.load(...).module()``),
which is the path forward. ONNX is refused with that explanation.

**Why an export-only module.** The Python model routes per image and then runs the flow once per task,
selecting experts through ``ModuleDict`` look-ups: data-dependent Python control flow that a tracer
would freeze to the example's tasks. :class:`ExportableMoLEFlow` instead holds every task's parameters
stacked over tasks (experts as (T, r, in) / (T, out, r) LoRA factors, or (T, out, in) full copies;
adapters as (T, D); per-task convolutions as one grouped convolution) and runs each image through its
routed task with gathers and batched matmuls: pure tensor ops, no branch on values. LoRA experts are
kept low rank (not merged into T full weight copies), so the file is about as large as the checkpoint
and the arithmetic follows the Python model's order. Every ablation variant the model supports is
covered (expert_mode lora/full/none, base_sharing frozen/sequential/separate, DIA blocks, no scale
context, no spatial mixer, no adapter, no positional code); a model with a part this module does not
know is refused with a clear error.

**Parity.** After writing, the file is loaded back and compared with the Python detector on probe
images: routed tasks must be identical and image scores and maps equal within ``rtol=1e-4`` (plus
``atol=1e-3`` nats for values near zero), otherwise the export fails. Input: (B, 3, S, S) float32 images,
RGB, resized to S and ImageNet-normalised (see the metadata); the batch size is free.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD
from moleflow.inference.stacked_head import ExportError, RoutedFlowHead, check_exportable  # noqa: F401
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.utils.files import atomic_write_text, unique_temporary

if TYPE_CHECKING:
    from moleflow.inference.detector import MoLEFlowDetector

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "pt2")
SCORE_RTOL = 1e-4  # relative tolerance of exported vs Python image scores and maps (float32 reassociation)
SCORE_ATOL = 1e-3  # absolute tolerance in nats, for values near zero
METADATA_NAME = "moleflow.json"
OUTPUTS = {
    "task": "(B,) int64: routed (nearest) task index; names in metadata task_names",
    "routing_distance": "(B,) float64: squared Mahalanobis distance to the routed task",
    "distances": "(B, T) float64: squared Mahalanobis distance to every task",
    "score": "(B,) float32: image score, mean of the top-k patch NLLs of the routed task",
    "threshold": "(B,) float64: the routed task's score threshold (inf when not calibrated)",
    "is_unknown": "(B,) bool: distance to every task above that task's route threshold",
    "is_defective": "(B,) bool: score > threshold and not unknown",
    "nll_map": "(B, H, W) float32: per-patch NLL (non-finite values replaced per image)",
    "anomaly_map": "(B, S, S) float32: NLL map upsampled to the input size and Gaussian-smoothed",
    "nonfinite": "(B,) int64: patch values that were NaN/inf and replaced",
}


class ExportableMoLEFlow(nn.Module):
    """Images (B, 3, S, S), normalised -> the outputs listed in ``OUTPUTS``; backbone included."""

    def __init__(self, extractor: FeatureExtractor, head: RoutedFlowHead) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.head(self.extractor(images))


def build_exportable(detector: MoLEFlowDetector) -> ExportableMoLEFlow:
    """The export module of a detector, with its current thresholds (inf where there is none)."""
    scores = [math.inf if v is None else float(v) for v in detector.thresholds.values()]
    routes = [math.inf if v is None else float(v) for v in detector.route_thresholds.values()]
    head = RoutedFlowHead(
        detector.model,
        detector.grid,
        detector.image_size,
        detector.score_top_k,
        detector.pixel_sigma,
        scores,
        routes,
    )
    return ExportableMoLEFlow(detector.extractor, head).eval().to(detector.device)


def _metadata(detector: MoLEFlowDetector, fmt: str) -> dict[str, Any]:
    from moleflow.inference.calibration import json_safe

    cal = detector.calibration
    return json_safe(
        {
            "format": fmt,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source_checkpoint": str(detector.checkpoint) if detector.checkpoint else None,
            "task_names": list(detector.task_names),
            "input": {
                "shape": ["B", 3, detector.image_size, detector.image_size],
                "dtype": "float32",
                "preprocessing": "RGB (grey replicated, alpha dropped), bilinear resize to S x S, /255, "
                "then (x - mean) / std per channel",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "outputs": OUTPUTS,
            "score_top_k": detector.score_top_k,
            "pixel_sigma": detector.pixel_sigma,
            "score_thresholds": detector.thresholds,
            "route_thresholds": detector.route_thresholds,
            "calibration_notes": cal.notes() if cal is not None else ["not calibrated: no verdicts (threshold inf)"],
            "tolerance": {"score_rtol": SCORE_RTOL, "score_atol": SCORE_ATOL, "routed_tasks": "identical"},
        }
    )


def export_detector(
    detector: MoLEFlowDetector,
    path: str | Path,
    format: str = "torchscript",  # noqa: A002 - the public API's word
    check_images: Tensor | None = None,
) -> Path:
    """Write the exported model to ``path`` (plus ``path.json`` metadata) and verify it against Python.

    Args:
        detector: the loaded detector (its current thresholds are baked in).
        path: output file (``.pt`` for TorchScript, ``.pt2`` for torch.export by convention).
        format: "torchscript" or "pt2".
        check_images: (B, 3, S, S) normalised images for the parity check; default: seeded noise images.

    Raises:
        ExportError: unsupported format or model part, or the exported model disagrees with Python.
    """
    fmt = format.lower()
    if fmt == "onnx":
        msg = (
            "ONNX export is not supported: it needs the onnx/onnxscript packages (and onnxruntime to verify it), "
            "which moleflow does not depend on. Use format='torchscript' (loads in Python and C++ libtorch) or "
            "format='pt2' (torch.export)."
        )
        raise ExportError(msg)
    if fmt not in EXPORT_FORMATS:
        msg = f"Unknown export format {format!r}; choose one of {EXPORT_FORMATS}."
        raise ExportError(msg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = build_exportable(detector)
    s = detector.image_size
    if check_images is None:
        gen = torch.Generator().manual_seed(0)
        check_images = torch.randn(3, 3, s, s, generator=gen)
    check_images = check_images.to(detector.device, torch.float32)
    example = check_images[:2] if check_images.shape[0] >= 2 else check_images
    meta = _metadata(detector, fmt)
    extra = {METADATA_NAME: json.dumps(meta, indent=2)}
    tmp = unique_temporary(path).with_suffix(path.suffix)  # unique per process; torch.export wants .pt2
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if fmt == "torchscript":
                traced = torch.jit.trace(module, example, strict=False, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files=extra)
            else:
                batch = torch.export.Dim("batch", min=1)
                program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
                torch.export.save(program, str(tmp), extra_files=extra)
        _check_parity(detector, tmp, fmt, check_images)
        tmp.replace(path)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001 - tracing fails in many ways; name the model part and the fix
        tmp.unlink(missing_ok=True)
        msg = f"Exporting to {fmt} failed ({type(err).__name__}: {err}). Try the other format ({EXPORT_FORMATS})."
        raise ExportError(msg) from err
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=2))
    log.info("Exported %d-task model to %s (%s).", len(detector.task_names), path, fmt)
    return path


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load an exported model; returns (callable module, metadata). Needs only PyTorch."""
    path = Path(path)
    if not path.is_file():
        msg = f"Exported model {path} does not exist."
        raise FileNotFoundError(msg)
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception:  # noqa: BLE001 - not TorchScript: a torch.export program
            program = torch.export.load(str(path), extra_files=extra)
            module = program.module().to(device)
    return module, json.loads(extra[METADATA_NAME] or "{}")


def _check_parity(detector: MoLEFlowDetector, path: Path, fmt: str, images: Tensor) -> None:
    """Compare the written file with the Python detector on ``images``; raise ExportError on disagreement."""
    module, _ = load_exported(path, detector.device)
    with torch.no_grad():
        got = module(images)
        ref = detector.run_batch(images)
    if not torch.equal(got["task"].cpu(), ref["task"].cpu()):
        msg = f"Exported {fmt} model routes differently from Python: {got['task'].tolist()} vs {ref['task'].tolist()}."
        raise ExportError(msg)
    for key in ("score", "anomaly_map"):
        if not torch.allclose(got[key].cpu(), ref[key].cpu(), rtol=SCORE_RTOL, atol=SCORE_ATOL):
            diff = (got[key].cpu() - ref[key].cpu()).abs().max().item()
            msg = f"Exported {fmt} model's {key} differs from Python by up to {diff:.3g} (beyond rtol {SCORE_RTOL})."
            raise ExportError(msg)
