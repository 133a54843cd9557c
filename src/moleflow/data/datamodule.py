"""LightningDataModule that serves one MVTec-style category per continual task."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from moleflow.data.datasets import SampleDataset
from moleflow.data.mvtec import CategorySplit, check_category_names, scan_categories


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an int >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return value


class ContinualDataModule(pl.LightningDataModule):
    """Task t = categories[t]: train on its normal images, test on the test sets of tasks 0..t.

    All categories are scanned once, on the first `prepare_data`/`setup` (or first use), so that a
    broken layout is reported before any training starts.

    Args:
        root: Data-set root holding one folder per category.
        categories: Task sequence (category folder names, in order, no duplicates).
        image_size: Side S of the square images.
        train_batch_size: Batch size of the training loader.
        eval_batch_size: Batch size of the test loaders.
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: Pin host memory (useful with a GPU).
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str],
        image_size: int = 224,
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self._categories = check_category_names(categories)
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

    def _scan(self) -> list[CategorySplit]:
        if self._splits is None:
            self._splits = scan_categories(self.root, self._categories)
        return self._splits

    # ------------------------------------------------------------------------------------- tasks
    @property
    def num_tasks(self) -> int:
        return len(self._categories)

    @property
    def task_names(self) -> list[str]:
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

    def test_dataset(self, t: int) -> SampleDataset:
        """Test images (normal and anomalous, with masks) of task t."""
        split = self.splits[self._check_task(t)]
        return SampleDataset(split.test, self.image_size, with_masks=True)

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
