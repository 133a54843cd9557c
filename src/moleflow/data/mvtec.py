"""Scanning of an MVTec AD-style folder tree into train/test sample lists.

The layout is checked up front (before any training) so that a missing folder or mask is reported
with the path and the expected layout instead of failing hours into a run. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from moleflow.data.images import ImageReadError, oriented_size
from moleflow.data.types import GOOD, IMAGE_EXTENSIONS, CategorySplit, DatasetLayoutError, Sample

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

EXPECTED_LAYOUT = (
    "Expected layout:\n"
    "  ROOT/CATEGORY/train/good/*.png\n"
    "  ROOT/CATEGORY/test/<defect>/*.png            (test/good holds the normal test images)\n"
    "  ROOT/CATEGORY/ground_truth/<defect>/<name>_mask.png\n"
    f"MVTec AD comes from {MVTEC_URL} : download it by hand, extract it and point `data.root` at the "
    "extracted folder. To run without it, use the generated data set (`data=generated`)."
)


def _layout_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{EXPECTED_LAYOUT}"
    return DatasetLayoutError(msg)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _broken_links(folder: Path) -> list[Path]:
    """Symlinks with an image extension whose target is gone (a data set copied without its targets)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_symlink() and not p.exists() and not p.name.startswith(".")
    )


def _check_no_broken_links(folder: Path) -> None:
    broken = _broken_links(folder)
    if broken:
        listed = "\n  ".join(f"{p} -> {p.readlink()}" for p in broken)
        msg = (
            f"{len(broken)} image symlink(s) in {folder} point at files that do not exist:\n  {listed}\n"
            "Restore their targets or remove the links; a data set must not lose images silently."
        )
        raise DatasetLayoutError(msg)


def _list_images(folder: Path) -> list[Path]:
    """Image files of a folder sorted by name, so that sample order is deterministic.

    Raises:
        DatasetLayoutError: an image symlink in the folder is broken (named, never skipped quietly).
    """
    _check_no_broken_links(folder)
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _list_subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def present_categories(root: Path | str) -> list[str]:
    """Names of the category folders under root (folders that contain a `train` folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p.name for p in _list_subfolders(root) if (p / "train").is_dir()]


def _find_mask(mask_dir: Path, image: Path) -> Path | None:
    """Mask of `image`: `<stem>_mask.<ext>` preferred, `<stem>.<ext>` accepted, any image extension."""
    if not mask_dir.is_dir():
        return None
    _check_no_broken_links(mask_dir)
    by_name = {p.name.lower(): p for p in mask_dir.iterdir() if _is_image(p)}
    stem = image.stem.lower()
    suffixes = [".png", *sorted(IMAGE_EXTENSIONS - {".png"})]
    for base in (f"{stem}_mask", stem):
        for suffix in suffixes:
            found = by_name.get(base + suffix)
            if found is not None:
                return found
    return None


def _check_mask_size(image: Path, mask: Path) -> None:
    """Compare image and mask sizes from their file headers (cheap, upright by EXIF orientation), so a bad
    mask of a late task is reported before any training starts. A header that cannot be read is an error
    naming that file, here rather than hours later when the task's test images are loaded."""
    sizes = []
    for path, kind in ((image, "image"), (mask, "mask")):
        try:
            with Image.open(path) as img:
                sizes.append(oriented_size(img))
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            msg = (
                f"Cannot read the {kind} {path} ({type(err).__name__}: {err}); it belongs to the pair image {image}, "
                f"mask {mask}. The file is truncated, corrupt or not an image: re-extract it or remove the pair."
            )
            raise ImageReadError(msg) from err
    image_size, mask_size = sizes
    if image_size != mask_size:
        msg = (
            f"Mask {mask} is {mask_size[0]}x{mask_size[1]} px but its image {image} is "
            f"{image_size[0]}x{image_size[1]} px: a mask must have its image's size. Fix or remove the pair."
        )
        raise ValueError(msg)


def scan_category(root: Path | str, category: str) -> CategorySplit:
    """Collect the train and test samples of one category and check that every mask is present.

    Args:
        root: Data-set root holding one folder per category.
        category: Category folder name.

    Returns:
        The category's samples, each list sorted by folder then file name.

    Raises:
        DatasetLayoutError: A folder is missing or empty, or an anomalous image has no mask.
    """
    root = Path(root)
    cat_dir = root / category
    if not cat_dir.is_dir():
        present = present_categories(root)
        msg = (
            f"Category '{category}' not found: {cat_dir} is not a folder. "
            f"Categories present under {root}: {present or 'none'}."
        )
        raise _layout_error(msg)

    train_dir = cat_dir / "train" / GOOD
    if not train_dir.is_dir():
        raise _layout_error(f"Missing training folder {train_dir} (normal training images of '{category}').")
    train_images = _list_images(train_dir)
    if not train_images:
        msg = f"No training images in {train_dir}: it holds no files with extensions {sorted(IMAGE_EXTENSIONS)}."
        raise _layout_error(msg)
    train = [Sample(image_path=p, label=0, defect_type=GOOD, mask_path=None) for p in train_images]

    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise _layout_error(f"Missing test folder {test_dir} for category '{category}'.")
    test: list[Sample] = []
    for defect_dir in _list_subfolders(test_dir):
        defect = defect_dir.name
        images = _list_images(defect_dir)
        if defect == GOOD:
            test.extend(Sample(image_path=p, label=0, defect_type=GOOD, mask_path=None) for p in images)
            continue
        mask_dir = cat_dir / "ground_truth" / defect
        for image in images:
            mask = _find_mask(mask_dir, image)
            if mask is None:
                msg = (
                    f"Anomalous test image {image} has no ground-truth mask: expected "
                    f"{mask_dir / (image.stem + '_mask.png')} (or the same name with another image "
                    "extension, or without '_mask'). Add the mask or remove the image."
                )
                raise _layout_error(msg)
            _check_mask_size(image, mask)
            test.append(Sample(image_path=image, label=1, defect_type=defect, mask_path=mask))
    if not test:
        msg = (
            f"No test images in {test_dir}: expected sub-folders such as {test_dir / GOOD} and "
            f"{test_dir / '<defect>'} holding images."
        )
        raise _layout_error(msg)
    return CategorySplit(category=category, train=train, test=test)


def check_category_names(categories: Sequence[str]) -> list[str]:
    """Reject an empty list, non-string names and duplicates (a task must not appear twice).

    Returns:
        The categories as a list, in the given order.
    """
    if isinstance(categories, str):
        msg = f"categories must be a list of names, got the string {categories!r}; write [{categories!r}]."
        raise TypeError(msg)
    names = list(categories)
    if not names:
        msg = "categories is empty: give at least one category (one continual task each)."
        raise ValueError(msg)
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            msg = f"Category names must be non-empty strings, got {name!r} in {names}."
            raise TypeError(msg)
        if name in seen:
            msg = f"Category '{name}' appears more than once in {names}: list each task once."
            raise ValueError(msg)
        seen.add(name)
    return names


def one_task_name(categories: Sequence[str] | None, default: str, source: str) -> str:
    """The single task name of a data set that is one product (None gives ``default``).

    Raises:
        ValueError: More than one name was given.
    """
    names = check_category_names(categories if categories is not None else [default])
    if len(names) != 1:
        msg = f"{source} is one product: give one task name (e.g. [{default}]), got {names}."
        raise ValueError(msg)
    return names[0]


def scan_categories(root: Path | str, categories: Sequence[str]) -> list[CategorySplit]:
    """Scan several categories (the task sequence, in order) and validate all of them at once.

    Raises:
        DatasetLayoutError: root or a category is missing, or a category's layout is broken.
        ValueError: A category is listed twice, or the list is empty.
    """
    names = check_category_names(categories)
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _layout_error(f"Data-set root {root} {what}.")
    return [scan_category(root, name) for name in names]
