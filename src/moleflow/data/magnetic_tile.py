"""The public Magnetic Tile Defects data set (Huang et al.) in its own layout, as one continual task.

Real, third-party inspection images with pixel masks: grey crops of magnetic tile surfaces, 952
defect-free and 392 defective, five defect types. The layout of a git clone of
https://github.com/abin24/Magnetic-tile-defect-datasets. is

    ROOT/MT_<Kind>/Imgs/<name>.jpg     the image (grey, size varies per image)
    ROOT/MT_<Kind>/Imgs/<name>.png     its mask, same size (all zero for MT_Free)

with Kind = Free (defect-free) or Blowhole, Break, Crack, Fray, Uneven. The data set has no split, so a
seeded share of the defect-free images is held out for testing (as for ELPV). Each tile was photographed
under six lightings (file prefixes exp1..exp6) with unrelated file numbers, so a held-out normal image
may show a tile that training saw under another lighting; that helps every method alike.

Masks are checked at scan time: present and of the image's size. A defective image whose mask marks no
pixel (four "Uneven" images of the public release) is left out, with a warning naming it. The masks have
anti-aliased edges (values 1..254), so they are binarised at 127 rather than at any non-zero value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from moleflow.data.folder import check_fraction, check_seed
from moleflow.data.images import mask_marks_pixels
from moleflow.data.mvtec import one_task_name
from moleflow.data.subsets import by_name, split_pools
from moleflow.data.types import GOOD, CategorySplit, DatasetLayoutError, Sample

MT_TASK = "magnetic_tile"
MT_FREE = "Free"
MT_DEFECTS: tuple[str, ...] = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
MASK_THRESHOLD = 127.0  # the masks have anti-aliased edges (values 1..254): a pixel is defect if mostly so
MT_URL = "https://github.com/abin24/Magnetic-tile-defect-datasets."
MT_LAYOUT = (
    "Expected layout (a git clone of the Magnetic Tile Defects repository):\n"
    "  ROOT/MT_Free/Imgs/<name>.jpg            defect-free images\n"
    "  ROOT/MT_<Defect>/Imgs/<name>.jpg + .png defective images and their masks "
    f"(Defect = {', '.join(MT_DEFECTS)})\n"
    f"Get it with `git clone {MT_URL} data/magnetic_tile` (about 50 MB) and set data.root to that folder."
)


def _mt_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{MT_LAYOUT}"
    return DatasetLayoutError(msg)


def _images(folder: Path) -> list[Path]:
    """The .jpg images of an Imgs folder, sorted by name (masks are the .png files beside them)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and not p.name.startswith("."))


def _check_mask(image: Path, mask: Path) -> bool:
    """A defective image's mask must exist and have the image's size; returns whether it marks any pixel."""
    if not mask.is_file():
        raise _mt_error(f"Defective image {image} has no mask: expected {mask}.")
    return mask_marks_pixels(image, mask)


def read_magnetic_tile(root: Path | str, defects: Sequence[str] = MT_DEFECTS) -> tuple[list[Sample], list[Sample]]:
    """(defect-free samples, defective samples with masks) of a Magnetic Tile clone, each sorted by name."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _mt_error(f"Magnetic Tile root {root} {what}.")
    unknown = [d for d in defects if d not in MT_DEFECTS]
    if unknown:
        msg = f"Unknown Magnetic Tile defect type(s) {unknown}: choose from {list(MT_DEFECTS)}."
        raise ValueError(msg)
    free_dir = root / f"MT_{MT_FREE}" / "Imgs"
    if not free_dir.is_dir():
        raise _mt_error(f"Missing folder {free_dir} (the defect-free images).")
    normals = [Sample(p, 0, GOOD, None) for p in _images(free_dir)]
    if len(normals) < 2:
        raise _mt_error(f"{free_dir} holds {len(normals)} .jpg image(s); at least 2 defect-free images are needed.")
    anomalous: list[Sample] = []
    unmarked: list[Path] = []
    for defect in defects:
        folder = root / f"MT_{defect}" / "Imgs"
        if not folder.is_dir():
            raise _mt_error(f"Missing folder {folder} (images of defect type {defect}).")
        for image in _images(folder):
            mask = image.with_suffix(".png")
            if _check_mask(image, mask):
                anomalous.append(Sample(image, 1, defect.lower(), mask, mask_threshold=MASK_THRESHOLD))
            else:
                unmarked.append(image)
    if unmarked:  # 4 "Uneven" images of the public data set: a defect with no location cannot be scored per pixel
        names = ", ".join(p.name for p in unmarked[:5]) + (", ..." if len(unmarked) > 5 else "")
        warnings.warn(
            f"Left out {len(unmarked)} defective Magnetic Tile image(s) whose mask marks no pixel: {names}.",
            UserWarning,
            stacklevel=2,
        )
    if not anomalous:
        warnings.warn(f"No defective images under {root}: AUROC cannot be computed.", UserWarning, stacklevel=2)
    return by_name(normals), by_name(anomalous)


def magnetic_tile_splits(
    root: Path | str,
    categories: Sequence[str] | None = None,
    defects: Sequence[str] = MT_DEFECTS,
    test_normal_fraction: float = 0.25,
    seed: int = 0,
) -> list[CategorySplit]:
    """Magnetic Tile as one task (named ``categories[0]``, default "magnetic_tile") with pixel masks.

    Args:
        root: The clone's folder (holding MT_Free, MT_Blowhole, ...).
        categories: One task name (the data set is one product); None gives "magnetic_tile".
        defects: Defect types whose images go into the test split.
        test_normal_fraction: Seeded share of the defect-free images held out for testing.
        seed: Seed of the split (stream keyed by the task name). Caps on the split sizes are the
            DataModule's (``data.max_train_per_task``, ...).

    Raises:
        DatasetLayoutError: The root, a folder or a mask is missing, or a mask is unreadable or mis-sized.
        ValueError: More than one task name, an unknown defect type or a bad option value.
    """
    task = one_task_name(categories, MT_TASK, "Magnetic Tile")
    fraction = check_fraction(test_normal_fraction)
    seed = check_seed(seed)
    normals, anomalous = read_magnetic_tile(root, list(defects))
    train, test = split_pools(task, normals, anomalous, fraction, seed, f"magnetic_tile/{task}")
    return [CategorySplit(category=task, train=train, test=test, has_masks=True)]
