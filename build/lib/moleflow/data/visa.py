"""The VisA data set (Visual Anomaly, Amazon) read through its own 1-class split file.

VisA is not in the MVTec layout: images and masks sit under `CATEGORY/Data/{Images,Masks}` and the
split is given by `split_csv/1cls.csv`. Reading that file (instead of converting the tree) keeps the
official split that published results use. As for MVTec, the whole split is checked before any
training: every listed image must exist and every anomalous test image must have its mask.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from moleflow.data.mvtec import check_category_names
from moleflow.data.types import GOOD, CategorySplit, DatasetLayoutError, Sample

VISA_CATEGORIES: tuple[str, ...] = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

VISA_URL = "https://github.com/amazon-science/spot-diff"
VISA_ARCHIVE = "VisA_20220922.tar"
VISA_SPLIT_CSV = "split_csv/1cls.csv"
VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
ANOMALY = "anomaly"
"""`Sample.defect_type` of VisA's anomalous images (the split file has no finer defect classes)."""

VISA_EXPECTED_LAYOUT = (
    "Expected layout (VisA as extracted from its archive):\n"
    "  ROOT/split_csv/1cls.csv                    (columns object,split,label,image,mask; paths relative to ROOT)\n"
    "  ROOT/CATEGORY/Data/Images/Normal/*.JPG\n"
    "  ROOT/CATEGORY/Data/Images/Anomaly/*.JPG\n"
    "  ROOT/CATEGORY/Data/Masks/Anomaly/*.png     (one mask per anomalous image)\n"
    f"VisA comes from {VISA_URL} : download {VISA_ARCHIVE} by hand, extract it and point `data.root` at the "
    "extracted folder (the one holding split_csv/). anomalib's VisA datamodule (anomalib.data.Visa, "
    "prepare_data()) can also download and extract it: use its root folder, not the converted visa_pytorch/ "
    "sub-folder (that copy is in MVTec layout and could be read with data.source=mvtec instead)."
)

_SPLITS = ("train", "test")
_LABELS = {"normal": 0, ANOMALY: 1}


def _visa_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{VISA_EXPECTED_LAYOUT}"
    return DatasetLayoutError(msg)


def _expected_mask(image: str) -> str:
    """Where VisA keeps the mask of an image: Data/Images/... -> Data/Masks/..., as .png."""
    parts = ["Masks" if part == "Images" else part for part in PurePosixPath(image).parts]
    return str(PurePosixPath(*parts).with_suffix(".png"))


def read_visa_split(root: Path | str, split_csv: str | Path = VISA_SPLIT_CSV) -> dict[str, dict[str, list[Sample]]]:
    """Parse a VisA split file into samples per category and split, in file order.

    Args:
        root: VisA root; image and mask paths of the file are relative to it.
        split_csv: The split file, relative to root (or absolute).

    Returns:
        {category: {"train": [...], "test": [...]}}; anomalous rows carry their mask path (not yet checked).

    Raises:
        DatasetLayoutError: root or the split file is missing.
        ValueError: The file lacks a column, or a row has an unknown split or label or no image.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _visa_error(f"VisA root {root} {what}.")
    csv_path = root / split_csv
    if not csv_path.is_file():
        raise _visa_error(f"VisA split file {csv_path} not found.")
    rows: dict[str, dict[str, list[Sample]]] = {}
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in VISA_COLUMNS if c not in columns]
        if missing:
            msg = (
                f"VisA split file {csv_path} lacks the column(s) {missing}: its header is {columns}, expected "
                f"{','.join(VISA_COLUMNS)}. Use VisA's own split_csv/1cls.csv."
            )
            raise ValueError(msg)
        reader.fieldnames = columns
        for row in reader:
            values = {k: (row.get(k) or "").strip() for k in VISA_COLUMNS}
            where = f"{csv_path}, line {reader.line_num}"
            split, label = values["split"].lower(), values["label"].lower()
            if split not in _SPLITS:
                raise ValueError(f"{where}: split {values['split']!r} is not one of {list(_SPLITS)}.")
            if label not in _LABELS:
                raise ValueError(f"{where}: label {values['label']!r} is not one of {list(_LABELS)}.")
            if not values["object"] or not values["image"]:
                raise ValueError(f"{where}: the object and image columns must not be empty.")
            is_anomaly = _LABELS[label] == 1
            if split == "train" and is_anomaly:
                continue  # training uses normal images only
            mask = values["mask"] or _expected_mask(values["image"])
            sample = Sample(
                image_path=root / values["image"],
                label=_LABELS[label],
                defect_type=ANOMALY if is_anomaly else GOOD,
                mask_path=root / mask if is_anomaly else None,
            )
            rows.setdefault(values["object"], {s: [] for s in _SPLITS})[split].append(sample)
    if not rows:
        raise _visa_error(f"VisA split file {csv_path} lists no images.")
    return rows


def _present_order(present: Sequence[str]) -> list[str]:
    """Categories of the split file: VisA's usual order first, any others sorted after them."""
    known = [c for c in VISA_CATEGORIES if c in present]
    return known + sorted(c for c in present if c not in VISA_CATEGORIES)


def _check_category(category: str, samples: dict[str, list[Sample]], csv_path: Path) -> None:
    if not samples["train"]:
        raise _visa_error(f"VisA category '{category}' has no normal training images in {csv_path}.")
    if not samples["test"]:
        raise _visa_error(f"VisA category '{category}' has no test images in {csv_path}.")
    missing = [s.image_path for s in (*samples["train"], *samples["test"]) if not s.image_path.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        msg = (
            f"VisA category '{category}': {len(missing)} image(s) listed in {csv_path} are missing, e.g. {shown}. "
            "Re-extract the archive, or check that data.root is the folder holding split_csv/."
        )
        raise _visa_error(msg)
    for sample in samples["test"]:
        if sample.label == 1 and (sample.mask_path is None or not sample.mask_path.is_file()):
            msg = (
                f"Anomalous test image {sample.image_path} has no ground-truth mask: expected {sample.mask_path} "
                f"(from {csv_path}). Re-extract the archive or fix the split file."
            )
            raise _visa_error(msg)


def visa_splits(
    root: Path | str, categories: Sequence[str] | None = None, split_csv: str | Path = VISA_SPLIT_CSV
) -> list[CategorySplit]:
    """VisA categories as continual tasks, split as in VisA's 1-class split file.

    Args:
        root: VisA root (the extracted archive, holding split_csv/ and one folder per category).
        categories: Category names in task order; None takes every category of the split file
            (VisA's usual order).
        split_csv: The split file, relative to root (or absolute).

    Returns:
        One split per category: train = the normal train rows, test = all test rows (normal, then
        anomalous with masks), each sorted by image path; `has_masks` True.

    Raises:
        DatasetLayoutError: root, the split file, a category, an image or a mask is missing.
        ValueError: A category listed twice, an empty list, or a malformed split file.
    """
    given = check_category_names(categories) if categories is not None else None
    rows = read_visa_split(root, split_csv)
    csv_path = Path(root) / split_csv
    present = _present_order(list(rows))
    names = given if given is not None else present
    unknown = [c for c in names if c not in rows]
    if unknown:
        raise _visa_error(f"VisA category(ies) {unknown} not in {csv_path}. Categories present: {present}.")
    splits: list[CategorySplit] = []
    for name in names:
        samples = rows[name]
        _check_category(name, samples, csv_path)
        train = sorted(samples["train"], key=lambda s: str(s.image_path))
        test = sorted(samples["test"], key=lambda s: (s.label, str(s.image_path)))
        splits.append(CategorySplit(category=name, train=train, test=test, has_masks=True))
    return splits
