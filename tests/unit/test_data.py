"""Tests of the data layer: synthetic generator, layout scanning, image loading, datasets, DataModule."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MVTEC_CATEGORIES,
    SYNTHETIC_CATEGORIES,
    ContinualDataModule,
    DatasetLayoutError,
    ImageReadError,
    SampleDataset,
    generate_synthetic_mvtec,
    load_mask,
    load_rgb,
    scan_categories,
    scan_category,
)
from moleflow.data.synthetic import MANIFEST_NAME, main

CATS = list(SYNTHETIC_CATEGORIES[:3])
SMALL = {"num_train": 3, "num_test_good": 2, "num_test_defect": 1, "image_size": 32}


def _denormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return image * std + mean


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_root(tmp_path: Path) -> Path:
    """A tiny one-category tree that tests may damage."""
    return generate_synthetic_mvtec(tmp_path / "small", categories=["stripes"], **SMALL)


# ------------------------------------------------------------------------------------------ generator
def test_mvtec_categories() -> None:
    assert len(MVTEC_CATEGORIES) == 15
    assert MVTEC_CATEGORIES[0] == "bottle" and MVTEC_CATEGORIES[-1] == "zipper"


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a = _files(generate_synthetic_mvtec(tmp_path / "a", categories=CATS, **SMALL))
    b = _files(generate_synthetic_mvtec(tmp_path / "b", categories=CATS, **SMALL))
    assert a == b
    c = _files(generate_synthetic_mvtec(tmp_path / "c", categories=CATS, seed=1, **SMALL))
    assert c.keys() == a.keys()
    assert c["stripes/train/good/000.png"] != a["stripes/train/good/000.png"]


def test_generator_normal_images_vary(synthetic_root: Path) -> None:
    images = [np.asarray(Image.open(p)) for p in sorted((synthetic_root / "stripes/train/good").glob("*.png"))]
    assert len({img.tobytes() for img in images}) == len(images)


def test_generator_masks_exact_and_visible(synthetic_root: Path) -> None:
    for category in CATS:
        for defect in ("scratch", "blob"):
            images = sorted((synthetic_root / category / "test" / defect).glob("*.png"))
            assert len(images) == 4
            for image_path in images:
                mask_path = synthetic_root / category / "ground_truth" / defect / f"{image_path.stem}_mask.png"
                image = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
                raw_mask = np.asarray(Image.open(mask_path))
                assert set(np.unique(raw_mask)) <= {0, 255}
                mask = raw_mask > 0
                assert mask.mean() >= 0.03, f"{mask_path} covers only {mask.mean():.3f} of the image"
                # The defect is one flat colour exactly on the mask, and that colour is absent elsewhere.
                colours = np.unique(image[mask], axis=0)
                assert len(colours) == 1
                same_outside = np.all(image[~mask] == colours[0], axis=-1).mean()
                assert same_outside < 0.01
                # Clearly visible: far from the mean normal colour of the image.
                assert np.abs(colours[0] - image[~mask].mean(axis=0)).max() > 60


def test_generator_categories_differ_in_colour(tmp_path: Path) -> None:
    root = generate_synthetic_mvtec(tmp_path, categories=SYNTHETIC_CATEGORIES, **SMALL)
    means = np.stack(
        [np.asarray(Image.open(root / c / "train/good/000.png")).reshape(-1, 3).mean(0) for c in SYNTHETIC_CATEGORIES]
    )
    dists = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dists[~np.eye(len(means), dtype=bool)].min() > 40


def test_generator_idempotent_and_regenerates(tmp_path: Path) -> None:
    root = generate_synthetic_mvtec(tmp_path, categories=["stripes", "dots"], **SMALL)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["categories"] == ["stripes", "dots"] and manifest["complete"] is True
    probe = root / "stripes/train/good/000.png"
    stamp = probe.stat().st_mtime_ns
    generate_synthetic_mvtec(tmp_path, categories=["stripes", "dots"], **SMALL)
    assert probe.stat().st_mtime_ns == stamp

    generate_synthetic_mvtec(tmp_path, categories=["checker"], **{**SMALL, "num_train": 2})
    assert not (root / "stripes").exists() and not (root / "dots").exists()
    assert len(list((root / "checker/train/good").glob("*.png"))) == 2


def test_generator_refuses_foreign_folder_and_bad_args(tmp_path: Path) -> None:
    (tmp_path / "stripes").mkdir()
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        generate_synthetic_mvtec(tmp_path, categories=["stripes"], **SMALL)
    with pytest.raises(ValueError, match="Unknown synthetic categories.*bottle"):
        generate_synthetic_mvtec(tmp_path / "x", categories=["bottle"])
    with pytest.raises(ValueError, match="more than once"):
        generate_synthetic_mvtec(tmp_path / "x", categories=["dots", "dots"])


def test_generator_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--categories", "noise", "gradient", "--seed", "3", "--image-size", "32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    split = scan_category(out, "gradient")
    assert Image.open(split.train[0].image_path).size == (32, 32)


# ------------------------------------------------------------------------------------------- scanning
def test_scan_counts(synthetic_root: Path) -> None:
    splits = scan_categories(synthetic_root, CATS)
    assert [s.category for s in splits] == CATS
    for split in splits:
        assert len(split.train) == 12
        assert all(s.label == 0 and s.mask_path is None and s.defect_type == "good" for s in split.train)
        good = [s for s in split.test if s.label == 0]
        bad = [s for s in split.test if s.label == 1]
        assert len(good) == 4 and len(bad) == 8
        assert all(s.mask_path is None and s.defect_type == "good" for s in good)
        assert {s.defect_type for s in bad} == {"scratch", "blob"}
        assert all(s.mask_path is not None and s.mask_path.is_file() for s in bad)
        names = [s.image_path.name for s in split.train]
        assert names == sorted(names)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match=re.escape(str(missing))) as info:
        scan_categories(missing, ["bottle"])
    text = str(info.value)
    assert "mvtec.com" in text and "data=generated" in text and "ROOT/CATEGORY/train/good" in text


def test_unknown_category_lists_present(synthetic_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"'bottle' not found.*present.*'checker', 'dots', 'stripes'"):
        scan_categories(synthetic_root, ["stripes", "bottle"])
    with pytest.raises(DatasetLayoutError) as info:
        scan_categories(synthetic_root, ["bottle"])
    assert all(c in str(info.value) for c in CATS)


def test_duplicated_category(synthetic_root: Path) -> None:
    with pytest.raises(ValueError, match="'stripes' appears more than once"):
        scan_categories(synthetic_root, ["stripes", "dots", "stripes"])
    with pytest.raises(ValueError, match="more than once"):
        ContinualDataModule(synthetic_root, ["dots", "dots"])


def test_empty_train_folder(small_root: Path) -> None:
    train = small_root / "stripes/train/good"
    for p in train.iterdir():
        p.unlink()
    (train / "readme.txt").write_text("not an image")
    with pytest.raises(DatasetLayoutError, match=f"No training images in {re.escape(str(train))}"):
        scan_category(small_root, "stripes")


def test_defect_without_mask_names_image(small_root: Path) -> None:
    shutil.rmtree(small_root / "stripes/ground_truth/scratch")
    image = small_root / "stripes/test/scratch/000.png"
    with pytest.raises(DatasetLayoutError, match=re.escape(str(image))) as info:
        scan_category(small_root, "stripes")
    assert "000_mask.png" in str(info.value)


def test_missing_and_empty_test_folder(small_root: Path) -> None:
    test_dir = small_root / "stripes/test"
    for sub in test_dir.iterdir():
        shutil.rmtree(sub)
    with pytest.raises(DatasetLayoutError, match=f"No test images in {re.escape(str(test_dir))}"):
        scan_category(small_root, "stripes")
    test_dir.rmdir()
    with pytest.raises(DatasetLayoutError, match=f"Missing test folder {re.escape(str(test_dir))}"):
        scan_category(small_root, "stripes")


def test_non_image_files_ignored(small_root: Path) -> None:
    before = scan_category(small_root, "stripes")
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        for name in ("notes.txt", ".DS_Store", "Thumbs.db"):
            (small_root / "stripes" / folder / name).write_bytes(b"junk")
    (small_root / "stripes/test/.ipynb_checkpoints").mkdir()
    assert scan_category(small_root, "stripes") == before


def test_mask_name_variants_and_upper_case(small_root: Path) -> None:
    gt = small_root / "stripes/ground_truth"
    (gt / "scratch/000_mask.png").rename(gt / "scratch/000.png")
    Image.open(gt / "blob/000_mask.png").save(gt / "blob/000_mask.jpg", quality=95)
    (gt / "blob/000_mask.png").unlink()
    train = small_root / "stripes/train/good"
    (train / "000.png").rename(train / "000.PNG")
    split = scan_category(small_root, "stripes")
    masks = {s.defect_type: s.mask_path for s in split.test if s.label == 1}
    assert masks["scratch"] == gt / "scratch/000.png"
    assert masks["blob"] == gt / "blob/000_mask.jpg"
    assert split.train[0].image_path.name == "000.PNG"
    # The JPEG mask is thresholded, so compression noise does not grow the defect.
    png_like = np.asarray(Image.open(gt / "blob/000_mask.jpg").convert("L")) > 127
    loaded = load_mask(masks["blob"], 32, expected_hw=(32, 32))
    assert torch.equal(loaded[0] > 0, torch.from_numpy(png_like))


# --------------------------------------------------------------------------------------------- images
def test_dataset_shapes_dtypes_and_normalisation(synthetic_root: Path) -> None:
    split = scan_category(synthetic_root, "checker")
    ds = SampleDataset(split.test, image_size=64)
    assert len(ds) == 12
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert item["index"].dtype == torch.int64 and int(item["index"]) == i
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        raw = torch.from_numpy(np.asarray(Image.open(split.test[i].image_path).convert("RGB")).copy())
        expected = raw.permute(2, 0, 1).float() / 255
        assert torch.allclose(_denormalise(item["image"]), expected, atol=1e-5)
    good = ds[next(i for i, s in enumerate(ds.samples) if s.label == 0)]
    bad_index = next(i for i, s in enumerate(ds.samples) if s.label == 1)
    bad = ds[bad_index]
    assert int(good["label"]) == 0 and good["mask"].sum() == 0
    assert int(bad["label"]) == 1 and bad["mask"].mean() >= 0.03
    # Resized masks stay binary and aligned with their images.
    small = SampleDataset(split.test, image_size=40)[bad_index]
    assert small["image"].shape == (3, 40, 40) and set(small["mask"].unique().tolist()) == {0.0, 1.0}
    assert len(pickle.loads(pickle.dumps(ds))) == len(ds)


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("L", (50, 30)),
        ("LA", (64, 64)),
        ("RGBA", (20, 90)),
        ("P", (64, 64)),
        ("I;16", (33, 47)),
        ("RGB", (128, 96)),
    ],
)
def test_load_rgb_modes_and_sizes(tmp_path: Path, mode: str, size: tuple[int, int]) -> None:
    w, h = size
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "img.png"
    img.save(path)
    image, hw = load_rgb(path, 24)
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert hw == (h, w)
    if mode in ("L", "LA", "I;16"):
        rgb = _denormalise(image)
        assert torch.allclose(rgb[0], rgb[1], atol=1e-5) and torch.allclose(rgb[1], rgb[2], atol=1e-5)


def test_load_rgb_16bit_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    image, _ = load_rgb(path, 2)
    grey = _denormalise(image)[0]
    expected = torch.tensor([[0, 64], [128, 255]], dtype=torch.float32) / 255
    assert torch.allclose(grey, expected, atol=1 / 255 + 1e-5)


def test_truncated_and_fake_images(small_root: Path) -> None:
    path = small_root / "stripes/train/good/000.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=re.escape(str(path)) + ".*re-extract"):
        load_rgb(path, 32)
    ds = ContinualDataModule(small_root, ["stripes"], image_size=32).train_dataset(0)
    with pytest.raises(ImageReadError, match=re.escape(str(path))):
        ds[0]
    fake = small_root / "stripes/train/good/001.png"
    fake.write_text("this is not a PNG")
    with pytest.raises(ImageReadError, match=re.escape(str(fake))):
        load_rgb(fake, 32)
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        load_rgb(small_root / "nothing.png", 32)


def test_mask_wrong_size_names_both_files(small_root: Path) -> None:
    mask = small_root / "stripes/ground_truth/blob/000_mask.png"
    image = small_root / "stripes/test/blob/000.png"
    samples = scan_category(small_root, "stripes").test  # scanned while the pair still matches
    Image.new("L", (16, 20), 255).save(mask)
    # the scan compares the file headers: a bad pair is named before any training
    with pytest.raises(ValueError, match=re.escape(str(mask))) as info:
        scan_category(small_root, "stripes")
    assert str(image) in str(info.value) and "16x20" in str(info.value) and "32x32" in str(info.value)
    # and the loader still checks (a mask replaced after the scan)
    ds = SampleDataset(samples, image_size=32)
    index = next(i for i, s in enumerate(ds.samples) if s.image_path == image)
    with pytest.raises(ValueError, match=re.escape(str(mask))) as info:
        ds[index]
    assert str(image) in str(info.value) and "(20, 16)" in str(info.value) and "(32, 32)" in str(info.value)


def test_load_mask_binarises_then_resizes(tmp_path: Path) -> None:
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[:4, :4] = 1  # faint but non-zero: anomalous
    arr[6:, 6:] = 200
    path = tmp_path / "m.png"
    Image.fromarray(arr).save(path)
    mask = load_mask(path, 16, expected_hw=(8, 8))
    assert mask.shape == (1, 16, 16) and mask.dtype == torch.float32
    assert mask[0, :8, :8].eq(1).all() and mask[0, 12:, 12:].eq(1).all()
    assert mask.sum() == 64 + 16


# ----------------------------------------------------------------------------------------- datamodule
def test_datamodule_tasks(synthetic_root: Path) -> None:
    dm = ContinualDataModule(synthetic_root, CATS, image_size=32, train_batch_size=5, eval_batch_size=7)
    dm.prepare_data()
    dm.setup()
    splits = dm.splits
    dm.setup("fit")
    assert dm.splits is splits  # scanned once
    assert dm.num_tasks == 3 and dm.task_names == CATS and dm.current_task == 0

    dm.set_task(1)
    loader = dm.train_dataloader()
    ds = loader.dataset
    assert isinstance(ds, SampleDataset) and len(ds) == 12
    assert all(s.label == 0 and s.image_path.parent == synthetic_root / CATS[1] / "train/good" for s in ds.samples)
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == [5, 5, 2]  # no drop_last
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(12))  # fixed order
    assert all(b["label"].eq(0).all() and b["image"].shape[1:] == (3, 32, 32) for b in batches)

    tests = dm.test_dataloader()
    assert len(tests) == 2
    assert [list(lt.dataset.samples) for lt in tests] == [dm.splits[0].test, dm.splits[1].test]
    assert dm.test_dataloader_for(1).batch_size == 7
    with pytest.raises(ValueError, match="has not been seen yet"):
        dm.test_dataloader_for(2)
    with pytest.raises(IndexError, match="out of range"):
        dm.set_task(3)
    with pytest.raises(IndexError, match="out of range"):
        dm.test_dataset(-1)
    dm.set_task(2)
    assert len(dm.test_dataloader()) == 3


def test_datamodule_validates_all_categories_early(synthetic_root: Path) -> None:
    dm = ContinualDataModule(synthetic_root, ["stripes", "bottle"])
    with pytest.raises(DatasetLayoutError, match="bottle"):
        dm.setup()


def test_datamodule_workers(synthetic_root: Path) -> None:
    dm = ContinualDataModule(synthetic_root, CATS[:1], image_size=32, train_batch_size=6, num_workers=1)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    assert sum(len(b["label"]) for b in loader) == 12


def _grey_ramp() -> np.ndarray:
    return (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)


def test_integer_images_are_scaled_by_their_real_bit_depth(tmp_path: Path) -> None:
    """8-bit data in a 32-bit 'I' image stays 8-bit; 16-bit containers stay 16-bit; 32-bit data by 2^32-1."""
    grey = _grey_ramp()
    Image.fromarray(grey).save(tmp_path / "l8.png")
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i32_holding_8bit.tif")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(grey.astype(np.int32) * 257).save(tmp_path / "i32_holding_16bit.tif")
    assert Image.open(tmp_path / "i32_holding_8bit.tif").mode == "I"
    reference, _ = load_rgb(tmp_path / "l8.png", 32)
    for name in ("i32_holding_8bit.tif", "i16.png", "i32_holding_16bit.tif"):
        image, _ = load_rgb(tmp_path / name, 32)
        assert torch.equal(image, reference), name
    dark16 = Image.fromarray((grey // 4).astype(np.uint16))  # a dark 16-bit image is not brightened 257x
    dark16.save(tmp_path / "dark16.png")
    assert float(_denormalise(load_rgb(tmp_path / "dark16.png", 32)[0]).max()) < 0.01


def test_cmyk_images_are_converted(tmp_path: Path) -> None:
    rgb = np.stack([_grey_ramp(), 255 - _grey_ramp(), _grey_ramp() // 2], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    for name in ("cmyk.tif", "cmyk.jpg"):
        Image.fromarray(rgb).convert("CMYK").save(tmp_path / name, **({"quality": 100} if "jpg" in name else {}))
        assert Image.open(tmp_path / name).mode == "CMYK"
        image, hw = load_rgb(tmp_path / name, 32)
        expected, _ = load_rgb(tmp_path / "rgb.png", 32)
        assert hw == (32, 32) and (_denormalise(image) - _denormalise(expected)).abs().max() < 0.06, name


def test_exif_rotated_image_and_its_mask_are_read_upright(tmp_path: Path) -> None:
    """A camera JPEG stored sideways with EXIF orientation 6; its mask drawn on the upright picture."""
    upright = np.zeros((40, 24, 3), dtype=np.uint8)
    upright[:10] = 255  # a white band at the top of the picture as shown
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 40 x 24
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    mask = np.zeros((40, 24), dtype=np.uint8)
    mask[:10] = 255
    Image.fromarray(mask).save(tmp_path / "photo_mask.png")
    image, hw = load_rgb(tmp_path / "photo.jpg", 40)
    assert hw == (40, 24)  # upright (H, W), not the stored (24, 40)
    top, bottom = _denormalise(image)[:, :5].mean(), _denormalise(image)[:, -5:].mean()
    assert top > 0.9 and bottom < 0.1
    loaded = load_mask(tmp_path / "photo_mask.png", 40, expected_hw=hw, image_path=tmp_path / "photo.jpg")
    assert loaded[0, :5].min() == 1 and loaded[0, -5:].max() == 0
    from moleflow.data.mvtec import _check_mask_size

    _check_mask_size(tmp_path / "photo.jpg", tmp_path / "photo_mask.png")  # upright sizes agree: no error


def test_unreadable_mask_is_named_at_scan_time(small_root: Path) -> None:
    mask = small_root / "stripes/ground_truth/blob/000_mask.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    with pytest.raises(ImageReadError, match=re.escape(str(mask))) as info:
        scan_category(small_root, "stripes")
    assert "mask" in str(info.value)
    with pytest.raises(ImageReadError, match=re.escape(str(mask))):
        load_mask(mask, 32, None)


def test_unconvertible_image_mode_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "odd.tif"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).convert("LAB").save(path)
    image, _ = load_rgb(path, 8)  # LAB converts
    assert image.shape == (3, 8, 8)
    from moleflow.data.images import _converted

    with pytest.raises(ImageReadError, match=re.escape(str(path)) + r".*mode 'La'"):
        _converted(lambda img: img.convert("RGB"), Image.new("La", (2, 2)), path, "Image")


def test_broken_image_symlink_in_a_data_set_is_named(small_root: Path) -> None:
    good = small_root / "stripes/train/good"
    (good / "zz_link.png").symlink_to(small_root / "moved_away.png")
    with pytest.raises(DatasetLayoutError, match=re.escape(str(good / "zz_link.png"))) as info:
        scan_category(small_root, "stripes")
    assert "moved_away.png" in str(info.value)
    (good / "zz_link.png").unlink()
    masks = small_root / "stripes/ground_truth/blob"
    (masks / "000_mask.png").rename(small_root / "elsewhere.png")
    (masks / "000_mask.png").symlink_to(small_root / "gone.png")
    with pytest.raises(DatasetLayoutError, match=re.escape(str(masks / "000_mask.png"))):
        scan_category(small_root, "stripes")


def test_uint16_array_is_read_like_a_16bit_png(tmp_path: Path) -> None:
    from moleflow.data.inputs import array_to_pil, pil_to_tensor

    values = (_grey_ramp().astype(np.uint16) * 3).astype(np.uint16)  # 16-bit data that happens to be dark
    Image.fromarray(values).save(tmp_path / "grey16.png")
    from_file, _ = load_rgb(tmp_path / "grey16.png", 32)
    assert torch.equal(pil_to_tensor(array_to_pil(values), 32), from_file)


def test_generated_trees_of_other_settings_live_side_by_side(tmp_path: Path) -> None:
    """Generating with other settings never deletes a tree that a parallel job may be reading."""
    from moleflow.data.datamodule import ContinualDataModule, data_settings_for_reading

    def module(size: int) -> ContinualDataModule:
        generate = {"num_train": 2, "num_test_good": 1, "num_test_defect": 1, "image_size": size, "seed": 0}
        return ContinualDataModule(root=tmp_path, categories=["stripes"], image_size=size, generate=generate)

    small, large = module(32), module(48)
    small.prepare_data()
    first = sorted(p.relative_to(tmp_path) for p in small.root.rglob("*.png"))
    large.prepare_data()  # another setting: its own folder, the first tree untouched
    assert small.root != large.root and small.root.parent == large.root.parent == tmp_path
    assert sorted(p.relative_to(tmp_path) for p in small.root.rglob("*.png")) == first
    assert module(32).root == small.root  # the same settings find the same tree
    stored = {"root": str(tmp_path), "categories": ["stripes"], "generate": dict(small.generate)}
    reading = data_settings_for_reading(stored)
    assert reading["root"] == str(small.root) and reading["generate"] is None


def test_validation_part_never_overlaps_the_test_part(synthetic_root: Path) -> None:
    """With data.validation_share, a run scores either the validation or the test part, disjoint and seeded."""
    from moleflow.data.datamodule import ContinualDataModule

    def tests(**kwargs) -> dict[str, set[Path]]:
        dm = ContinualDataModule(root=synthetic_root, categories=["stripes", "dots"], image_size=32, **kwargs)
        dm.setup()
        return {s.category: {x.image_path for x in s.test} for s in dm.category_splits}

    full = tests()
    val = tests(validation_share=0.5, evaluate_on="validation")
    test = tests(validation_share=0.5, evaluate_on="test")
    for name in full:
        assert val[name] and test[name] and not val[name] & test[name]
        assert val[name] | test[name] == full[name]
    assert tests(validation_share=0.5, evaluate_on="validation") == val  # seeded
    capped = tests(validation_share=0.5, evaluate_on="test", max_test_per_task=2)
    assert all(capped[n] <= test[n] for n in full)  # the cap draws from the test part only
    with pytest.raises(ValueError, match="needs a validation part"):
        tests(evaluate_on="validation")
    with pytest.raises(ValueError, match="evaluate_on"):
        tests(validation_share=0.5, evaluate_on="train")
