"""Export the whole routed multi-task model (backbone, router, adapters, mixer, flow with experts, DIA,
scoring, thresholds) as one file that runs without moleflow, timm or Lightning installed.

**Format: TorchScript (default, ``.pt``), or a ``torch.export`` program (``.pt2``).** TorchScript needs
nothing beyond PyTorch itself (ONNX export needs the ``onnx``/``onnxscript`` packages and checking it
needs ``onnxruntime``, none of which this project depends on), it loads with ``torch.jit.load`` in Python
*and* in C++ (libtorch) with no Python at all, and it keeps the router's float64 Mahalanobis arithmetic
exactly. PyTorch 2.9+ marks TorchScript as deprecated in favour of ``torch.export``; the same module
exports as a ``.pt2`` program too (``format="pt2"``, loaded with ``torch.export.load(...).module()``),
which is the path forward. ONNX is refused with that explanation.

**One flow.** The exported module is the detector's own :class:`~moleflow.inference.pipeline.RoutedPipeline`
(backbone, router, the model's flow layers, scoring, verdicts) with the thresholds baked in as buffers,
traced or ``torch.export``ed as it is: there is no export-only copy of any layer, so every layer the
model is built from (every ablation variant, the feature standardizer, any backbone embedding) exports
without export code of its own. The Python model routes per image and then runs the flow once per
distinct task, a branch on values that a tracer would freeze to the example's tasks; the exported
pipeline instead visits every task (``every_task=True``) and runs each over its own images only
(index select, flow, index copy), which is tensor ops alone and computes the same values. A task with
no image in the batch costs one pass over an empty batch.

**Trust.** An exported file is a program, not data: loading it runs what it holds. :func:`load_exported` uses
only each format's own loader (``torch.jit.load``, ``torch.export.load``); load files from trusted sources only.

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
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD
from moleflow.inference.pipeline import OUTPUTS, RoutedPipeline
from moleflow.utils.files import atomic_write_text, json_safe, unique_temporary

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "pt2")
SCORE_RTOL = 1e-4  # relative tolerance of exported vs Python image scores and maps (float32 reassociation)
SCORE_ATOL = 1e-3  # absolute tolerance in nats, for values near zero
METADATA_NAME = "moleflow.json"


class ExportError(RuntimeError):
    """The model cannot be exported (unsupported format) or the export failed its parity check."""


class ExportableMoLEFlow(nn.Module):
    """Images (B, 3, S, S), normalised -> the outputs listed in ``OUTPUTS``; backbone and thresholds included.

    Args:
        pipeline: the routed pipeline (built with ``every_task=True`` so that it traces).
        score_thresholds, route_thresholds: one per task; ``inf`` where there is none.
        score_medians: one per task, the normalised score's 0 (NaN where none: normalised scores are NaN);
            default NaN for every task.
        pixel_thresholds: one per task (``inf`` where none: no defect mask); default ``inf`` for every task.
    """

    def __init__(
        self,
        pipeline: RoutedPipeline,
        score_thresholds: Sequence[float],
        route_thresholds: Sequence[float],
        score_medians: Sequence[float] | None = None,
        pixel_thresholds: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not pipeline.every_task:
            msg = "The exported pipeline must visit every task (RoutedPipeline(..., every_task=True))."
            raise ExportError(msg)
        self.pipeline = pipeline
        device = next(iter(pipeline.model.router.buffers())).device
        n = len(score_thresholds)
        medians = score_medians if score_medians is not None else [math.nan] * n
        pixels = pixel_thresholds if pixel_thresholds is not None else [math.inf] * n
        for name, values in (
            ("score_thresholds", score_thresholds),
            ("route_thresholds", route_thresholds),
            ("score_medians", medians),
            ("pixel_thresholds", pixels),
        ):
            self.register_buffer(name, torch.tensor([float(v) for v in values], dtype=torch.float64, device=device))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.pipeline(
            images, self.score_thresholds, self.route_thresholds, self.score_medians, self.pixel_thresholds
        )


def export_metadata(
    fmt: str,
    *,
    source_checkpoint: str | None,
    task_names: Sequence[str],
    image_size: int,
    score_top_k: int,
    pixel_sigma: float,
    score_thresholds: Mapping[str, float | None],
    route_thresholds: Mapping[str, float | None],
    calibration_notes: list[str],
    score_medians: Mapping[str, float | None] | None = None,
    pixel_thresholds: Mapping[str, float | None] | None = None,
) -> dict[str, Any]:
    """The metadata stored in (and next to) an exported file."""
    return json_safe(
        {
            "format": fmt,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source_checkpoint": source_checkpoint,
            "task_names": list(task_names),
            "input": {
                "shape": ["B", 3, image_size, image_size],
                "dtype": "float32",
                "preprocessing": "RGB (grey replicated, alpha dropped), bilinear resize to S x S, /255, "
                "then (x - mean) / std per channel",
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "outputs": OUTPUTS,
            "score_top_k": score_top_k,
            "pixel_sigma": pixel_sigma,
            "score_thresholds": dict(score_thresholds),
            "route_thresholds": dict(route_thresholds),
            "score_medians": dict(score_medians or {}),
            "pixel_thresholds": dict(pixel_thresholds or {}),
            "calibration_notes": calibration_notes,
            "tolerance": {"score_rtol": SCORE_RTOL, "score_atol": SCORE_ATOL, "routed_tasks": "identical"},
        }
    )


def write_export(
    module: ExportableMoLEFlow,
    path: str | Path,
    metadata: dict[str, Any],
    reference: Callable[[Tensor], dict[str, Tensor]],
    format: str = "torchscript",  # noqa: A002 - the public API's word
    check_images: Tensor | None = None,
) -> Path:
    """Trace or ``torch.export`` ``module`` to ``path`` (plus ``path.json`` metadata), then verify the file.

    :meth:`MoLEFlowDetector.export <moleflow.inference.detector.MoLEFlowDetector.export>` is the usual way in.

    Args:
        module: the pipeline with its thresholds, in eval mode on its device.
        path: output file (``.pt`` for TorchScript, ``.pt2`` for torch.export by convention).
        metadata: stored inside the file and next to it (:func:`export_metadata`).
        reference: the Python computation the file must reproduce (the detector's ``run_batch``).
        format: "torchscript" or "pt2".
        check_images: (B, 3, S, S) normalised images for the parity check; default: seeded noise images.

    Raises:
        ExportError: unsupported format, or the exported model disagrees with the reference.
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
    device = module.score_thresholds.device
    s = module.pipeline.image_size
    if check_images is None:
        gen = torch.Generator().manual_seed(0)
        check_images = torch.randn(3, 3, s, s, generator=gen)
    check_images = check_images.to(device, torch.float32)
    # two images: torch.export would specialise the batch size to a single example's 1
    example = check_images[:2] if check_images.shape[0] >= 2 else check_images.repeat(2, 1, 1, 1)
    meta = metadata
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
                module(example)  # fills the model's lazy caches (positional code) before export captures it
                batch = torch.export.Dim("batch", min=1)
                program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
                torch.export.save(program, str(tmp), extra_files=extra)
        _check_parity(reference, tmp, fmt, check_images)
        tmp.replace(path)
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001 - tracing fails in many ways; name the model part and the fix
        tmp.unlink(missing_ok=True)
        msg = f"Exporting to {fmt} failed ({type(err).__name__}: {err}). Try the other format ({EXPORT_FORMATS})."
        raise ExportError(msg) from err
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=2))
    log.info("Exported %d-task model to %s (%s).", len(meta["task_names"]), path, fmt)
    return path


def exported_format(path: Path) -> str:
    """The format of an exported file: "pt2" (torch.export) or "torchscript", by suffix, else by its entries."""
    if path.suffix == ".pt2":
        return "pt2"
    if path.suffix == ".pt":
        return "torchscript"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        msg = f"{path} is not an exported moleflow model (not a zip archive: {err})."
        raise ValueError(msg) from err
    return "pt2" if any("serialized_exported_program" in n for n in names) else "torchscript"


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load an exported model with its runtime's own loader; returns (callable module, metadata).

    An exported model is a program: loading it runs what it holds. Load only files from a source you trust
    (your own export, or one whose SHA-256 its maker published and you checked). TorchScript files go to
    ``torch.jit.load`` and ``.pt2`` programs to ``torch.export.load``, chosen by the file's format, never
    by trying one loader after the other; moleflow never unpickles them itself.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Exported model {path} does not exist."
        raise FileNotFoundError(msg)
    extra = {METADATA_NAME: ""}
    fmt = exported_format(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        if fmt == "torchscript":
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        else:
            program = torch.export.load(str(path), extra_files=extra)
            module = program.module().to(device)
    return module, json.loads(extra[METADATA_NAME] or "{}")


def _check_parity(reference: Callable[[Tensor], dict[str, Tensor]], path: Path, fmt: str, images: Tensor) -> None:
    """Compare the written file with the Python computation on ``images``; raise ExportError on disagreement."""
    module, _ = load_exported(path, images.device)
    with torch.no_grad():
        got = module(images)
        ref = reference(images)
    if not torch.equal(got["task"].cpu(), ref["task"].cpu()):
        msg = f"Exported {fmt} model routes differently from Python: {got['task'].tolist()} vs {ref['task'].tolist()}."
        raise ExportError(msg)
    for key in ("score", "anomaly_map"):
        if not torch.allclose(got[key].cpu(), ref[key].cpu(), rtol=SCORE_RTOL, atol=SCORE_ATOL):
            diff = (got[key].cpu() - ref[key].cpu()).abs().max().item()
            msg = f"Exported {fmt} model's {key} differs from Python by up to {diff:.3g} (beyond rtol {SCORE_RTOL})."
            raise ExportError(msg)
