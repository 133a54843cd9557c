"""The data's core types, shared by every reader, the data module and prediction: a sample, a category's
train/test split, the name of normal images, the image file extensions read, and the layout error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Lower-case suffixes accepted as images (and masks); everything else in a folder is ignored."""

GOOD = "good"


class DatasetLayoutError(FileNotFoundError):
    """A folder, category or mask of the MVTec-style layout is missing or empty."""


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes:
        image_path: Path of the image file.
        label: 0 for normal, 1 for anomalous.
        defect_type: Name of the test sub-folder ("good" for normal images).
        mask_path: Ground-truth mask of an anomalous image; None for normal images.
        mask_threshold: Mask values above it mark the defect; None: the default of
            :func:`moleflow.data.images.load_mask` (any non-zero value; 127 for JPEG masks).
    """

    image_path: Path
    label: int
    defect_type: str
    mask_path: Path | None
    mask_threshold: float | None = None


@dataclass(frozen=True)
class CategorySplit:
    """Train (normal only) and test samples of one category, i.e. one continual task.

    `has_masks` is False for sources without pixel ground truth (e.g. ELPV), so that evaluation
    skips pixel metrics instead of scoring against all-zero masks.
    """

    category: str
    train: list[Sample]
    test: list[Sample]
    has_masks: bool = True
