"""Export the whole routed multi-task model (backbone, router, adapters, mixer, flow with experts, DIA,
scoring, thresholds) as one file that runs without moleflow, timm or Lightning installed.

**Formats** (``EXPORT_FORMATS``, each with its suffix in ``EXPORT_SUFFIXES``):

* ``torchscript`` (default, ``.pt``): needs only PyTorch, loads with ``torch.jit.load`` in Python and in C++
  (libtorch) with no Python at all, and keeps the router's float64 arithmetic. PyTorch 2.9+ marks
  TorchScript as deprecated in favour of ``torch.export``;
* ``pt2`` (``.pt2``): a ``torch.export`` program (``torch.export.load(...).module()``), the path forward;
* ``onnx`` (``.onnx``): the ``torch.export`` graph translated by ``torch.onnx`` (dynamo exporter), for
  ONNX Runtime and every tool that reads ONNX; float64 is kept. Writing needs ``onnx`` and ``onnxscript``,
  checking needs ``onnxruntime`` (``pip install 'moleflow[export]'``);
* ``openvino`` (``.xml`` + ``.bin``): OpenVINO IR converted from that ONNX graph, float32 weights. Needs
  ``openvino``. OpenVINO's CPU plugin computes the float64 router in float32, so its tolerance is looser.

**One flow.** The exported module is the detector's own :class:`~moleflow.inference.pipeline.RoutedPipeline`
(backbone, router, the model's flow layers, scoring, verdicts) with the thresholds baked in as buffers,
traced or ``torch.export``ed as it is: there is no export-only copy of any layer, so every layer the
model is built from (every ablation variant, the feature standardizer, any backbone embedding) exports
without export code of its own. The Python model routes per image and then runs the flow once per
distinct task, a branch on values that a tracer would freeze to the example's tasks; the exported
pipeline instead visits every task (``every_task=True``) and runs each over its own images only
(index select, flow, index copy), which is tensor ops alone and computes the same values. A task with
no image in the batch costs one pass over an empty batch.

**Metadata.** Task names, preprocessing, thresholds, outputs and the parity tolerance travel inside the file
(TorchScript/pt2 extra file ``moleflow.json``, ONNX ``metadata_props``, OpenVINO ``rt_info``) and next to it
(``<file>.json``).

**Trust.** An exported file is a program, not data: loading it runs what it holds. :func:`load_exported` uses
only each format's own loader (``torch.jit.load``, ``torch.export.load``, an ONNX Runtime session, OpenVINO's
``read_model``), chosen by the file's format; load files from trusted sources only.

**Parity.** After writing, the file is loaded back and compared with the Python detector on probe images,
within the format's tolerance (:mod:`moleflow.inference.parity`), otherwise the export fails and nothing is
written.
Input: (B, 3, S, S) float32 images, RGB, resized to S and ImageNet-normalised (see the metadata); the batch
size is free.
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
from moleflow.inference.onnx_writers import batch_dim, write_onnx, write_openvino
from moleflow.inference.parity import TOLERANCES, parity_report
from moleflow.inference.pipeline import OUTPUTS, RoutedPipeline
from moleflow.inference.runtimes import (
    ExportError,
    load_onnx,
    load_openvino,
    require_packages,
)
from moleflow.utils.files import atomic_write_text, json_safe, unique_temporary

log = logging.getLogger(__name__)

EXPORT_SUFFIXES = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx", "openvino": ".xml"}
EXPORT_FORMATS = tuple(EXPORT_SUFFIXES)
METADATA_NAME = "moleflow.json"


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
        out = self.pipeline(
            images, self.score_thresholds, self.route_thresholds, self.score_medians, self.pixel_thresholds
        )
        return {name: out[name] for name in OUTPUTS}  # ONNX/OpenVINO outputs are named after OUTPUTS, in order


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
                "size": image_size,
                "channel_order": "RGB",
                "layout": "NCHW",
                "resize": "bilinear",
                "value_range": [0.0, 1.0],  # 8-bit pixels divided by 255, before the mean and std
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
            "tolerance": TOLERANCES[fmt].describe() if fmt in TOLERANCES else None,
        }
    )


def export_path(path: str | Path, format: str) -> Path:  # noqa: A002 - the public API's word
    """``path`` with the format's suffix added when it has none (``moleflow_model`` -> ``moleflow_model.onnx``).

    Raises:
        ExportError: unknown format, or a suffix the format cannot be loaded back from (another format's, or
            anything but ``.onnx``/``.xml`` for ONNX/OpenVINO, which are recognised by their suffix).
    """
    fmt = format.lower()
    if fmt not in EXPORT_FORMATS:
        msg = f"Unknown export format {format!r}; choose one of {EXPORT_FORMATS}."
        raise ExportError(msg)
    path = Path(path)
    wanted = EXPORT_SUFFIXES[fmt]
    if not path.suffix:
        return path.with_name(path.name + wanted)
    others = {s: f for f, s in EXPORT_SUFFIXES.items() if f != fmt}
    if path.suffix in others or (fmt in ("onnx", "openvino") and path.suffix != wanted):
        msg = (
            f"Export path {path} has the suffix {path.suffix!r}, but format {fmt!r} writes {wanted!r} files: "
            f"name it {path.with_suffix(wanted).name}, or give the path without a suffix."
        )
        raise ExportError(msg)
    return path


def write_export(
    module: ExportableMoLEFlow,
    path: str | Path,
    metadata: dict[str, Any],
    reference: Callable[[Tensor], dict[str, Tensor]],
    format: str = "torchscript",  # noqa: A002 - the public API's word
    check_images: Tensor | None = None,
) -> Path:
    """Write ``module`` to ``path`` in ``format`` (plus ``path.json`` metadata), then verify the file.

    :meth:`MoLEFlowDetector.export <moleflow.inference.detector.MoLEFlowDetector.export>` is the usual way in.
    The file is written under a temporary name, checked, and only then renamed onto ``path`` (OpenVINO: the
    ``.bin`` first, then the ``.xml`` that names it).

    Args:
        module: the pipeline with its thresholds, in eval mode on its device.
        path: output file; without a suffix the format's is added (:func:`export_path`).
        metadata: stored inside the file and next to it (:func:`export_metadata`).
        reference: the Python computation the file must reproduce (the detector's ``run_batch``).
        format: one of ``EXPORT_FORMATS``.
        check_images: (B, 3, S, S) normalised images for the parity check; default: seeded noise images.

    Raises:
        ExportError: unsupported format, a missing package, or the exported model disagrees with the reference.
    """
    fmt = format.lower()
    path = export_path(path, fmt)
    require_packages(fmt, ExportError)
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
    tmp = unique_temporary(path).with_suffix(path.suffix)  # unique per process; torch.export wants .pt2
    written = [tmp]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation notice
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if fmt == "torchscript":
                traced = torch.jit.trace(module, example, strict=False, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={METADATA_NAME: json.dumps(meta, indent=2)})
            elif fmt == "pt2":
                module(example)  # fills the model's lazy caches (positional code) before export captures it
                program = torch.export.export(module, (example,), dynamic_shapes={"images": batch_dim()})
                torch.export.save(program, str(tmp), extra_files={METADATA_NAME: json.dumps(meta, indent=2)})
            elif fmt == "onnx":
                write_onnx(module, example, tmp, meta)
            else:
                written.append(tmp.with_suffix(".bin"))
                write_openvino(module, example, tmp, meta)
        _check_parity(reference, tmp, fmt, check_images, module.route_thresholds)
        for part in reversed(written):  # OpenVINO: the weights first, then the .xml that names them
            part.replace(path.with_suffix(part.suffix))
    except ExportError:
        for part in written:
            part.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001 - tracing fails in many ways; name the model part and the fix
        for part in written:
            part.unlink(missing_ok=True)
        others = [f for f in EXPORT_FORMATS if f != fmt]
        msg = f"Exporting to {fmt} failed ({type(err).__name__}: {err}). Try another format ({others})."
        raise ExportError(msg) from err
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(meta, indent=2))
    log.info("Exported %d-task model to %s (%s).", len(meta["task_names"]), path, fmt)
    return path


def exported_format(path: Path) -> str:
    """The format of an exported file, by suffix (``EXPORT_SUFFIXES``), else by its first bytes / zip entries."""
    by_suffix = {suffix: fmt for fmt, suffix in EXPORT_SUFFIXES.items()}
    if path.suffix in by_suffix:
        return by_suffix[path.suffix]
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError as err:
        msg = f"Cannot read exported model {path}: {err}."
        raise ValueError(msg) from err
    if head.lstrip().startswith((b"<?xml", b"<net")):
        return "openvino"
    if not head.startswith(b"PK"):
        msg = (
            f"{path} is not an exported moleflow model (neither a TorchScript/pt2 zip archive nor OpenVINO XML); "
            "an ONNX model must end in .onnx."
        )
        raise ValueError(msg)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return "pt2" if any("serialized_exported_program" in n for n in names) else "torchscript"


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """Load an exported model with its runtime's own loader; returns (callable model, metadata).

    An exported model is a program: loading it runs what it holds. Load only files from a source you trust
    (your own export, or one whose SHA-256 its maker published and you checked). The loader is chosen by the
    file's format (:func:`exported_format`), never by trying one loader after the other, and moleflow never
    unpickles anything itself:

    * TorchScript: ``torch.jit.load``; ``.pt2``: ``torch.export.load(...).module()`` (torch modules);
    * ``.onnx``: an ONNX Runtime session, ``.xml``: an OpenVINO compiled model (float32), each wrapped in a
      :class:`~moleflow.inference.runtimes.RuntimeModel` that takes a numpy array or tensor (B, 3, S, S) and
      returns the OUTPUTS as arrays or tensors. They need ``pip install 'moleflow[export]'``.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Exported model {path} does not exist."
        raise FileNotFoundError(msg)
    fmt = exported_format(path)
    if fmt == "onnx":
        return load_onnx(path, device)
    if fmt == "openvino":
        return load_openvino(path, device)
    extra = {METADATA_NAME: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        if fmt == "torchscript":
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        else:
            program = torch.export.load(str(path), extra_files=extra)
            module = program.module().to(device)
    return module, json.loads(extra[METADATA_NAME] or "{}")


def _check_parity(
    reference: Callable[[Tensor], dict[str, Tensor]], path: Path, fmt: str, images: Tensor, route_thresholds: Tensor
) -> None:
    """Compare the written file with the Python computation on ``images``; raise ExportError on disagreement."""
    # ONNX Runtime and OpenVINO are checked on the CPU, which every installation of them runs on
    module, _ = load_exported(path, images.device if fmt in ("torchscript", "pt2") else "cpu")
    with torch.no_grad():
        got = module(images)
        ref = reference(images)
    tolerance = TOLERANCES[fmt]
    report = parity_report(got, ref, tolerance, route_thresholds)
    log.info("Parity of the %s export on %d probe images: %s", fmt, report["images"], report["errors"])
    if report["problems"]:
        rules = tolerance.describe()
        msg = (
            f"The exported {fmt} model disagrees with the Python model on the probe images: "
            + "; ".join(report["problems"])
            + f". Stated tolerance: scores and maps rtol {tolerance.score_rtol:g}, atol {tolerance.score_atol:g}; "
            f"distances rtol {tolerance.distance_rtol:g}, atol {tolerance.distance_atol:g}; {rules['routed_tasks']}; "
            f"{rules['verdicts']}. Nothing was written; try another format ({[f for f in EXPORT_FORMATS if f != fmt]})."
        )
        raise ExportError(msg)
