"""PIPED (paper impurities, Bianconi et al. 2014) as two continual tasks, one per lighting mode.

Real RGB patches (128x128 px, about 370 dpi) of 12 paper types, each with 48 defect-free patches and 48
patches showing impurities, with pixel masks. The layout of a git clone of https://github.com/bianconif/PIPED is

    ROOT/data/PA_<TYPE>_<TL|RL>/NoDefects/PA_<TYPE>_<L>_S_ND_<n>_<k>.bmp       defect-free patches
    ROOT/data/PA_<TYPE>_<TL|RL>/Defects/PA_<TYPE>_<L>_S_D_<n>_<k>.bmp          patches with impurities
    ROOT/data/PA_<TYPE>_<TL|RL>/Defects/GroundThruth/PA_<TYPE>_<L>_S_GT_<n>_<k>.bmp   their masks
                                                  (the folder is spelt GroundTruth for some types)

TL types were photographed in transmitted light, RL types in reflected light; 48 normals per type are too
few for a task, so the types of one lighting mode are pooled: task ``piped_tl`` (7 types, 336 normal and 336
defective patches) and ``piped_rl`` (5 types, 240 and 240). A normal image is a NoDefects patch: the data
set's authors cut those from areas without impurities. Patch k of photograph n are adjacent tiles of one
photograph, so photographs, not patches, are held out: a seeded share of the (type, n) groups of normal
patches goes to test whole; every defective patch is tested. The folder PU_PNG01_TL (40 patches of another
paper, normals only, no masks) is not read.

The masks are 1-bit images with the impurity in black, so they are inverted into 0/255 PNG masks under
ROOT/.moleflow_derived/piped-<key>/ (see :mod:`moleflow.data.derived`), once.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moleflow.data.derived import derived_folder, input_fingerprint
from moleflow.data.folder import check_fraction, check_seed
from moleflow.data.mvtec import check_category_names
from moleflow.data.subsets import split_groups
from moleflow.data.types import GOOD, CategorySplit, DatasetLayoutError, Sample

PIPED_TASKS: dict[str, str] = {"piped_tl": "TL", "piped_rl": "RL"}
"""Task name -> the lighting-mode suffix of the paper-type folders pooled into it."""
PIPED_URL = "https://github.com/bianconif/PIPED"
PIPED_VERSION = 1  # of the mask inversion: a change gives a new derived folder
PIPED_LAYOUT = (
    "Expected layout (a git clone of the PIPED repository):\n"
    "  ROOT/data/PA_<TYPE>_<TL|RL>/NoDefects/*_S_ND_<n>_<k>.bmp              defect-free patches\n"
    "  ROOT/data/PA_<TYPE>_<TL|RL>/Defects/*_S_D_<n>_<k>.bmp                 patches with impurities\n"
    "  ROOT/data/PA_<TYPE>_<TL|RL>/Defects/GroundThruth/*_S_GT_<n>_<k>.bmp   their masks (impurity black)\n"
    f"Get it with `git clone {PIPED_URL} data/piped` (about 100 MB) and set data.root to that folder."
)
_TYPE = re.compile(r"^PA_(?P<type>[A-Z0-9]+)_(?P<light>TL|RL)$")
_PATCH = re.compile(r"^PA_[A-Z0-9]+_(?:TL|RL)_S_(?P<kind>ND|D|GT)_(?P<n>\d+)_(?P<k>\d+)$")
_GT_DIRS = ("GroundThruth", "GroundTruth")


def _piped_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{PIPED_LAYOUT}"
    return DatasetLayoutError(msg)


def _patches(folder: Path, kind: str) -> dict[tuple[int, int], Path]:
    """The .bmp patches of one kind in a folder, keyed by (photograph n, patch k)."""
    found: dict[tuple[int, int], Path] = {}
    for path in sorted(folder.iterdir()):
        match = _PATCH.match(path.stem) if path.is_file() and path.suffix.lower() == ".bmp" else None
        if match and match.group("kind") == kind:
            found[(int(match.group("n")), int(match.group("k")))] = path
    return found


def _type_folders(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and _TYPE.match(p.name))


def _mask_dir(type_dir: Path) -> Path:
    for name in _GT_DIRS:
        if (type_dir / "Defects" / name).is_dir():
            return type_dir / "Defects" / name
    raise _piped_error(f"Missing mask folder {type_dir / 'Defects' / _GT_DIRS[0]} (or {_GT_DIRS[1]}).")


def _build_masks(folder: Path, pairs: list[tuple[Path, Path]]) -> dict[str, dict[str, Any]]:
    """Invert each (image, 1-bit mask) pair's mask into folder/masks/<stem>.png (impurity 255)."""
    (folder / "masks").mkdir()
    items: dict[str, dict[str, Any]] = {}
    for image, mask in pairs:
        try:
            with Image.open(image) as img, Image.open(mask) as msk:
                image_size = img.size
                values = np.asarray(msk.convert("L"))
        except (OSError, ValueError, SyntaxError) as err:
            msg = f"Cannot read mask {mask} (or its image {image}): {type(err).__name__}: {err}. Re-clone the data set."
            raise DatasetLayoutError(msg) from err
        if values.shape[::-1] != image_size:
            msg = (
                f"Mask {mask} is {values.shape[1]}x{values.shape[0]} px but its image {image} is "
                f"{image_size[0]}x{image_size[1]} px: a mask must have its image's size. Re-clone the data set."
            )
            raise DatasetLayoutError(msg)
        impurity = values < 128
        name = f"masks/{image.stem}.png"
        Image.fromarray(impurity.astype(np.uint8) * 255).save(folder / name)
        items[image.stem] = {"mask": name, "pixels": int(impurity.sum())}
    return items


def read_piped(root: Path | str, task: str) -> tuple[list[Sample], list[Sample]]:
    """(normal patches, defective patches with masks) of one lighting mode's paper types, sorted by type then name."""
    if task not in PIPED_TASKS:
        msg = f"Unknown PIPED task {task!r}: choose from {list(PIPED_TASKS)} (transmitted or reflected light)."
        raise ValueError(msg)
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _piped_error(f"PIPED root {root} {what}.")
    data_dir = root / "data"
    if not data_dir.is_dir():
        raise _piped_error(f"Missing folder {data_dir} (the paper-type folders).")
    light = PIPED_TASKS[task]
    types = [p for p in _type_folders(data_dir) if _TYPE.match(p.name).group("light") == light]
    if not types:
        raise _piped_error(f"No PA_<TYPE>_{light} folders in {data_dir}.")
    normals: list[Sample] = []
    defective: list[tuple[Path, Path, str]] = []
    for type_dir in types:
        paper = _TYPE.match(type_dir.name).group("type").lower()
        for sub in ("NoDefects", "Defects"):
            if not (type_dir / sub).is_dir():
                raise _piped_error(f"Missing folder {type_dir / sub}.")
        normals += [Sample(p, 0, GOOD, None) for p in _patches(type_dir / "NoDefects", "ND").values()]
        masks = _patches(_mask_dir(type_dir), "GT")
        for key, image in _patches(type_dir / "Defects", "D").items():
            if key not in masks:
                raise _piped_error(f"Defective patch {image} has no mask: expected ..._S_GT_{key[0]}_{key[1]}.bmp.")
            defective.append((image, masks[key], paper))
    pairs = [(image, mask) for image, mask, _ in defective]
    settings = {"inputs": input_fingerprint(root, [p for pair in pairs for p in pair])}
    folder, items = derived_folder(
        root, f"piped_{light.lower()}", PIPED_VERSION, settings, lambda out: _build_masks(out, pairs)
    )
    anomalous = [
        Sample(image, 1, paper, folder / items[image.stem]["mask"])
        for image, _, paper in defective
        if items[image.stem]["pixels"]
    ]
    empty = [image.name for image, _, _ in defective if not items[image.stem]["pixels"]]
    if empty:
        warnings.warn(
            f"Left out {len(empty)} PIPED patch(es) whose mask marks no pixel: {', '.join(empty[:5])}.",
            UserWarning,
            stacklevel=2,
        )
    return normals, anomalous


def piped_photograph(sample: Sample) -> str:
    """The paper type and photograph a patch was cut from: the group never split between train and test."""
    match = _PATCH.match(sample.image_path.stem)
    number = int(match.group("n")) if match else sample.image_path.stem
    return f"{sample.image_path.parent.parent.name}/{match.group('kind') if match else ''}{number}"


def piped_splits(
    root: Path | str,
    categories: Sequence[str] | None = None,
    test_group_fraction: float = 0.3,
    seed: int = 0,
) -> list[CategorySplit]:
    """PIPED as one task per lighting mode (``piped_tl``, ``piped_rl``; default both, in that order).

    Args:
        root: The clone's folder (holding data/PA_...).
        categories: Tasks among "piped_tl" (transmitted light) and "piped_rl" (reflected light), in task order.
        test_group_fraction: Seeded share of the photographs of normal patches held out for testing.
        seed: Seed of the split (stream keyed by the task name).

    Raises:
        DatasetLayoutError: The root, a folder or a mask is missing, or a mask is unreadable or mis-sized.
        ValueError: An unknown task name or a bad option value.
    """
    names = check_category_names(categories if categories is not None else list(PIPED_TASKS))
    unknown = [n for n in names if n not in PIPED_TASKS]
    if unknown:
        msg = f"Unknown PIPED task(s) {unknown}: choose from {list(PIPED_TASKS)} (transmitted or reflected light)."
        raise ValueError(msg)
    fraction = check_fraction(test_group_fraction, "test_group_fraction")
    seed = check_seed(seed)
    splits = []
    for task in names:
        normals, anomalous = read_piped(root, task)
        train, test = split_groups(task, normals, anomalous, piped_photograph, fraction, seed, f"piped/{task}")
        splits.append(CategorySplit(category=task, train=train, test=test, has_masks=True))
    return splits
