"""Torch dataset over scanned samples (one task's train or test split)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from moleflow.data.images import load_mask, load_rgb
from moleflow.data.types import Sample


class SampleDataset(Dataset):
    """Loads images (and masks) of a list of samples on demand.

    Holds only paths and ints, so it pickles cheaply into DataLoader worker processes.

    Args:
        samples: Samples to serve, in order (index i of the dataset is samples[i]).
        image_size: Side S of the square images and masks.
        with_masks: Read ground-truth masks; if False (or a sample has none) the mask is all zeros.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, with_masks: bool = True) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            msg = f"image_size must be a positive int (e.g. 224), got {image_size!r}."
            raise ValueError(msg)
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.image_size = image_size
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        """Image-level labels (0 normal, 1 anomalous) without reading any image."""
        return [s.label for s in self.samples]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Read sample i.

        Returns:
            Dict with `image` (3, S, S) float32, `mask` (1, S, S) float32 in {0, 1}, `label` int64
            scalar and `index` int64 scalar (the position in this dataset, to find the sample's path).
        """
        n = len(self.samples)
        if not -n <= i < n:
            msg = f"Index {i} out of range for a dataset of {n} samples."
            raise IndexError(msg)
        i = i % n
        sample = self.samples[i]
        image, hw = load_rgb(sample.image_path, self.image_size)
        if self.with_masks and sample.mask_path is not None:
            mask = load_mask(
                sample.mask_path, self.image_size, hw, image_path=sample.image_path, threshold=sample.mask_threshold
            )
        else:
            mask = torch.zeros(1, self.image_size, self.image_size, dtype=torch.float32)
        return {
            "image": image,
            "mask": mask,
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }
