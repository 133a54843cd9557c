"""experiments.dark_frame: every image and its mask framed alike, seeded, in a layout data=mvtec reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.dark_frame import build, main
from moleflow.data.mvtec import scan_category
from moleflow.data.synthetic import generate_synthetic_mvtec


def test_masks_stay_on_their_defects_and_the_frame_is_near_black(tmp_path: Path) -> None:
    root = generate_synthetic_mvtec(
        tmp_path / "src", categories=["dots"], num_train=3, num_test_good=1, num_test_defect=2
    )
    n = build(root, "dots", tmp_path / "out", scale=0.5, level=6.0, noise=1.5, seed=0)
    sources = [p for p in (root / "dots").rglob("*.png")]
    assert n == len(sources)
    for mask_path in (tmp_path / "out" / "dots" / "ground_truth").rglob("*_mask.png"):
        rel = mask_path.relative_to(tmp_path / "out" / "dots" / "ground_truth")
        image = np.asarray(Image.open(tmp_path / "out" / "dots" / "test" / rel.parent / rel.name.replace("_mask", "")))
        mask = np.asarray(Image.open(mask_path)) > 0
        original = np.asarray(Image.open(root / "dots" / "ground_truth" / rel)) > 0
        assert 0 < mask.sum() < original.sum()  # shrunk, not lost
        source_image = np.asarray(Image.open(root / "dots" / "test" / rel.parent / rel.name.replace("_mask", "")))
        assert abs(image[mask].mean() - source_image[original].mean()) < 40  # the defect's pixels moved with it
    good = np.asarray(Image.open(next((tmp_path / "out" / "dots" / "train" / "good").glob("*.png"))), dtype=float)
    corner = good[:4, :4]
    assert corner.mean() < 12 and corner.std() > 0  # near-black, noisy
    again = build(root, "dots", tmp_path / "again", scale=0.5, level=6.0, noise=1.5, seed=0)
    assert again == n
    same = tmp_path / "again" / "dots" / "train" / "good" / "000.png"
    assert np.array_equal(
        np.asarray(Image.open(same)), np.asarray(Image.open(tmp_path / "out" / "dots" / "train" / "good" / "000.png"))
    )
    split = scan_category(tmp_path / "out", "dots")  # read as data=mvtec reads it, masks checked
    assert len(split.train) == 3 and sum(s.mask_path is not None for s in split.test) == len(
        list((root / "dots" / "ground_truth").rglob("*.png"))
    )
    with pytest.raises(FileNotFoundError, match="not an MVTec-layout category"):
        build(root, "missing", tmp_path / "x", scale=0.5, level=6.0, noise=1.5, seed=0)


def test_the_test_images_can_get_another_background(tmp_path: Path) -> None:
    """--test-level / --test-noise: training frames pure black, test frames (validation part too) grey and noisy."""
    root = generate_synthetic_mvtec(
        tmp_path / "src", categories=["dots"], num_train=2, num_test_good=1, num_test_defect=1
    )
    build(root, "dots", tmp_path / "out", scale=0.5, level=0.0, noise=0.0, seed=0, test_level=6.0, test_noise=1.5)
    out = tmp_path / "out" / "dots"
    train = np.asarray(Image.open(next((out / "train" / "good").glob("*.png"))), dtype=float)
    assert train[:4, :4].max() == 0  # the training frame is exactly black
    for path in (out / "test").rglob("*.png"):
        corner = np.asarray(Image.open(path), dtype=float)[:4, :4]
        assert 3 < corner.mean() < 9 and corner.std() > 0
    for path in (out / "ground_truth").rglob("*.png"):
        assert np.asarray(Image.open(path))[:4, :4].max() == 0  # masks keep a zero frame
    cli = tmp_path / "cli"
    flags = "--scale 0.5 --level 0 --noise 0 --test-level 6 --test-noise 1.5".split()
    main([str(root), "dots", str(cli), *flags])
    main_test = next((cli / "dots" / "test" / "good").glob("*.png"))
    built = out / "test" / "good" / main_test.name
    assert np.array_equal(np.asarray(Image.open(main_test)), np.asarray(Image.open(built)))  # same flags, same files


def test_gain_darkens_the_object_and_not_the_frame_or_masks(tmp_path: Path) -> None:
    """--gain 0.25: the object's grey levels a quarter, the frame and the masks as without it."""
    root = generate_synthetic_mvtec(
        tmp_path / "src", categories=["dots"], num_train=2, num_test_good=1, num_test_defect=1
    )
    main([str(root), "dots", str(tmp_path / "plain"), "--scale", "0.5"])
    main([str(root), "dots", str(tmp_path / "dark"), "--scale", "0.5", "--gain", "0.25"])
    for plain_path in (tmp_path / "plain" / "dots").rglob("*.png"):
        rel = plain_path.relative_to(tmp_path / "plain" / "dots")
        plain = np.asarray(Image.open(plain_path), dtype=float)
        dark = np.asarray(Image.open(tmp_path / "dark" / "dots" / rel), dtype=float)
        h, w = plain.shape[:2]
        if rel.parts[0] == "ground_truth":
            assert np.array_equal(plain, dark)
            continue
        assert np.array_equal(plain[:4, :4], dark[:4, :4])  # the same seeded frame
        centre = (slice(h // 2 - 4, h // 2 + 4), slice(w // 2 - 4, w // 2 + 4))
        assert abs(dark[centre].mean() - 0.25 * plain[centre].mean()) < 2  # the object a quarter as bright
    with pytest.raises(ValueError, match="--gain must be in"):
        build(root, "dots", tmp_path / "x", scale=0.5, level=6.0, noise=1.5, seed=0, gain=2.0)
