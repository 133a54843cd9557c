"""Photometric copies of a task's training images: the same images under another brightness and sensor noise.

Per-position statistics learn what every training image shares. Where every training image shows the same
black frame, a test frame one grey level brighter, or a little noisier, is unlike anything the flow saw and
scores as an anomaly in every image (docs/quality.md "Near-black backgrounds"). Extra copies of the training
images with a seeded brightness offset and sensor noise show the flow that such changes are normal, where a
rule on the scores could not tell them from a defect. The copies only add training features: scoring, the
router, and the held-out thresholds use the images as they are.

Copy c (1..copies) of image i, in pixel units (0..1, before the ImageNet normalisation):
``clip(x + b + s * z, 0, 1)`` with an offset ``b ~ U(-brightness, brightness)`` for the whole image and noise
``z ~ N(0, 1)`` per pixel, the same in the three channels (a grey image stays grey), of a level
``s ~ U(0, noise)``. The noise is added at the model's input size S, after resizing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from moleflow.data.datasets import SampleDataset
from moleflow.data.images import from_pixels, to_pixels
from moleflow.data.types import Sample


def photometric_change(image: torch.Tensor, offset: float, noise_std: float, gen: torch.Generator) -> torch.Tensor:
    """``image`` (3, S, S), ImageNet-normalised, with ``offset`` added and luminance noise of ``noise_std``
    (both in 0..1 pixel units), clipped to the valid pixel range, and normalised again."""
    noise = torch.randn((1, *image.shape[1:]), generator=gen) * noise_std
    return from_pixels((to_pixels(image) + offset + noise).clamp(0.0, 1.0))


def _copy_generator(seed: int, copy: int, index: int) -> torch.Generator:
    """A generator keyed by (seed, copy, image): the same copy whatever the loader's order or workers."""
    digest = hashlib.sha256(f"photometric:{seed}:{copy}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class PhotometricCopies(Dataset):
    """``copies`` changed copies of every image of a training dataset, copy after copy.

    Item ``c * N + i`` is copy ``c + 1`` of image i (N = len(base)), so the features of the copies reshape
    to (copies, N, ...) and a subset of the images (the ones a task learns from) selects the same rows in
    every copy.

    Args:
        base: the task's training images (their order is kept).
        copies: how many changed copies of each image (>= 1).
        brightness: largest brightness offset, in 0..1 pixel units (0.04 = about 10 grey levels of 255).
        noise: largest sensor-noise std, in 0..1 pixel units, at the model's input size.
        seed: what the changes are drawn from (the run's seed and the task).
    """

    def __init__(self, base: SampleDataset, copies: int, brightness: float, noise: float, seed: int) -> None:
        if copies < 1:
            msg = f"PhotometricCopies needs copies >= 1, got {copies}."
            raise ValueError(msg)
        if not 0.0 <= brightness <= 1.0 or not 0.0 <= noise <= 1.0:
            msg = f"brightness and noise are in 0..1 pixel units, got {brightness} and {noise}."
            raise ValueError(msg)
        self.base = base
        self.copies = copies
        self.brightness = brightness
        self.noise = noise
        self.seed = seed

    def __len__(self) -> int:
        return self.copies * len(self.base)

    @property
    def samples(self) -> tuple[Sample, ...]:
        """The files behind each item, in order (the disk feature cache keys its files on them)."""
        return tuple(self.base.samples) * self.copies

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        """Item j: the base item's dict (image (3, S, S) changed; mask, label, index as they are)."""
        n = len(self.base)
        if not 0 <= j < len(self):
            msg = f"Index {j} out of range for {self.copies} copies of {n} images."
            raise IndexError(msg)
        copy, i = divmod(j, n)
        item = dict(self.base[i])
        gen = _copy_generator(self.seed, copy, i)
        offset = (2.0 * torch.rand((), generator=gen).item() - 1.0) * self.brightness
        level = torch.rand((), generator=gen).item() * self.noise
        item["image"] = photometric_change(item["image"], offset, level, gen)
        return item


def copy_rows(n_images: int, copies: int, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Indices into a :class:`PhotometricCopies` of ``n_images`` images of the copies of images ``rows``."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    return (torch.arange(copies).unsqueeze(1) * n_images + rows.unsqueeze(0)).reshape(-1)
