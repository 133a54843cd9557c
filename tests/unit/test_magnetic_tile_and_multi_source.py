"""The Magnetic Tile reader on a generated tree in its own layout, and runs that chain several sources."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moleflow.data import ContinualDataModule, DatasetLayoutError, generate_synthetic_mvtec, magnetic_tile_splits
from moleflow.data.magnetic_tile import MT_DEFECTS, read_magnetic_tile

FREE = 12
PER_DEFECT = {"Blowhole": 3, "Break": 2, "Crack": 2, "Fray": 1, "Uneven": 2}


def write_magnetic_tile(root: Path, free: int = FREE, per_defect: dict[str, int] | None = None) -> Path:
    """A tree in Magnetic Tile's layout: MT_<Kind>/Imgs/<name>.jpg + <name>.png, sizes differing per image."""
    rng = np.random.default_rng(0)
    counts = {"Free": free, **(per_defect or PER_DEFECT)}
    for kind, n in counts.items():
        folder = root / f"MT_{kind}" / "Imgs"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = 40 + 3 * i, 60 - 2 * i
            grey = rng.integers(60, 200, size=(h, w), dtype=np.uint8)
            mask = np.zeros((h, w), dtype=np.uint8)
            if kind != "Free":
                mask[5:12, 10:20] = 255
                grey[mask > 0] = 10
            Image.fromarray(grey).save(folder / f"exp{i % 6 + 1}_num_{1000 + i}.jpg")
            Image.fromarray(mask).save(folder / f"exp{i % 6 + 1}_num_{1000 + i}.png")
    return root


@pytest.fixture()
def mt_root(tmp_path: Path) -> Path:
    return write_magnetic_tile(tmp_path / "magnetic_tile")


def test_reader_finds_every_image_with_its_mask(mt_root: Path) -> None:
    normals, anomalous = read_magnetic_tile(mt_root)
    assert len(normals) == FREE and all(s.label == 0 and s.mask_path is None for s in normals)
    assert len(anomalous) == sum(PER_DEFECT.values())
    assert {s.defect_type for s in anomalous} == {d.lower() for d in MT_DEFECTS}
    assert all(s.mask_path == s.image_path.with_suffix(".png") for s in anomalous)


def test_split_is_seeded_disjoint_and_holds_out_a_share_of_normals(mt_root: Path) -> None:
    (split,) = magnetic_tile_splits(mt_root, test_normal_fraction=0.25, seed=3)
    assert split.category == "magnetic_tile" and split.has_masks
    train = {s.image_path for s in split.train}
    test_normals = {s.image_path for s in split.test if s.label == 0}
    assert len(test_normals) == 3 and len(train) == FREE - 3 and not train & test_normals
    assert sum(s.label for s in split.test) == sum(PER_DEFECT.values())
    again = magnetic_tile_splits(mt_root, test_normal_fraction=0.25, seed=3)[0]
    other = magnetic_tile_splits(mt_root, test_normal_fraction=0.25, seed=4)[0]
    assert again == split
    assert {s.image_path for s in other.train} != train


def test_caps_and_defect_selection(mt_root: Path) -> None:
    options = {"defects": ["Crack"]}
    dm = ContinualDataModule(mt_root, None, source="magnetic_tile", source_options=options, max_train_per_task=4)
    (full,) = magnetic_tile_splits(mt_root, defects=["Crack"])
    (split,) = ContinualDataModule(
        mt_root, None, source="magnetic_tile", source_options=options, max_train_per_task=4, max_test_per_task=4
    ).splits
    assert len(split.train) == 4 and dm.splits[0].train == split.train and set(split.train) <= set(full.train)
    assert len(split.test) == 4 and {s.defect_type for s in split.test if s.label} == {"crack"}
    assert [s for s in full.test if s in split.test] == split.test  # order kept
    with pytest.raises(ValueError, match="Unknown Magnetic Tile defect type"):
        magnetic_tile_splits(mt_root, defects=["Scratch"])
    with pytest.raises(ValueError, match="one product"):
        magnetic_tile_splits(mt_root, categories=["a", "b"])


def test_missing_root_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*git clone https://github.com/abin24"):
        magnetic_tile_splits(tmp_path / "nowhere")


def test_masks_are_checked(mt_root: Path) -> None:
    mask = sorted((mt_root / "MT_Crack" / "Imgs").glob("*.png"))[0]
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(mask)
    with pytest.raises(DatasetLayoutError, match=r"is 5x5 px but its image"):
        read_magnetic_tile(mt_root)
    with Image.open(mask.with_suffix(".jpg")) as img:
        size = img.size
    Image.fromarray(np.zeros(size[::-1], dtype=np.uint8)).save(mask)
    with pytest.warns(UserWarning, match=f"Left out 1 defective .* marks no pixel: {mask.with_suffix('.jpg').name}"):
        _, anomalous = read_magnetic_tile(mt_root)
    assert len(anomalous) == sum(PER_DEFECT.values()) - 1
    mask.unlink()
    with pytest.raises(DatasetLayoutError, match="has no mask"):
        read_magnetic_tile(mt_root)


def test_datamodule_reads_magnetic_tile_with_masks_at_image_size(mt_root: Path) -> None:
    dm = ContinualDataModule(mt_root, None, image_size=32, source="magnetic_tile", source_options={"seed": 0})
    assert dm.task_names == ["magnetic_tile"] and dm.has_masks(0)
    test = dm.test_dataset(0)
    item = next(test[i] for i in range(len(test)) if test.samples[i].label == 1)
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert 0 < float(item["mask"].sum()) < 32 * 32


def test_one_run_takes_its_tasks_from_several_sources(mt_root: Path, tmp_path: Path) -> None:
    generated = generate_synthetic_mvtec(tmp_path / "gen", categories=["stripes", "dots"], image_size=32)
    sources = [
        {"source": "mvtec", "root": str(generated), "categories": ["stripes", "dots"]},
        {"source": "magnetic_tile", "root": str(mt_root), "categories": ["tile"], "source_options": {"seed": 1}},
        {"source": "mvtec", "root": str(generated), "categories": ["dots"], "prefix": "again_"},
    ]
    dm = ContinualDataModule(None, None, image_size=32, source="multi", sources=sources)
    assert dm.task_names == ["stripes", "dots", "tile", "again_dots"]
    assert dm.origin["tile"] == {"source": "magnetic_tile", "root": str(mt_root), "name": "magnetic_tile"}
    assert len(dm.train_dataset(2)) == FREE - 3
    picked = ContinualDataModule(None, ["tile", "stripes"], image_size=32, source="multi", sources=sources)
    assert picked.task_names == ["tile", "stripes"]


def test_multi_source_errors_name_the_fix(mt_root: Path, tmp_path: Path) -> None:
    generated = generate_synthetic_mvtec(tmp_path / "gen", categories=["dots"], image_size=32)
    twice = [{"source": "mvtec", "root": str(generated), "categories": ["dots"]}] * 2
    with pytest.raises(ValueError, match="give one of them a `prefix`"):
        ContinualDataModule(None, None, source="multi", sources=twice).setup()
    with pytest.raises(ValueError, match="needs data.sources"):
        ContinualDataModule(None, None, source="multi")
    with pytest.raises(ValueError, match=r"data.sources\[0\] has unknown keys \['roots'\]"):
        ContinualDataModule(None, None, source="multi", sources=[{"source": "mvtec", "roots": "x"}]).setup()
    with pytest.raises(ValueError, match="only read with data.source=multi"):
        ContinualDataModule(generated, ["dots"], sources=twice)
    with pytest.raises(ValueError, match=r"data.categories \['nope'\] are not among"):
        ContinualDataModule(None, ["nope"], source="multi", sources=twice[:1]).setup()


def test_anti_aliased_masks_are_cut_at_half(mt_root: Path) -> None:
    """The reader asks for a 127 cut (anti-aliased edges); masks elsewhere keep "any non-zero value"."""
    from moleflow.data.datasets import SampleDataset

    soft = np.array([[0, 60, 127, 128, 255, 255]], dtype=np.uint8).repeat(6, axis=0)
    _, anomalous = read_magnetic_tile(mt_root)
    sample = anomalous[0]
    Image.fromarray(soft).save(sample.mask_path)
    Image.fromarray(soft).save(sample.image_path)
    item = SampleDataset([sample], image_size=6)[0]
    assert np.array_equal(item["mask"][0, 0].numpy(), np.array([0, 0, 0, 1, 1, 1], dtype=np.float32))
    plain = SampleDataset([replace(sample, mask_threshold=None)], image_size=6)[0]
    assert np.array_equal(plain["mask"][0, 0].numpy(), np.array([0, 1, 1, 1, 1, 1], dtype=np.float32))
