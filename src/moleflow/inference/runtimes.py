"""Exported ONNX and OpenVINO models, run by their own runtimes behind the call the torch formats have.

``model(images)`` takes (B, 3, S, S) normalised float32 images, a numpy array or a torch tensor, and returns
the outputs named in :data:`~moleflow.inference.pipeline.OUTPUTS`, in that order: numpy arrays for an array,
CPU tensors (on the input's device) for a tensor, so callers written for the TorchScript module work unchanged.

The runtimes are optional (``pip install 'moleflow[export]'``); they are imported only here, when a model of
their format is written or loaded, and a missing one is an error that says what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.inference.pipeline import OUTPUTS

INSTALL_HINT = "pip install 'moleflow[export]'"
INPUT_NAME = "images"
METADATA_KEY = "moleflow.json"  # the whole metadata as one JSON text (the other keys hold its top-level entries)
RT_INFO_SECTION = "moleflow"  # OpenVINO rt_info section that holds the metadata keys
# OpenVINO may pick bfloat16 on CPUs that have it; the parity check's tolerances are for float32
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
RUNTIME_PACKAGES = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),  # write (torch.onnx + onnxscript), check and run (onnxruntime)
    "openvino": ("onnx", "onnxscript", "openvino"),  # written through the ONNX graph, run by OpenVINO
}


def missing_packages(fmt: str, *, loading: bool = False) -> list[str]:
    """The packages ``fmt`` needs (to load it only: its runtime) that are not installed."""
    needed = RUNTIME_PACKAGES.get(fmt, ())
    if loading:
        needed = needed[-1:]
    return [name for name in needed if importlib.util.find_spec(name) is None]


class ExportError(RuntimeError):
    """The model cannot be exported (unsupported format) or the export failed its parity check.

    Defined with the runtimes so that the writers (:mod:`moleflow.inference.onnx_writers`) raise it too.
    """


def require_packages(fmt: str, error: type[Exception], *, loading: bool = False) -> None:
    """Raise ``error`` naming the missing packages and the install command, if ``fmt`` needs any."""
    missing = missing_packages(fmt, loading=loading)
    if missing:
        action = "Loading" if loading else "Exporting to"
        msg = f"{action} {fmt} needs the package(s) {', '.join(missing)}: {INSTALL_HINT}."
        raise error(msg)


def metadata_entries(metadata: dict[str, Any]) -> dict[str, str]:
    """Metadata as string entries (ONNX ``metadata_props``, OpenVINO ``rt_info``): each top-level entry as JSON.

    Separate entries so that a tool reading the file alone (``examples/onnx_predict.py``, Netron) finds the
    preprocessing and thresholds by name; ``moleflow.json`` holds the whole metadata for :func:`read_metadata`.
    """
    entries = {key: json.dumps(value) for key, value in metadata.items()}
    entries[METADATA_KEY] = json.dumps(metadata)
    return entries


class RuntimeModel:
    """Calls an ONNX Runtime session or an OpenVINO compiled model like the exported torch module.

    Args:
        run: numpy images (B, 3, S, S) float32 -> {output name: array} for every name in ``OUTPUTS``.
        runtime: what runs it, for messages ("onnxruntime 1.32 (CPUExecutionProvider)").
    """

    def __init__(self, run: Callable[[np.ndarray], dict[str, np.ndarray]], runtime: str) -> None:
        self._run = run
        self.runtime = runtime

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, Any]:
        as_tensor = isinstance(images, torch.Tensor)
        array = images.detach().cpu().numpy() if as_tensor else np.asarray(images)
        if array.ndim != 4 or array.shape[1] != 3:
            msg = f"Expected (B, 3, S, S) normalised images, got shape {tuple(array.shape)}."
            raise ValueError(msg)
        out = self._run(np.ascontiguousarray(array, dtype=np.float32))
        if not as_tensor:
            return {name: out[name] for name in OUTPUTS}
        return {name: torch.from_numpy(np.ascontiguousarray(out[name])).to(images.device) for name in OUTPUTS}

    def __repr__(self) -> str:
        return f"RuntimeModel({self.runtime})"


def load_onnx(path: Path, device: str | torch.device = "cpu") -> tuple[RuntimeModel, dict[str, Any]]:
    """An ONNX Runtime session of ``path`` (CPU, or CUDA for a CUDA device) and the file's metadata."""
    require_packages("onnx", ImportError, loading=True)
    ort = importlib.import_module("onnxruntime")
    kind = torch.device(device).type
    providers = ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            msg = "This onnxruntime has no CUDA provider: install onnxruntime-gpu, or load with device='cpu'."
            raise ImportError(msg)
        providers = ["CUDAExecutionProvider", *providers]
    elif kind != "cpu":
        msg = f"ONNX models run on cpu or cuda here, not {device!r}."
        raise ValueError(msg)
    session = ort.InferenceSession(str(path), providers=providers)
    names = [o.name for o in session.get_outputs()]
    _check_names(names, path)
    props = session.get_modelmeta().custom_metadata_map

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))

    runtime = f"onnxruntime {ort.__version__} ({session.get_providers()[0]})"
    return RuntimeModel(run, runtime), json.loads(props.get(METADATA_KEY, "{}"))


def load_openvino(path: Path, device: str | torch.device = "cpu") -> tuple[RuntimeModel, dict[str, Any]]:
    """An OpenVINO compiled model of ``path`` (its ``.bin`` beside it), in float32, and the file's metadata.

    ``device``: "cpu", or an OpenVINO device name ("GPU", "NPU", "AUTO").
    """
    require_packages("openvino", ImportError, loading=True)
    ov = importlib.import_module("openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    metadata = {}
    if model.has_rt_info([RT_INFO_SECTION, METADATA_KEY]):
        metadata = json.loads(model.get_rt_info([RT_INFO_SECTION, METADATA_KEY]).astype(str))
    target = str(device).upper() if str(device) != "cpu" else "CPU"
    compiled = core.compile_model(model, target, OPENVINO_CONFIG)
    ports = compiled.outputs
    # an output's first name can be an internal one (``_to_copy_3``); the OUTPUTS name is among its names
    names = [next((n for n in port.get_names() if n in OUTPUTS), port.get_any_name()) for port in ports]
    _check_names(names, path)
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({INPUT_NAME: images})
        return {name: restore_infinities(np.array(result[port])) for name, port in zip(names, ports, strict=True)}

    return RuntimeModel(run, f"openvino {ov.__version__} ({target}, f32)"), metadata


def restore_infinities(values: np.ndarray) -> np.ndarray:
    """OpenVINO turns infinite float64 constants (a threshold of "none") into +-float32 max: make them inf again.

    Lossless: OpenVINO computes in float32, where every finite result is below that magnitude.
    """
    if not np.issubdtype(values.dtype, np.floating):
        return values
    limit = np.finfo(np.float32).max
    return np.where(np.abs(values) >= limit, np.copysign(np.inf, values), values).astype(values.dtype)


def _check_names(names: list[str], path: Path) -> None:
    missing = [n for n in OUTPUTS if n not in names]
    if missing:
        msg = (
            f"{path} lacks the outputs {missing} this moleflow expects (it has {names}): it was exported by another "
            "moleflow version or is not a moleflow model. Export it again from its checkpoint."
        )
        raise ValueError(msg)
