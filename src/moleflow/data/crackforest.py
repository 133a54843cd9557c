"""CrackForest (road-surface cracks, Shi et al. 2016) as one continual task of tiles cut from its photographs.

Real RGB photographs of urban asphalt (480x320 px), 118 of them with pixel annotations. The layout of a git
clone of https://github.com/cuilimeng/CrackForest-dataset is

    ROOT/image/NNN.jpg          the photographs (155; only the 118 with an annotation are read)
    ROOT/groundTruth/NNN.mat    MATLAB struct groundTruth.Segmentation: 1 background, 2.. annotated segments
    ROOT/seg/NNN.seg            the same annotation as text (not read)

Every annotated photograph shows cracks, so there is no normal image: each photograph is cut into square
tiles (``tile_size``, non-overlapping, from the top-left corner). A tile is normal when no annotated pixel
lies within ``margin`` pixels of it (its window widened by the margin on every side is clean); it is
defective, with its cropped mask, when it holds at least ``min_defect_pixels`` annotated pixels; a tile in
between (a crack just outside it, or a few pixels inside) is left out as ambiguous. Every segment other
than the background counts as defect; in three photographs of alligator cracking (093, 097, 101) that
includes the pavement enclosed by the cracks. Tiles of one photograph share its light and asphalt, so
photographs, not tiles, are held out: a seeded share goes to test whole
(:func:`moleflow.data.subsets.split_groups`); the crack tiles of the training photographs are left out.

Tiles and masks are written as PNG under ROOT/.moleflow_derived/crackforest-<key>/ (see
:mod:`moleflow.data.derived`), keyed by the tile settings, once per setting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image

from moleflow.data.derived import derived_folder, input_fingerprint
from moleflow.data.folder import check_fraction, check_seed
from moleflow.data.mvtec import one_task_name
from moleflow.data.subsets import split_groups
from moleflow.data.types import GOOD, CategorySplit, DatasetLayoutError, Sample

CRACKFOREST_TASK = "crackforest"
CRACKFOREST_DEFECT = "crack"
CRACKFOREST_URL = "https://github.com/cuilimeng/CrackForest-dataset"
CRACKFOREST_VERSION = 1  # of the tiling: a change gives a new derived folder
CRACKFOREST_LAYOUT = (
    "Expected layout (a git clone of the CrackForest repository):\n"
    "  ROOT/image/NNN.jpg         photographs of road surfaces\n"
    "  ROOT/groundTruth/NNN.mat   their annotations (struct groundTruth with field Segmentation, 1 = background)\n"
    f"Get it with `git clone {CRACKFOREST_URL} data/crackforest` (about 15 MB) and set data.root to that folder."
)
_NAME = re.compile(r"^(?P<photo>.+)_y(?P<y>\d+)_x(?P<x>\d+)$")


def _crackforest_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{CRACKFOREST_LAYOUT}"
    return DatasetLayoutError(msg)


def load_segmentation(path: Path) -> np.ndarray:
    """The annotated pixels (bool, H x W) of a groundTruth .mat file: every segment but the background (1)."""
    try:
        truth = scipy.io.loadmat(str(path))["groundTruth"]
        segmentation = np.asarray(truth[0, 0]["Segmentation"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        msg = (
            f"Cannot read the annotation {path}: {type(err).__name__}: {err}. Expected a MATLAB file with a struct "
            "groundTruth holding a field Segmentation (1 = background). Re-clone the data set."
        )
        raise DatasetLayoutError(msg) from err
    if segmentation.ndim != 2:
        raise _crackforest_error(f"The Segmentation of {path} has shape {segmentation.shape}: expected H x W.")
    return segmentation > 1


def cut_tiles(
    cracks: np.ndarray, tile_size: int, margin: int, min_defect_pixels: int
) -> list[tuple[int, int, int, int]]:
    """(y, x, label, crack pixels) of each kept tile of a photograph's crack map, row by row.

    Normal (0): no crack pixel in the tile widened by ``margin``; defective (1): at least ``min_defect_pixels``
    crack pixels in the tile; other tiles are left out.
    """
    height, width = cracks.shape
    tiles = []
    for y in range(0, height - tile_size + 1, tile_size):
        for x in range(0, width - tile_size + 1, tile_size):
            pixels = int(cracks[y : y + tile_size, x : x + tile_size].sum())
            near = cracks[max(0, y - margin) : y + tile_size + margin, max(0, x - margin) : x + tile_size + margin]
            if not near.any():
                tiles.append((y, x, 0, 0))
            elif pixels >= min_defect_pixels:
                tiles.append((y, x, 1, pixels))
    return tiles


def _build_tiles(folder: Path, pairs: list[tuple[Path, Path]], settings: dict[str, int]) -> list[dict[str, Any]]:
    """Cut each (photograph, annotation) pair into tiles: folder/tiles/<photo>_y<y>_x<x>.png (+ masks/ for cracks)."""
    (folder / "tiles").mkdir()
    (folder / "masks").mkdir()
    size = settings["tile_size"]
    items: list[dict[str, Any]] = []
    for image, annotation in pairs:
        cracks = load_segmentation(annotation)
        try:
            with Image.open(image) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:
            msg = f"Cannot read image {image}: {type(err).__name__}: {err}. Re-clone the data set."
            raise DatasetLayoutError(msg) from err
        if rgb.shape[:2] != cracks.shape:
            msg = (
                f"Annotation {annotation} is {cracks.shape[1]}x{cracks.shape[0]} px but its image {image} is "
                f"{rgb.shape[1]}x{rgb.shape[0]} px: they must have the same size. Re-clone the data set."
            )
            raise DatasetLayoutError(msg)
        for y, x, label, pixels in cut_tiles(cracks, size, settings["margin"], settings["min_defect_pixels"]):
            name = f"{image.stem}_y{y}_x{x}.png"
            Image.fromarray(rgb[y : y + size, x : x + size]).save(folder / "tiles" / name)
            mask = None
            if label:
                mask = f"masks/{name}"
                Image.fromarray(cracks[y : y + size, x : x + size].astype(np.uint8) * 255).save(folder / mask)
            items.append({"image": f"tiles/{name}", "mask": mask, "photo": image.stem, "pixels": pixels})
    return items


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return int(value)


def read_crackforest(
    root: Path | str, tile_size: int = 96, margin: int = 16, min_defect_pixels: int = 32
) -> tuple[list[Sample], list[Sample]]:
    """(normal tiles, crack tiles with masks) of a CrackForest clone, in photograph then tile order."""
    settings = {
        "tile_size": _check_int("tile_size", tile_size, 8),
        "margin": _check_int("margin", margin, 0),
        "min_defect_pixels": _check_int("min_defect_pixels", min_defect_pixels, 1),
    }
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _crackforest_error(f"CrackForest root {root} {what}.")
    image_dir, truth_dir = root / "image", root / "groundTruth"
    for folder, what in ((image_dir, "the photographs"), (truth_dir, "the annotations")):
        if not folder.is_dir():
            raise _crackforest_error(f"Missing folder {folder} ({what}).")
    annotations = sorted(p for p in truth_dir.iterdir() if p.is_file() and p.suffix.lower() == ".mat")
    if not annotations:
        raise _crackforest_error(f"No .mat annotations in {truth_dir}.")
    pairs = []
    for annotation in annotations:
        image = image_dir / f"{annotation.stem}.jpg"
        if not image.is_file():
            raise _crackforest_error(f"Annotation {annotation} has no photograph: expected {image}.")
        pairs.append((image, annotation))
    keyed = {**settings, "inputs": input_fingerprint(root, [p for pair in pairs for p in pair])}
    folder, items = derived_folder(
        root, CRACKFOREST_TASK, CRACKFOREST_VERSION, keyed, lambda out: _build_tiles(out, pairs, settings)
    )
    normals = [Sample(folder / t["image"], 0, GOOD, None) for t in items if t["mask"] is None]
    cracks = [Sample(folder / t["image"], 1, CRACKFOREST_DEFECT, folder / t["mask"]) for t in items if t["mask"]]
    return normals, cracks


def crackforest_photograph(sample: Sample) -> str:
    """The photograph a tile was cut from: the group never split between train and test."""
    match = _NAME.match(sample.image_path.stem)
    return match.group("photo") if match else sample.image_path.stem


def crackforest_splits(
    root: Path | str,
    categories: Sequence[str] | None = None,
    tile_size: int = 96,
    margin: int = 16,
    min_defect_pixels: int = 32,
    test_group_fraction: float = 0.25,
    seed: int = 0,
) -> list[CategorySplit]:
    """CrackForest tiles as one task (named ``categories[0]``, default "crackforest"), split by photograph.

    Args:
        root: The clone's folder (holding image/ and groundTruth/).
        categories: One task name; None gives "crackforest".
        tile_size: Side of the square tiles in pixels (non-overlapping).
        margin: A normal tile has no annotated pixel within this many pixels of it.
        min_defect_pixels: A defective tile has at least this many annotated pixels.
        test_group_fraction: Seeded share of the photographs held out for testing, all of their tiles.
        seed: Seed of the split (stream keyed by the task name).

    Raises:
        DatasetLayoutError: The root, a folder or a photograph is missing, or an annotation is unreadable.
        ValueError: More than one task name or a bad option value.
    """
    task = one_task_name(categories, CRACKFOREST_TASK, "CrackForest")
    fraction = check_fraction(test_group_fraction, "test_group_fraction")
    seed = check_seed(seed)
    normals, cracks = read_crackforest(root, tile_size, margin, min_defect_pixels)
    label = f"crackforest/{task}"
    train, test = split_groups(task, normals, cracks, crackforest_photograph, fraction, seed, label)
    return [CategorySplit(category=task, train=train, test=test, has_masks=True)]
