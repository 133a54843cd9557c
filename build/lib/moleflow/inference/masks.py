"""Where the defect is: the predicted defect mask in the original image's pixels, its area and bounding boxes.

The model marks pixels of its (S, S) anomaly map above the task's pixel threshold; a person wants them on the
image they gave. The mask is resized to the original (H, W) with nearest-neighbour (no new values), saved as
a black-and-white PNG, and described by its area (pixels) and one bounding box per connected region
(8-connectivity), ``[x_min, y_min, x_max, y_max]`` in original-image pixels, both ends included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.nn import functional as F


def mask_at_original(mask: torch.Tensor, original_hw: tuple[int, int] | None) -> np.ndarray:
    """(S, S) bool mask -> (H, W) bool array at the original size (nearest); the model's size when unknown."""
    if original_hw is None:
        return mask.cpu().numpy().astype(bool)
    up = F.interpolate(mask[None, None].float(), size=tuple(original_hw), mode="nearest")[0, 0]
    return up.cpu().numpy() > 0.5


def regions(mask: np.ndarray) -> tuple[int, list[list[int]]]:
    """(area in pixels, bounding boxes [x_min, y_min, x_max, y_max] of each connected region, largest first)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labelled), start=1):
        if found is None:
            continue
        rows, cols = found
        size = int((labelled[found] == index).sum())
        boxes.append((size, [int(cols.start), int(rows.start), int(cols.stop) - 1, int(rows.stop) - 1]))
    boxes.sort(key=lambda item: -item[0])
    return int(mask.sum()), [box for _, box in boxes[:count]]


def save_mask(mask: np.ndarray, path: Path) -> Path:
    """Write a (H, W) bool mask as an 8-bit PNG (255 = defect)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a (H, W) bool mask: inside it, with a neighbour outside (for drawing)."""
    if not mask.any():
        return mask
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), border_value=0)
