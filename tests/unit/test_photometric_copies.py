"""Photometric copies of training images (training.photometric_copies): seeded, bounded, grey stays grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.config.checks import photometric_problem
from moleflow.data.datasets import SampleDataset
from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD
from moleflow.data.photometric import PhotometricCopies, copy_rows
from moleflow.data.types import Sample

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _pixels(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


@pytest.fixture
def base(tmp_path: Path) -> SampleDataset:
    """Three 32 px images: a grey one with a black frame, a white one, an RGB one."""
    grey = np.full((32, 32), 120, np.uint8)
    grey[:6] = 0
    arrays = [grey, np.full((32, 32), 255, np.uint8), np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)]
    samples = []
    for i, array in enumerate(arrays):
        path = tmp_path / f"{i}.png"
        Image.fromarray(array).save(path)
        samples.append(Sample(path, 0, "good", None))
    return SampleDataset(samples, 32, with_masks=False)


def test_copies_are_seeded_changed_and_in_the_pixel_range(base: SampleDataset) -> None:
    copies = PhotometricCopies(base, copies=2, brightness=0.05, noise=0.02, seed=3)
    assert len(copies) == 6 and copies.samples == base.samples * 2
    for j in range(6):
        item, again, original = copies[j], copies[j], base[j % 3]
        assert torch.equal(item["image"], again["image"])  # the same copy whatever the order of reading
        if j % 3 != 1:  # the white image can come back unchanged: a brighter white is clipped
            assert not torch.equal(item["image"], original["image"])
        pixels = _pixels(item["image"])
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
        assert int(item["index"]) == j % 3 and int(item["label"]) == 0
        change = pixels - _pixels(original["image"])
        assert change.abs().max() <= 0.05 + 6 * 0.02  # offset plus a few noise std at most
    assert not torch.equal(copies[0]["image"], copies[3]["image"])  # two copies of one image differ
    other = PhotometricCopies(base, copies=2, brightness=0.05, noise=0.02, seed=4)
    assert not torch.equal(copies[0]["image"], other[0]["image"])


def test_a_grey_image_stays_grey_and_a_black_frame_moves_up_only(base: SampleDataset) -> None:
    copies = PhotometricCopies(base, copies=8, brightness=0.05, noise=0.0, seed=0)
    offsets = []
    for c in range(8):
        pixels = _pixels(copies[3 * c]["image"])
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
        frame = pixels[:, :6]
        assert frame.min() >= -1e-6  # clipped at black: a darker black does not exist
        offsets.append(float(pixels[0, 16, 16] - 120 / 255))
    assert max(offsets) > 0 > min(offsets) and max(abs(o) for o in offsets) <= 0.05 + 1e-5


def test_no_change_gives_the_images_back(base: SampleDataset) -> None:
    copies = PhotometricCopies(base, copies=1, brightness=0.0, noise=0.0, seed=0)
    for i in range(3):
        assert torch.allclose(copies[i]["image"], base[i]["image"], atol=1e-5)


def test_copy_rows_select_the_same_images_in_every_copy() -> None:
    assert copy_rows(5, 3, [0, 2]).tolist() == [0, 2, 5, 7, 10, 12]
    assert copy_rows(4, 1, torch.tensor([3])).tolist() == [3]


def test_bad_copies_are_named(base: SampleDataset) -> None:
    with pytest.raises(ValueError, match="copies >= 1"):
        PhotometricCopies(base, copies=0, brightness=0.05, noise=0.0, seed=0)
    with pytest.raises(ValueError, match="0..1 pixel units"):
        PhotometricCopies(base, copies=1, brightness=10.0, noise=0.0, seed=0)
    with pytest.raises(IndexError, match="out of range"):
        PhotometricCopies(base, copies=1, brightness=0.05, noise=0.0, seed=0)[3]
    assert photometric_problem({"photometric_copies": 0, "photometric_brightness": 0, "photometric_noise": 0}) is None
    unchanged = {"photometric_copies": 2, "photometric_brightness": 0.0, "photometric_noise": 0.0}
    assert "copies of the unchanged images" in str(photometric_problem(unchanged))
