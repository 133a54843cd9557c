"""LightningDataModule that serves continual tasks: one category each, or several (a task-grouping scenario).

Sources (moleflow.data.sources): MVTec layout (MVTec AD, MPDD, generated data), ELPV cell types, VisA's split
file, user folders, Magnetic Tile, or several of them in a row.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from moleflow.data.datasets import SampleDataset
from moleflow.data.folder import check_seed
from moleflow.data.grouping import group_name, group_splits, parse_scenario
from moleflow.data.mvtec import check_category_names
from moleflow.data.photometric import PhotometricCopies
from moleflow.data.sources import DATA_SOURCES, MULTI, check_options, read_source, read_sources
from moleflow.data.subsets import check_limit, limit_split, split_validation
from moleflow.data.synthetic import generate_synthetic_mvtec, generated_root
from moleflow.data.types import CategorySplit

EVALUATION_PARTS: tuple[str, ...] = ("test", "validation")
"""Which part of each category's test images a run scores (``data.evaluate_on``)."""

MPDD_CATEGORIES: tuple[str, ...] = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return value


class ContinualDataModule(pl.LightningDataModule):
    """Task t = categories[t] (or the t-th group of `task_groups`): train on its normal images, test on tasks 0..t.

    All categories are scanned once, on the first `prepare_data`/`setup` (or first use), so that a
    broken layout is reported before any training starts. With `task_groups`, task names, indices and
    loaders refer to the grouped tasks; `task_categories` and `test_sample_categories` give the
    categories inside a task, for metrics per category.

    Args:
        root: Data-set root holding one folder per category. Ignored by source="elpv" (the data
            comes from the installed `elpv-dataset` package, or `source_options["labels_csv"]`),
            where it may be None.
        categories: Task sequence (category folder names, or ELPV cell types "mono"/"poly"; in
            order, no duplicates). None means all: both cell types for "elpv", every sub-folder of
            root (sorted) for "folder"; "mvtec" needs an explicit list.
        image_size: Side S of the square images.
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the test loaders.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin host memory (useful with a GPU).
        source: "mvtec" (`scan_categories`), "elpv" (`elpv_splits`), "folder" (`folder_splits`),
            "visa" (`visa_splits`), "magnetic_tile" (`magnetic_tile_splits`), or "multi": the tasks of
            several sources in a row, listed in `sources`.
        source_options: Keyword arguments of the source's reader, e.g. {"include_uncertain": True}
            for "elpv", {"layout": "normal_abnormal", "seed": 1} for "folder" or {"split_csv": ...}
            for "visa"; none for "mvtec".
        sources: For source="multi": one mapping per source with keys source, root, categories,
            source_options, name and prefix (see `moleflow.data.sources.read_sources`). `categories`,
            if given, then picks and orders the combined categories.
        max_train_per_task: Keep at most this many training images of each category (seeded
            subsample, `moleflow.data.subsets.limit_split`), e.g. to fit a CPU time budget.
        max_test_per_task: Keep at most this many test images of each category (>= 2), the
            normal/defective ratio kept and at least one of each.
        subset_seed: Seed of those subsamples (streams keyed by the category name).
        task_groups: Scenario grouping the categories into tasks (`parse_scenario`): None (one
            category per task), "10-5", "14-1", "3x5", ... or a list of lists of category names.
        name: Name of the data set (data.name); for MVTec-layout data sets other than MVTec AD
            (e.g. "mpdd") layout errors say where that data set comes from instead of MVTec AD.
        validation_share: Seeded share of each category's test images kept apart as its validation part
            (0 = none, MAIN); the test images are then the rest.
        evaluate_on: "test" or "validation": which part the run's evaluations score.
        generate: Arguments of `generate_synthetic_mvtec` (data=generated): `prepare_data` first writes
            that seeded tree of the categories under root (atomically; a second call returns at once).
    """

    def __init__(
        self,
        root: str | Path | None,
        categories: Sequence[str] | None,
        image_size: int = 224,
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        source: str = "mvtec",
        source_options: Mapping[str, Any] | None = None,
        task_groups: str | Sequence[Sequence[str]] | None = None,
        name: str | None = None,
        sources: Sequence[Mapping[str, Any]] | None = None,
        max_train_per_task: int | None = None,
        max_test_per_task: int | None = None,
        subset_seed: int = 0,
        generate: Mapping[str, Any] | None = None,
        validation_share: float = 0.0,
        evaluate_on: str = "test",
    ) -> None:
        super().__init__()
        if source not in DATA_SOURCES:
            msg = f"Unknown data source {source!r}: use one of {list(DATA_SOURCES)}."
            raise ValueError(msg)
        self.source = source
        if source == MULTI:
            if not sources:
                msg = "source='multi' needs data.sources, e.g. [{source: elpv}, {source: magnetic_tile, root: ...}]."
                raise ValueError(msg)
            self.sources = [dict(entry) for entry in sources]
            self.source_options: dict[str, Any] = {}
        else:
            if sources:
                msg = f"data.sources is only read with data.source=multi (source is {source!r}); remove one of them."
                raise ValueError(msg)
            self.sources = []
            self.source_options = check_options(source, source_options)
        if root is None and source not in ("elpv", MULTI):
            msg = f"root is required for source={source!r}: give the folder holding one sub-folder per category."
            raise ValueError(msg)
        self.root = Path(root) if root is not None else None
        if categories is None and source == "mvtec":
            msg = "categories is required for source='mvtec': list the category folders in task order, e.g. ['bottle']."
            raise ValueError(msg)
        self._categories = check_category_names(categories) if categories is not None else None
        self._task_groups = task_groups
        # Parsed now when the categories are known (fail before scanning), else after scanning.
        known = self._categories is not None and source != MULTI
        self._groups = parse_scenario(task_groups, self._categories) if known else None
        if name is not None and not isinstance(name, str):
            msg = f"data.name must be a string such as 'mpdd' or None, got {name!r}."
            raise TypeError(msg)
        self.dataset_name = name
        if generate and (source != "mvtec" or self._categories is None):
            msg = "data.generate writes an MVTec-layout tree: it needs data.source=mvtec and data.categories."
            raise ValueError(msg)
        self.generate = dict(generate) if generate else None
        if self.generate:  # a folder per generation setting: another setting never replaces this tree
            self.root = generated_root(self.root, list(self._categories), **self.generate)
        self.image_size = _positive_int("image_size", image_size)
        self.train_batch_size = _positive_int("train_batch_size", train_batch_size)
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        self.num_workers = _positive_int("num_workers", num_workers, minimum=0)
        self.pin_memory = bool(pin_memory)
        self.max_train_per_task = check_limit("max_train_per_task", max_train_per_task, minimum=1)
        self.max_test_per_task = check_limit("max_test_per_task", max_test_per_task, minimum=2)
        self.subset_seed = check_seed(subset_seed)
        if isinstance(validation_share, bool) or not isinstance(validation_share, int | float):
            msg = f"data.validation_share must be a number in [0, 1), e.g. 0.3, got {validation_share!r}."
            raise TypeError(msg)
        if not 0.0 <= float(validation_share) < 1.0:
            msg = f"data.validation_share must be in [0, 1) (0 = no validation part), got {validation_share!r}."
            raise ValueError(msg)
        if evaluate_on not in EVALUATION_PARTS:
            msg = f"data.evaluate_on must be one of {list(EVALUATION_PARTS)}, got {evaluate_on!r}."
            raise ValueError(msg)
        if evaluate_on == "validation" and not validation_share:
            msg = "data.evaluate_on=validation needs a validation part: set data.validation_share, e.g. 0.3."
            raise ValueError(msg)
        self.validation_share = float(validation_share)
        self.evaluate_on = evaluate_on
        self.current_task = 0
        self._category_splits: list[CategorySplit] | None = None
        self._splits: list[CategorySplit] | None = None
        self.origin: dict[str, dict[str, Any]] = {}  # category -> {source, root, name}: what was read

    # ----------------------------------------------------------------------------------- scanning
    def prepare_data(self) -> None:
        """Write the generated tree (``generate``), then validate the whole layout early (nothing is downloaded)."""
        if self.generate and self._splits is None:
            generate_synthetic_mvtec(root=self.root, categories=list(self._categories), **self.generate)
        self._scan()

    def setup(self, stage: str | None = None) -> None:
        """Scan all categories once (after `prepare_data`, which generates a generated tree); later calls do nothing."""
        self.prepare_data()

    def _read_source(self) -> list[CategorySplit]:
        """One split per category, from the configured source(s); records where each category came from."""
        if self.source != MULTI:
            root = str(self.root) if self.root is not None else None
            splits = read_source(self.source, root, self._categories, self.source_options, self.dataset_name)
            name = self.dataset_name or self.source
            self.origin = {s.category: {"source": self.source, "root": root, "name": name} for s in splits}
            return splits
        splits, self.origin = read_sources(self.sources)
        if self._categories is None:
            return splits
        by_name = {s.category: s for s in splits}
        missing = [c for c in self._categories if c not in by_name]
        if missing:
            msg = f"data.categories {missing} are not among the categories of data.sources: {list(by_name)}."
            raise ValueError(msg)
        return [by_name[c] for c in self._categories]

    def _evaluated_part(self, split: CategorySplit) -> CategorySplit:
        """The category with the part of its test images this run scores: all, the test part or the validation part.

        With ``validation_share`` a seeded, label-stratified share of each category's test images is kept
        apart as its validation part (chosen before any cap, never overlapping the test part); a run scores
        one of the two (``evaluate_on``), so settings are chosen on validation images and the test images are
        scored once.
        """
        if not self.validation_share:
            return split
        validation, test = split_validation(split, self.validation_share, self.subset_seed)
        return validation if self.evaluate_on == "validation" else test

    def _scan(self) -> list[CategorySplit]:
        if self._splits is None:
            caps = (self.max_train_per_task, self.max_test_per_task, self.subset_seed)
            splits = [limit_split(self._evaluated_part(split), *caps) for split in self._read_source()]
            categories = [s.category for s in splits]
            groups = self._groups if self._groups is not None else parse_scenario(self._task_groups, categories)
            grouped = group_splits(splits, groups)
            self._categories, self._groups = categories, groups
            self._category_splits, self._splits = splits, grouped
        return self._splits

    # ------------------------------------------------------------------------------------- tasks
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def task_names(self) -> list[str]:
        """Task names in order: the category, or "a+b+..." for a grouped task (scans first if categories=None)."""
        return [group_name(group) for group in self._task_groups_list()]

    @property
    def categories(self) -> list[str]:
        """All categories in order (as many as tasks unless `task_groups` groups them)."""
        if self._categories is None:
            self._scan()
        return list(self._categories)

    @property
    def splits(self) -> list[CategorySplit]:
        """Scanned splits, one per task in order (grouped tasks merged; scans on first access)."""
        return self._scan()

    @property
    def category_splits(self) -> list[CategorySplit]:
        """Scanned splits, one per category in order (before grouping)."""
        self._scan()
        return list(self._category_splits)

    def _task_groups_list(self) -> list[list[str]]:
        if self._groups is None:
            self._scan()
        return self._groups

    def task_categories(self, t: int) -> list[str]:
        """Categories of task t, in order (one unless `task_groups` groups several)."""
        return list(self._task_groups_list()[self._check_task(t)])

    def _sample_categories(self, t: int, which: str) -> list[str]:
        t = self._check_task(t)
        by_name = {s.category: s for s in self.category_splits}
        return [name for name in self.task_categories(t) for _ in getattr(by_name[name], which)]

    def test_sample_categories(self, t: int) -> list[str]:
        """Category of every test sample of task t, in test-loader order (for metrics per category)."""
        return self._sample_categories(t, "test")

    def train_sample_categories(self, t: int) -> list[str]:
        """Category of every training sample of task t, in (unshuffled) train-loader order."""
        return self._sample_categories(t, "train")

    def _check_task(self, t: int) -> int:
        if isinstance(t, bool):
            msg = f"Task index must be an int, got {t!r}."
            raise TypeError(msg)
        t = operator.index(t)
        if not 0 <= t < self.num_tasks:
            msg = (
                f"Task index {t!r} out of range: there are {self.num_tasks} tasks "
                f"(0..{self.num_tasks - 1}: {self.task_names})."
            )
            raise IndexError(msg)
        return t

    def set_task(self, t: int) -> None:
        """Make task t the current one (its training data; test data of tasks 0..t)."""
        self.current_task = self._check_task(t)

    def train_dataset(self, t: int) -> SampleDataset:
        """Normal training images of task t."""
        split = self.splits[self._check_task(t)]
        return SampleDataset(split.train, self.image_size, with_masks=False)

    def has_masks(self, t: int) -> bool:
        """Whether task t has pixel ground truth (False for ELPV and mask-less folders: skip pixel metrics)."""
        return self.splits[self._check_task(t)].has_masks

    def test_dataset(self, t: int) -> SampleDataset:
        """Test images (normal and anomalous) of task t, with masks if it has them (all-zero masks otherwise)."""
        split = self.splits[self._check_task(t)]
        return SampleDataset(split.test, self.image_size, with_masks=split.has_masks)

    # ------------------------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self, shuffle: bool = False) -> DataLoader:
        """Training images of the current task.

        Not shuffled by default: features are extracted once in a fixed order and the cached
        features are shuffled by the caller.
        """
        return self._loader(self.train_dataset(self.current_task), self.train_batch_size, shuffle)

    def photometric_copies_dataloader(self, copies: int, brightness: float, noise: float, seed: int) -> DataLoader:
        """Changed copies of the current task's training images (:class:`PhotometricCopies`), in a fixed order."""
        dataset = PhotometricCopies(self.train_dataset(self.current_task), copies, brightness, noise, seed)
        return self._loader(dataset, self.train_batch_size, shuffle=False)

    def test_dataloader_for(self, task: int) -> DataLoader:
        """Test loader of one task seen so far (task <= current_task)."""
        self._check_task(task)
        if task > self.current_task:
            msg = (
                f"Task {task} ('{self.task_names[task]}') has not been seen yet: the current task is "
                f"{self.current_task}. Call set_task({task}) first, or evaluate tasks 0..{self.current_task}."
            )
            raise ValueError(msg)
        return self._loader(self.test_dataset(task), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        """One test loader per task seen so far (0..current_task), in task order."""
        return [self.test_dataloader_for(t) for t in range(self.current_task + 1)]


def data_settings_for_reading(data: Mapping[str, Any]) -> dict[str, Any]:
    """A finished run's ``data`` settings that read its images where they are and never write any.

    A generated tree lives in the folder its settings name (:func:`generated_root`); reading it back means
    pointing ``root`` there and dropping ``generate``, so that evaluation or calibration never rewrites data.
    """
    values = dict(data)
    generate = values.get("generate")
    if generate and values.get("root") is not None and values.get("categories"):
        values["root"] = str(generated_root(values["root"], list(values["categories"]), **dict(generate)))
    values["generate"] = None
    return values
