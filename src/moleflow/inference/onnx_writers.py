"""Writing the routed model as ONNX (``torch.export`` + ``torch.onnx``'s dynamo exporter) and OpenVINO IR (converted
from that ONNX graph). The module written is :class:`~moleflow.inference.export.ExportableMoLEFlow`; checking and
metadata are :mod:`moleflow.inference.export`'s.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moleflow.inference.pipeline import OUTPUTS
from moleflow.inference.runtimes import INPUT_NAME, RT_INFO_SECTION, ExportError, metadata_entries


def batch_dim() -> dict[int, Any]:
    """The free batch dimension of the exported input (B in (B, 3, S, S))."""
    return {0: torch.export.Dim("batch", min=1)}


def _onnx_program(module: nn.Module, example: Tensor, metadata: dict[str, Any]) -> Any:
    """The module through ``torch.export`` and ``torch.onnx`` (dynamo), outputs named after OUTPUTS, metadata in."""
    module(example)  # fills the model's lazy caches (positional code) before export captures it
    with _quiet("onnxscript", "onnx_ir"):  # one INFO line per optimisation step otherwise
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUTS),
            dynamo=True,  # the TorchScript-based exporter fails on a conv whose weight is built in forward
            dynamic_shapes={INPUT_NAME: batch_dim()},
            verbose=False,
        )
    names = [value.name for value in program.model.graph.outputs]
    if names != list(OUTPUTS):
        msg = f"The ONNX graph's outputs are {names}, not OUTPUTS' {list(OUTPUTS)}."
        raise ExportError(msg)
    program.model.metadata_props.update(metadata_entries(metadata))
    return program


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def write_onnx(module: nn.Module, example: Tensor, target: Path, metadata: dict[str, Any]) -> None:
    # one self-contained file (weights inside): an external data file would not follow the rename
    _onnx_program(module, example, metadata).save(str(target), external_data=False)


def write_openvino(module: nn.Module, example: Tensor, target: Path, metadata: dict[str, Any]) -> None:
    """OpenVINO IR (``target`` .xml + .bin, float32 weights) converted from the module's ONNX graph."""
    ov = importlib.import_module("openvino")
    onnx_file = target.with_suffix(".onnx")
    try:
        write_onnx(module, example, onnx_file, metadata)
        model = ov.convert_model(str(onnx_file))
    finally:
        onnx_file.unlink(missing_ok=True)
    for key, value in metadata_entries(metadata).items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])
    ov.save_model(model, str(target), compress_to_fp16=False)  # the default halves the weights
