"""The ELPV solar-cell electroluminescence images (PyPI package `elpv-dataset`) as continual tasks.

ELPV is a real defect data set small enough to ship with pip, so it lets the demo and the tests run
on real images without a manual download. It has image-level labels only (no masks), so splits are
marked `has_masks=False`. One task per cell type (mono, poly); the labels' defect probability
decides normal (0) vs anomalous (2/3, 1); 1/3 ("maybe defective") is left out unless asked for.

Only the package's files are read (found with `importlib.util.find_spec`, without importing its
loader, which would decode all 2624 images into memory).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from moleflow.data.folder import check_fraction, check_seed
from moleflow.data.mvtec import check_category_names
from moleflow.data.subsets import by_name, split_pools
from moleflow.data.types import GOOD, CategorySplit, Sample

ELPV_TASKS: tuple[str, ...] = ("mono", "poly")
ELPV_PACKAGE = "elpv_dataset"
INSTALL_HINT = "pip install elpv-dataset (or pip install -e '.[demo]' in a checkout of moleflow)"

_TOLERANCE = 1e-6
# Defect probability -> Sample.defect_type; probability 1/3 is "uncertain".
_DEFECT_TYPES: tuple[tuple[float, str], ...] = (
    (0.0, GOOD),
    (1.0 / 3.0, "defect_p033"),
    (2.0 / 3.0, "defect_p067"),
    (1.0, "defect_p100"),
)
UNCERTAIN = "defect_p033"


def elpv_labels_csv() -> Path:
    """labels.csv of the installed `elpv-dataset` package.

    Raises:
        ModuleNotFoundError: The package is not installed.
        FileNotFoundError: The package is installed but its labels.csv is missing.
    """
    spec = importlib.util.find_spec(ELPV_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        msg = f"The ELPV data set needs the package '{ELPV_PACKAGE}', which is not installed: {INSTALL_HINT}."
        raise ModuleNotFoundError(msg, name=ELPV_PACKAGE)
    csv = Path(next(iter(spec.submodule_search_locations))) / "data" / "labels.csv"
    if not csv.is_file():
        msg = (
            f"The '{ELPV_PACKAGE}' package has no {csv}: the installation is incomplete. Reinstall it with "
            f"pip install --force-reinstall elpv-dataset."
        )
        raise FileNotFoundError(msg)
    return csv


def _defect_type(probability: float) -> str | None:
    for value, name in _DEFECT_TYPES:
        if abs(probability - value) < _TOLERANCE:
            return name
    return None


def read_elpv_labels(labels_csv: Path) -> dict[str, list[Sample]]:
    """Parse an ELPV labels.csv (whitespace-separated: image path, defect probability, cell type).

    Image paths are relative to the csv's folder. Blank lines and lines starting with '#' are skipped.

    Returns:
        Samples per cell type, in file order; label 1 for every probability above 0 (the caller
        decides what to do with the uncertain ones).

    Raises:
        ValueError: A line does not have three fields, or has an unknown probability or cell type.
    """
    base = labels_csv.parent
    rows: dict[str, list[Sample]] = {t: [] for t in ELPV_TASKS}
    for number, line in enumerate(labels_csv.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        where = f"{labels_csv}, line {number} ({text!r})"
        if len(fields) != 3:
            msg = f"{where}: expected 3 whitespace-separated fields (image path, defect probability, type)."
            raise ValueError(msg)
        rel_path, prob_text, cell_type = fields
        try:
            probability = float(prob_text)
        except ValueError:
            probability = math.nan
        defect = _defect_type(probability)
        if defect is None:
            msg = f"{where}: defect probability {prob_text!r} is not one of 0, 1/3, 2/3, 1."
            raise ValueError(msg)
        if cell_type not in rows:
            msg = f"{where}: cell type {cell_type!r} is not one of {list(ELPV_TASKS)}."
            raise ValueError(msg)
        label = 0 if defect == GOOD else 1
        rows[cell_type].append(Sample(image_path=base / rel_path, label=label, defect_type=defect, mask_path=None))
    return rows


def _check_files(task: str, samples: list[Sample], labels_csv: Path) -> None:
    missing = [s.image_path for s in samples if not s.image_path.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        msg = (
            f"ELPV task '{task}': {len(missing)} image(s) listed in {labels_csv} are missing, e.g. {shown}. "
            f"Reinstall the data ({INSTALL_HINT}) or fix labels_csv."
        )
        raise FileNotFoundError(msg)


def elpv_splits(
    tasks: Sequence[str] | None = ELPV_TASKS,
    include_uncertain: bool = False,
    test_normal_fraction: float = 0.25,
    seed: int = 0,
    labels_csv: str | Path | None = None,
) -> list[CategorySplit]:
    """ELPV cells as continual tasks, one per cell type, with a seeded split of the normal cells.

    Args:
        tasks: Cell types in task order ("mono", "poly"); None takes both.
        include_uncertain: Count probability-1/3 cells as anomalous test images (left out by default,
            since annotators were unsure whether they are defective).
        test_normal_fraction: Share of the normal cells held out for testing (rounded, at least 1).
        seed: Seed of the split (streams are keyed by the task name). Caps on the split sizes are the
            DataModule's (``data.max_train_per_task``, see ``moleflow.data.subsets.limit_split``).
        labels_csv: A labels.csv in the ELPV format (images relative to its folder); None uses the
            installed `elpv-dataset` package.

    Returns:
        One split per task; each list sorted by file name; all anomalous cells are in test;
        `mask_path` is None and `has_masks` False.

    Raises:
        ValueError: Unknown or duplicated task, bad option values, or a malformed labels.csv line.
        ModuleNotFoundError: labels_csv is None and `elpv-dataset` is not installed.
        FileNotFoundError: labels_csv or a listed image is missing.
    """
    names = check_category_names(ELPV_TASKS if tasks is None else tasks)
    unknown = [t for t in names if t not in ELPV_TASKS]
    if unknown:
        msg = f"Unknown ELPV task(s) {unknown}: the tasks are the cell types {list(ELPV_TASKS)}."
        raise ValueError(msg)
    if not isinstance(include_uncertain, bool):
        msg = f"include_uncertain must be True or False, got {include_uncertain!r}."
        raise TypeError(msg)
    fraction = check_fraction(test_normal_fraction)
    seed = check_seed(seed)
    if labels_csv is None:
        csv = elpv_labels_csv()
    else:
        csv = Path(labels_csv)
        if not csv.is_file():
            msg = f"ELPV labels file {csv} not found: give the path of a labels.csv, or None for the installed data."
            raise FileNotFoundError(msg)
    rows = read_elpv_labels(csv)

    splits: list[CategorySplit] = []
    for task in names:
        cells = by_name(rows[task])
        normals = [s for s in cells if s.label == 0]
        anomalous = [s for s in cells if s.label == 1 and (include_uncertain or s.defect_type != UNCERTAIN)]
        train, test = split_pools(task, normals, anomalous, fraction, seed, f"elpv/{task}")
        _check_files(task, [*train, *test], csv)
        splits.append(CategorySplit(category=task, train=train, test=test, has_masks=False))
    return splits


def elpv_counts(
    tasks: Sequence[str] | None = ELPV_TASKS,
    include_uncertain: bool = False,
    test_normal_fraction: float = 0.25,
    seed: int = 0,
    labels_csv: str | Path | None = None,
) -> dict[str, dict[str, int]]:
    """Split sizes of `elpv_splits` with the same arguments, for docs and checks.

    Returns:
        {task: {"train": n, "test_normal": n, "test_anomalous": n}}.
    """
    splits = elpv_splits(
        tasks=tasks,
        include_uncertain=include_uncertain,
        test_normal_fraction=test_normal_fraction,
        seed=seed,
        labels_csv=labels_csv,
    )
    return {
        s.category: {
            "train": len(s.train),
            "test_normal": sum(1 for x in s.test if x.label == 0),
            "test_anomalous": sum(1 for x in s.test if x.label == 1),
        }
        for s in splits
    }
