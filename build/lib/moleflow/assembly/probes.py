"""Settings checked against the built backbone, before any task trains: the image size it accepts and the
real patch grid that the score's top-k and the positional router's cells depend on.

:func:`check_backbone_accepts` runs the frozen backbone once on a blank image of the configured size.
"""

from __future__ import annotations

from typing import Any

import torch

from moleflow.config.schema import JobConfig
from moleflow.models.feature_extractor import FeatureExtractor


def _suggested_size(image_size: int, largest: int) -> int:
    """A multiple of the largest stride, at least twice it, not below the requested size."""
    return max(2 * largest, -(-image_size // largest) * largest)


def check_backbone_accepts(extractor: FeatureExtractor, image_size: int) -> tuple[int, int]:
    """Run the frozen backbone once on a blank (1, 3, S, S) image; returns the real patch grid (H, W).

    Raises a ValueError naming ``data.image_size``, the backbone and its strides when the backbone fails
    on that size, the image is smaller than the largest stride (that layer's single cell is mostly
    padding), or any chosen layer's map or the patch grid comes out empty.
    """
    name = getattr(extractor, "name", type(extractor).__name__)
    strides = [int(r) for r in getattr(extractor, "reductions", [])]
    largest = max(strides, default=1)

    def failure(problem: str) -> ValueError:
        suggestion = _suggested_size(max(int(image_size), 1), largest)
        msg = (
            f"data.image_size={image_size} does not suit backbone {name!r} (strides {strides}): {problem}. "
            f"Set data.image_size to a multiple of the largest stride {largest}, at least {2 * largest} "
            f"(e.g. data.image_size={suggestion})."
        )
        return ValueError(msg)

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise failure("it must be a positive integer")
    if image_size < largest:
        raise failure("the image is smaller than the largest stride, so that layer sees a single padded cell")
    tensors = [*extractor.parameters(), *extractor.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    maps: list[torch.Tensor] = []

    def keep_maps(_module: torch.nn.Module, _inputs: Any, out: Any) -> None:
        maps.extend(out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else [out])

    backbone = getattr(extractor, "backbone", None)
    hook = backbone.register_forward_hook(keep_maps) if isinstance(backbone, torch.nn.Module) else None
    seen = getattr(extractor, "images_seen", None)  # a probe, not work: keep the extractor's image count
    try:
        with torch.no_grad():
            features = extractor(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as err:  # noqa: BLE001 - any failure of the backbone on this size is the user's setting
        raise failure(f"the backbone fails on a {image_size}x{image_size} image ({type(err).__name__}: {err})") from err
    finally:
        if hook is not None:
            hook.remove()
        if seen is not None:
            extractor.images_seen = seen
    for stride, fmap in zip(strides, maps, strict=False):
        if fmap.ndim != 4 or min(fmap.shape[-2:]) < 1:
            raise failure(f"the layer with stride {stride} gives an empty {tuple(fmap.shape[-2:])} map")
    if features.ndim != 4 or min(features.shape[1:3]) < 1:
        raise failure(f"the patch grid is empty ({tuple(features.shape[1:3])})")
    return int(features.shape[1]), int(features.shape[2])


def check_patch_grid_settings(cfg: JobConfig, grid: tuple[int, int]) -> None:
    """Settings that depend on the real patch grid (H, W) of :func:`check_backbone_accepts`, checked before
    any task trains: the score's top-k patches and the positional router's cells."""
    patches = grid[0] * grid[1]
    top_k = cfg.model.score.top_k
    if not 1 <= top_k <= patches:
        msg = f"score_top_k={top_k} must be between 1 and the patches per image ({grid[0]}x{grid[1]}={patches})."
        raise ValueError(msg)
    flow = cfg.model.flow
    if flow.router == "positional" and flow.router_grid > min(grid):
        msg = (
            f"model.flow.router_grid={flow.router_grid} is larger than the patch grid {grid[0]}x{grid[1]} at "
            f"data.image_size={cfg.data['image_size']}: set model.flow.router_grid to at most {min(grid)}, or a "
            "larger data.image_size."
        )
        raise ValueError(msg)
