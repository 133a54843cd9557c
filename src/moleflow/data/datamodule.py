"""LightningDataModule that serves one category (MVTec layout, ELPV cell type or user folder) per continual task."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from moleflow.data.datasets import SampleDataset
from moleflow.data.elpv import ELPV_TASKS, elpv_splits
from moleflow.data.folder import folder_splits
from moleflow.data.mvtec import CategorySplit, check_category_names, scan_categories

DATA_SOURCES: tuple[str, ...] = ("mvtec", "elpv", "folder")
"""Task sources: an MVTec AD-style tree, the ELPV package data, a user's own folders."""


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return value


def _keyword_options(func: Callable[..., Any], positional: set[str]) -> list[str]:
    return [name for name in inspect.signature(func).parameters if name not in positional]


def _source_option_names(source: str) -> list[str]:
    """Options a source accepts in `source_options` (its reader's keyword arguments)."""
    if source == "elpv":
        return _keyword_options(elpv_splits, {"tasks"})
    if source == "folder":
        return _keyword_options(folder_splits, {"root", "categories"})
    return []


class ContinualDataModule(pl.LightningDataModule):
    """Task t = categories[t]: train on its normal images, test on the test sets of tasks 0..t.

    All categories are scanned once, on the first `prepare_data`/`setup` (or first use), so that a
    broken layout is reported before any training starts.

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
        source: "mvtec" (`scan_categories`), "elpv" (`elpv_splits`) or "folder" (`folder_splits`).
        source_options: Keyword arguments of the source's reader, e.g. {"max_train_per_task": 64}
            for "elpv" or {"layout": "normal_abnormal", "seed": 1} for "folder"; none for "mvtec".
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
    ) -> None:
        super().__init__()
        if source not in DATA_SOURCES:
            msg = f"Unknown data source {source!r}: use one of {list(DATA_SOURCES)}."
            raise ValueError(msg)
        self.source = source
        self.source_options = self._check_options(source, source_options)
        if root is None and source != "elpv":
            msg = f"root is required for source={source!r}: give the folder holding one sub-folder per category."
            raise ValueError(msg)
        self.root = Path(root) if root is not None else None
        if categories is None and source == "mvtec":
            msg = "categories is required for source='mvtec': list the category folders in task order, e.g. ['bottle']."
            raise ValueError(msg)
        if categories is None and source == "elpv":
            categories = ELPV_TASKS
        self._categories = check_category_names(categories) if categories is not None else None
        self.image_size = _positive_int("image_size", image_size)
        self.train_batch_size = _positive_int("train_batch_size", train_batch_size)
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        self.num_workers = _positive_int("num_workers", num_workers, minimum=0)
        self.pin_memory = bool(pin_memory)
        self.current_task = 0
        self._splits: list[CategorySplit] | None = None

    # ----------------------------------------------------------------------------------- scanning
    def prepare_data(self) -> None:
        """Validate the whole layout early (nothing is downloaded)."""
        self._scan()

    def setup(self, stage: str | None = None) -> None:
        """Scan all categories once; later calls do nothing."""
        self._scan()

    @staticmethod
    def _check_options(source: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Reject options the source's reader does not take, before any scanning."""
        if options is None:
            return {}
        if not isinstance(options, Mapping):
            msg = f"source_options must be a mapping of option names to values, got {type(options).__name__}."
            raise TypeError(msg)
        accepted = _source_option_names(source)
        unknown = sorted(str(k) for k in options if k not in accepted)
        if unknown:
            msg = f"source_options {unknown} are not accepted by source={source!r}; accepted: {accepted or 'none'}."
            raise ValueError(msg)
        return dict(options)

    def _scan(self) -> list[CategorySplit]:
        if self._splits is None:
            if self.source == "mvtec":
                splits = scan_categories(self.root, self._categories)
            elif self.source == "elpv":
                splits = elpv_splits(tasks=self._categories, **self.source_options)
            else:
                splits = folder_splits(self.root, self._categories, **self.source_options)
            self._splits = splits
            if self._categories is None:
                self._categories = [s.category for s in splits]
        return self._splits

    # ------------------------------------------------------------------------------------- tasks
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def task_names(self) -> list[str]:
        """Task names in order (for source="folder" with categories=None, known after scanning)."""
        if self._categories is None:
            self._scan()
        return list(self._categories)

    @property
    def splits(self) -> list[CategorySplit]:
        """Scanned splits, one per task in order (scans on first access)."""
        return self._scan()

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
    def _loader(self, dataset: SampleDataset, batch_size: int, shuffle: bool) -> DataLoader:
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
