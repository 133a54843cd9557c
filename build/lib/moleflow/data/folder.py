"""A user's own image folders as continual tasks (MVTec layout or plain normal/abnormal folders).

Many inspection data sets come as "good" and "bad" folders without a fixed test split; this reader
holds out a seeded share of the normal images for testing so that such data needs no reshuffling
by hand. As with the MVTec reader, the whole layout is checked before any training starts.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moleflow.data.mvtec import (
    _find_mask,
    _list_images,
    _list_subfolders,
    check_category_names,
    scan_categories,
    scan_category,
)
from moleflow.data.types import GOOD, IMAGE_EXTENSIONS, CategorySplit, DatasetLayoutError, Sample

FOLDER_LAYOUTS: tuple[str, ...] = ("auto", "mvtec", "normal_abnormal")
NORMAL_DIR = "normal"
ABNORMAL_DIR = "abnormal"
MASKS_DIR = "masks"
ABNORMAL = "abnormal"
"""`Sample.defect_type` of the images of an `abnormal/` folder."""

FOLDER_EXPECTED_LAYOUTS = (
    "Accepted layouts (per category, chosen with `layout`, or detected when layout='auto'):\n"
    "  mvtec:            ROOT/CATEGORY/train/good/*.png\n"
    "                    ROOT/CATEGORY/test/<defect>/*.png   (test/good holds the normal test images)\n"
    "                    ROOT/CATEGORY/ground_truth/<defect>/<name>_mask.png\n"
    "  normal_abnormal:  ROOT/CATEGORY/normal/*.png          (defect-free; a share is held out for testing)\n"
    "                    ROOT/CATEGORY/abnormal/*.png        (defective, optional)\n"
    "                    ROOT/CATEGORY/masks/<name>_mask.png (optional; if present, one per abnormal image)"
)

# Seed-sequence codes that keep the random streams of one task apart.
STREAM_SPLIT, STREAM_TRAIN_SUBSET, STREAM_TEST_SUBSET, STREAM_VALIDATION = 0, 1, 2, 3


def _folder_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{FOLDER_EXPECTED_LAYOUTS}"
    return DatasetLayoutError(msg)


def check_fraction(test_normal_fraction: float, name: str = "test_normal_fraction") -> float:
    """Reject a held-out share (of normals, or of groups) outside (0, 1): both splits need normal images.

    ``name`` is the option named in the error (e.g. "test_group_fraction").
    """
    what = "normal images" if name == "test_normal_fraction" else "groups"
    if isinstance(test_normal_fraction, bool) or not isinstance(test_normal_fraction, int | float):
        msg = f"{name} must be a number in (0, 1) such as 0.25, got {test_normal_fraction!r}."
        raise TypeError(msg)
    value = float(test_normal_fraction)
    if not 0.0 < value < 1.0:
        msg = (
            f"{name} must be strictly between 0 and 1 (share of the {what} held out "
            f"for testing), got {test_normal_fraction!r}."
        )
        raise ValueError(msg)
    return value


def check_seed(seed: int) -> int:
    """Reject seeds numpy cannot use (bools, negatives, non-integers)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        msg = f"seed must be a non-negative int, got {seed!r}."
        raise ValueError(msg)
    return int(seed)


def task_rng(seed: int, task: str, stream: int) -> np.random.Generator:
    """Random stream of one task, keyed by its name so that a task's split ignores the task order."""
    return np.random.default_rng([seed, zlib.crc32(task.encode("utf-8")), stream])


def split_normals(
    normals: Sequence[Sample], test_normal_fraction: float, rng: np.random.Generator, task: str
) -> tuple[list[Sample], list[Sample]]:
    """Seeded train/test split of a task's normal images.

    round(fraction * n) of them (at least 1, at most n - 1, halves rounded up) go to test, so that
    both splits keep a normal image.

    Returns:
        (train, test), each in the order of `normals`.

    Raises:
        ValueError: Fewer than two normal images.
    """
    n = len(normals)
    if n < 2:
        msg = (
            f"Task '{task}' has {n} normal image(s): at least 2 are needed, one to train on and one to test "
            "the false-alarm rate. Add normal images."
        )
        raise ValueError(msg)
    n_test = min(n - 1, max(1, math.floor(test_normal_fraction * n + 0.5)))
    test_idx = set(rng.permutation(n)[:n_test].tolist())
    train = [s for i, s in enumerate(normals) if i not in test_idx]
    test = [s for i, s in enumerate(normals) if i in test_idx]
    return train, test


def _sub_folders(root: Path) -> list[str]:
    return [p.name for p in _list_subfolders(root)] if root.is_dir() else []


def _check_root(root: Path) -> None:
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _folder_error(f"Data-set root {root} {what}.")


def _all_categories(root: Path) -> list[str]:
    names = _sub_folders(root)
    if not names:
        raise _folder_error(f"Data-set root {root} has no category sub-folders (categories=None takes all of them).")
    return names


def _check_category_dir(root: Path, category: str) -> Path:
    cat_dir = root / category
    if not cat_dir.is_dir():
        present = _sub_folders(root)
        msg = (
            f"Category '{category}' not found: {cat_dir} is not a folder. "
            f"Categories present under {root}: {present or 'none'}."
        )
        raise _folder_error(msg)
    return cat_dir


def scan_normal_abnormal(
    root: Path | str, category: str, test_normal_fraction: float = 0.25, seed: int = 0
) -> CategorySplit:
    """Collect one category of the normal/abnormal layout, holding out a seeded share of normals for testing.

    Args:
        root: Data-set root holding one folder per category.
        category: Category folder name.
        test_normal_fraction: Share of the normal images that goes to the test split.
        seed: Seed of the split (the stream also depends on the category name).

    Returns:
        The category's samples: train = normals not held out; test = abnormal images then held-out
        normals (by folder, then file name). `has_masks` is True when a `masks/` folder exists.

    Raises:
        DatasetLayoutError: The category or its normal folder is missing or empty, or an abnormal
            image has no mask although a masks folder exists.
        ValueError: Fewer than two normal images.
    """
    fraction = check_fraction(test_normal_fraction)
    seed = check_seed(seed)
    root = Path(root)
    cat_dir = _check_category_dir(root, category)

    normal_dir = cat_dir / NORMAL_DIR
    if not normal_dir.is_dir():
        raise _folder_error(f"Missing folder {normal_dir} (defect-free images of '{category}').")
    normal_images = _list_images(normal_dir)
    if not normal_images:
        msg = f"No normal images in {normal_dir}: it holds no files with extensions {sorted(IMAGE_EXTENSIONS)}."
        raise _folder_error(msg)
    normals = [Sample(image_path=p, label=0, defect_type=GOOD, mask_path=None) for p in normal_images]
    train, test_normals = split_normals(normals, fraction, task_rng(seed, category, STREAM_SPLIT), category)

    abnormal_dir = cat_dir / ABNORMAL_DIR
    abnormal_images = _list_images(abnormal_dir) if abnormal_dir.is_dir() else []
    if not abnormal_images:
        warnings.warn(
            f"Category '{category}' has no abnormal images ({abnormal_dir} is missing or empty): its test "
            "split holds normal images only, so AUROC cannot be computed for it.",
            UserWarning,
            stacklevel=2,
        )

    mask_dir = cat_dir / MASKS_DIR
    has_masks = mask_dir.is_dir()
    abnormal: list[Sample] = []
    for image in abnormal_images:
        mask = _find_mask(mask_dir, image) if has_masks else None
        if has_masks and mask is None:
            msg = (
                f"Abnormal image {image} has no mask: expected {mask_dir / (image.stem + '_mask.png')} (or the "
                f"same name with another image extension, or without '_mask'). Since {mask_dir} exists, every "
                "abnormal image needs its mask: add it, or remove the masks folder to skip pixel metrics."
            )
            raise _folder_error(msg)
        abnormal.append(Sample(image_path=image, label=1, defect_type=ABNORMAL, mask_path=mask))
    return CategorySplit(category=category, train=train, test=[*abnormal, *test_normals], has_masks=has_masks)


def detect_layout(root: Path | str, category: str) -> str:
    """'mvtec' if the category has a `train/` folder, 'normal_abnormal' if it has `normal/`.

    Raises:
        DatasetLayoutError: The category is missing or has neither folder.
    """
    root = Path(root)
    cat_dir = _check_category_dir(root, category)
    if (cat_dir / "train").is_dir():
        return "mvtec"
    if (cat_dir / NORMAL_DIR).is_dir():
        return "normal_abnormal"
    msg = f"Cannot tell the layout of category '{category}': {cat_dir} has neither a 'train' nor a 'normal' folder."
    raise _folder_error(msg)


def folder_splits(
    root: Path | str,
    categories: Sequence[str] | None,
    layout: str = "auto",
    test_normal_fraction: float = 0.25,
    seed: int = 0,
) -> list[CategorySplit]:
    """Scan a user's category folders (the task sequence, in order) and validate all of them at once.

    Args:
        root: Data-set root holding one folder per category.
        categories: Category folder names in task order; None takes every sub-folder of root, sorted.
        layout: "mvtec", "normal_abnormal", or "auto" (detected per category).
        test_normal_fraction: Share of normals held out for testing (normal_abnormal layout only;
            the MVTec layout has its own test split).
        seed: Seed of that split.

    Raises:
        DatasetLayoutError: root or a category is missing, or a category's layout is broken.
        ValueError: Unknown layout, a category listed twice, an empty list, a bad fraction or seed.
    """
    if layout not in FOLDER_LAYOUTS:
        msg = f"Unknown folder layout {layout!r}: use one of {list(FOLDER_LAYOUTS)}.\n{FOLDER_EXPECTED_LAYOUTS}"
        raise ValueError(msg)
    fraction = check_fraction(test_normal_fraction)
    seed = check_seed(seed)
    root = Path(root)
    given = check_category_names(categories) if categories is not None else None
    _check_root(root)
    names = given if given is not None else _all_categories(root)
    if layout == "mvtec":
        return scan_categories(root, names)
    splits: list[CategorySplit] = []
    for name in names:
        kind = layout if layout != "auto" else detect_layout(root, name)
        if kind == "mvtec":
            splits.append(scan_category(root, name))
        else:
            splits.append(scan_normal_abnormal(root, name, test_normal_fraction=fraction, seed=seed))
    return splits
