"""KolektorSDD (surface cracks on electrical commutators, Tabernik et al. 2019) as one continual task.

Real grey images with pixel masks: 50 commutators ("parts"), each photographed as 8 non-overlapping
surfaces; 52 images show a crack in the plastic embedding. The layout of a git clone of
https://github.com/songpeixuan22/Unet-Defect-Detection-in-kolektorSSD (the same as the official download
from https://www.vicos.si/Downloads/KolektorSDD, which is also read) is

    ROOT/data/kosNN/PartK.jpg          the image (grey, 500 px wide, 1235..1285 px high)
    ROOT/data/kosNN/PartK_label.bmp    its mask, same size (palette BMP; all zero on a defect-free image)

An image whose mask marks no pixel is normal. The data set has no split, and the surfaces of one part look
much alike, so parts, not images, are held out: a seeded share of the kosNN folders goes to test whole
(:func:`moleflow.data.subsets.split_groups`). Every part has a defective image; those of the training parts
are left out (a part seen in training is never scored), about 60 % of them at the default share of 0.4.

Only the images directly in a kosNN folder are read. The mirror holds data/kos13/kos08/, a byte-identical
copy of data/kos08/; a nested folder that is such a copy is skipped, any other one is skipped with a warning.
"""

from __future__ import annotations

import filecmp
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from moleflow.data.folder import check_fraction, check_seed
from moleflow.data.images import mask_marks_pixels
from moleflow.data.mvtec import one_task_name
from moleflow.data.subsets import split_groups
from moleflow.data.types import GOOD, CategorySplit, DatasetLayoutError, Sample

KOLEKTOR_TASK = "kolektor"
KOLEKTOR_DEFECT = "crack"
KOLEKTOR_URL = "https://github.com/songpeixuan22/Unet-Defect-Detection-in-kolektorSSD"
KOLEKTOR_LAYOUT = (
    "Expected layout (a git clone of the KolektorSDD mirror, or the official KolektorSDD download):\n"
    "  ROOT/data/kosNN/PartK.jpg + PartK_label.bmp   image and mask (an all-zero mask: defect-free)\n"
    "  (ROOT may also be the folder holding the kosNN folders)\n"
    f"Get it with `git clone {KOLEKTOR_URL} data/kolektor` (about 210 MB) and set data.root to that folder."
)
_PART = re.compile(r"^kos\d+$")
_IMAGE = re.compile(r"^Part\d+\.jpg$")


def _kolektor_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{KOLEKTOR_LAYOUT}"
    return DatasetLayoutError(msg)


def _parts_dir(root: Path) -> Path:
    """The folder holding the kosNN folders: ROOT/data (a clone of the mirror) or ROOT itself."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _kolektor_error(f"KolektorSDD root {root} {what}.")
    for folder in (root / "data", root):
        if folder.is_dir() and any(p.is_dir() and _PART.match(p.name) for p in folder.iterdir()):
            return folder
    raise _kolektor_error(f"No kosNN part folders in {root / 'data'} or {root}.")


def _same_files(a: Path, b: Path) -> bool:
    """Whether two folders hold the same file names with byte-identical contents."""
    names_a = sorted(p.name for p in a.iterdir() if p.is_file())
    names_b = sorted(p.name for p in b.iterdir() if p.is_file())
    return names_a == names_b and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def _skip_nested(part: Path, parts_dir: Path) -> None:
    """Nested folders are never read; one that is not a byte-identical copy of a part is named in a warning."""
    for nested in sorted(p for p in part.iterdir() if p.is_dir() and not p.name.startswith(".")):
        original = parts_dir / nested.name
        if not (original.is_dir() and original != part and _same_files(nested, original)):
            warnings.warn(
                f"Skipped the nested folder {nested}: only the images directly in a kosNN folder are read.",
                UserWarning,
                stacklevel=3,
            )


def _mask_marks_pixels(image: Path, mask: Path) -> bool:
    """Check a mask (present, readable, of its image's size); returns whether it marks any pixel."""
    if not mask.is_file():
        raise _kolektor_error(f"Image {image} has no mask: expected {mask}.")
    return mask_marks_pixels(image, mask)


def read_kolektor(root: Path | str) -> tuple[list[Sample], list[Sample]]:
    """(normal samples, defective samples with masks) of a KolektorSDD folder, each sorted by part then image."""
    parts_dir = _parts_dir(Path(root))
    normals: list[Sample] = []
    anomalous: list[Sample] = []
    parts = sorted(p for p in parts_dir.iterdir() if p.is_dir() and _PART.match(p.name))
    for part in parts:
        _skip_nested(part, parts_dir)
        images = sorted((p for p in part.iterdir() if p.is_file() and _IMAGE.match(p.name)), key=_part_number)
        if not images:
            raise _kolektor_error(f"Part folder {part} holds no PartK.jpg images.")
        for image in images:
            mask = image.with_name(f"{image.stem}_label.bmp")
            if _mask_marks_pixels(image, mask):
                anomalous.append(Sample(image, 1, KOLEKTOR_DEFECT, mask))
            else:
                normals.append(Sample(image, 0, GOOD, None))
    if not anomalous:
        warnings.warn(f"No defective images under {parts_dir}: AUROC cannot be computed.", UserWarning, stacklevel=2)
    return normals, anomalous


def _part_number(path: Path) -> int:
    return int(path.stem.removeprefix("Part"))


def kolektor_part(sample: Sample) -> str:
    """The part (kosNN folder) an image shows: the group that is never split between train and test."""
    return sample.image_path.parent.name


def kolektor_splits(
    root: Path | str,
    categories: Sequence[str] | None = None,
    test_group_fraction: float = 0.4,
    seed: int = 0,
) -> list[CategorySplit]:
    """KolektorSDD as one task (named ``categories[0]``, default "kolektor") with pixel masks, split by part.

    Args:
        root: The clone's folder (holding data/kos01, ...), or the folder holding the kosNN folders.
        categories: One task name (the data set is one product); None gives "kolektor".
        test_group_fraction: Seeded share of the parts held out for testing, all of their images.
        seed: Seed of the split (stream keyed by the task name).

    Raises:
        DatasetLayoutError: The root, the part folders or a mask is missing, or a mask is unreadable or mis-sized.
        ValueError: More than one task name or a bad option value.
    """
    task = one_task_name(categories, KOLEKTOR_TASK, "KolektorSDD")
    fraction = check_fraction(test_group_fraction, "test_group_fraction")
    seed = check_seed(seed)
    normals, anomalous = read_kolektor(root)
    train, test = split_groups(task, normals, anomalous, kolektor_part, fraction, seed, f"kolektor/{task}")
    return [CategorySplit(category=task, train=train, test=test, has_masks=True)]
