"""Tests of the ELPV and user-folder task sources and of their dispatch in the DataModule."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.data import (
    ELPV_TASKS,
    ContinualDataModule,
    DatasetLayoutError,
    elpv_counts,
    elpv_labels_csv,
    elpv_splits,
    folder_splits,
    generate_synthetic_mvtec,
    scan_category,
)
from moleflow.data import elpv as elpv_module
from moleflow.data.types import CategorySplit

# Real ELPV labels (elpv-dataset 2624 cells), counted once by hand from labels.csv:
# {type: {probability: cells}}.
REAL_ELPV = {
    "mono": {0.0: 588, 1 / 3: 117, 2 / 3: 56, 1.0: 313},
    "poly": {0.0: 920, 1 / 3: 178, 2 / 3: 50, 1.0: 402},
}

# A small ELPV-format tree: (cell type, probability text) per image, in file order (types interleaved).
FAKE_ROWS = [
    ("mono", "0.0"),
    ("poly", "1.0"),
    ("mono", "1.0"),
    ("mono", "0.0"),
    ("poly", "0.0"),
    ("mono", "0.3333333333333333"),
    ("mono", "0.0"),
    ("poly", "0.0"),
    ("mono", "0.6666666666666666"),
    ("mono", "0.0"),
    ("poly", "0.6666666666666666"),
    ("mono", "0.0"),
    ("poly", "0.0"),
    ("mono", "1.0"),
    ("poly", "0.3333333333333333"),
    ("mono", "0.0"),
    ("poly", "0.0"),
    ("mono", "0.0"),
    ("poly", "1.0"),
    ("mono", "0.6666666666666666"),
    ("poly", "0.0"),
    ("mono", "0.0"),
    ("mono", "0.3333333333333333"),
    ("poly", "0.0"),
]


def _write_labels(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """labels.csv in the package's format: padded whitespace-separated columns, no header."""
    path.write_text("".join(f"{name:<20} {prob:<20} {kind}\n" for name, prob, kind in rows))


@pytest.fixture
def fake_elpv(tmp_path: Path) -> Path:
    """labels.csv plus 24 grey 20 x 20 cell images (mono: 8 normal, 2 + 2 defective, 2 uncertain; poly: 6, 1 + 2, 1)."""
    root = tmp_path / "elpv"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (kind, prob) in enumerate(FAKE_ROWS, start=1):
        name = f"images/cell{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(root / name)
        rows.append((name, prob, kind))
    _write_labels(root / "labels.csv", rows)
    return root / "labels.csv"


def _names(samples) -> list[str]:
    return [s.image_path.name for s in samples]


def _counts(split: CategorySplit) -> tuple[int, int, int]:
    return len(split.train), sum(s.label == 0 for s in split.test), sum(s.label == 1 for s in split.test)


# ----------------------------------------------------------------------------------------------- ELPV
def test_elpv_real_package_counts() -> None:
    csv = elpv_labels_csv()
    assert csv.name == "labels.csv" and csv.parent.name == "data"
    # Independent parse: probability column -> class per type.
    table: dict[str, Counter] = {t: Counter() for t in ELPV_TASKS}
    lines = [ln.split() for ln in csv.read_text().splitlines() if ln.strip()]
    assert len(lines) == 2624
    for _, prob, kind in lines:
        table[kind][round(float(prob) * 3)] += 1
    for kind, expected in REAL_ELPV.items():
        assert dict(table[kind]) == {round(p * 3): n for p, n in expected.items()}

    counts = elpv_counts()
    with_uncertain = elpv_counts(include_uncertain=True)
    for kind in ELPV_TASKS:
        normals, uncertain, anomalous = table[kind][0], table[kind][1], table[kind][2] + table[kind][3]
        n_test = round(0.25 * normals)
        assert counts[kind] == {"train": normals - n_test, "test_normal": n_test, "test_anomalous": anomalous}
        assert with_uncertain[kind]["test_anomalous"] == anomalous + uncertain
    assert counts == {
        "mono": {"train": 441, "test_normal": 147, "test_anomalous": 369},
        "poly": {"train": 690, "test_normal": 230, "test_anomalous": 452},
    }


def test_elpv_real_split_disjoint_sorted_deterministic() -> None:
    splits = elpv_splits()
    assert [s.category for s in splits] == ["mono", "poly"]
    assert elpv_splits() == splits
    seen: set[Path] = set()
    for split in splits:
        assert split.has_masks is False
        train = {s.image_path for s in split.train}
        test = {s.image_path for s in split.test}
        assert not train & test and not (train | test) & seen
        seen |= train | test
        assert _names(split.train) == sorted(_names(split.train))
        assert _names(split.test) == sorted(_names(split.test))
        assert all(s.mask_path is None for s in [*split.train, *split.test])
        assert {s.defect_type for s in split.train} == {"good"}
        assert {s.defect_type for s in split.test} == {"good", "defect_p067", "defect_p100"}
    # Reversing the task order does not change a task's split (streams are keyed by the task name).
    assert elpv_splits(tasks=["poly", "mono"]) == splits[::-1]


def test_elpv_real_subsampling() -> None:
    full = {s.category: s for s in elpv_splits()}

    def capped(max_train: int | None, max_test: int | None, tasks: list[str] | None = None) -> list[CategorySplit]:
        dm = ContinualDataModule(None, tasks, source="elpv", max_train_per_task=max_train, max_test_per_task=max_test)
        return dm.splits

    small = capped(50, 40)
    assert small == capped(50, 40)
    assert {s.category: _counts(s) for s in small} == {"mono": (50, 11, 29), "poly": (50, 13, 27)}
    for split in small:
        ref = full[split.category]
        assert set(split.train) <= set(ref.train) and set(split.test) <= set(ref.test)
        assert _names(split.train) == sorted(_names(split.train))
        assert _names(split.test) == sorted(_names(split.test))
    # Smallest test subsample keeps one of each kind; the held-out normals do not change with the limits.
    tiny = capped(None, 2, ["mono"])[0]
    assert sorted(s.label for s in tiny.test) == [0, 1]
    assert capped(10, None, ["mono"])[0].test == full["mono"].test
    with pytest.raises(ValueError, match="max_test_per_task must be None .* >= 2"):
        capped(None, 1)
    with pytest.raises(ValueError, match="max_train_per_task"):
        capped(0, None)


def test_elpv_real_image_loads() -> None:
    dm = ContinualDataModule(None, ["poly"], image_size=32, eval_batch_size=4, source="elpv")
    item = dm.test_dataset(0)[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["mask"].sum() == 0


def test_elpv_fake_tree_counts_and_types(fake_elpv: Path) -> None:
    splits = elpv_splits(labels_csv=fake_elpv)
    # mono: 8 normal (test 2), 2 x 2/3, 2 x 1, 2 x 1/3 left out; poly: 6 normal (test round(1.5) = 2), 1 + 2.
    assert [_counts(s) for s in splits] == [(6, 2, 4), (4, 2, 3)]
    mono = splits[0]
    assert Counter(s.defect_type for s in mono.test if s.label == 1) == {"defect_p067": 2, "defect_p100": 2}
    assert all(s.image_path.parent == fake_elpv.parent / "images" for s in [*mono.train, *mono.test])

    uncertain = elpv_splits(labels_csv=fake_elpv, include_uncertain=True)
    assert [_counts(s) for s in uncertain] == [(6, 2, 6), (4, 2, 4)]
    assert Counter(s.defect_type for s in uncertain[0].test)["defect_p033"] == 2
    assert [s.train for s in uncertain] == [s.train for s in splits]
    assert elpv_counts(labels_csv=fake_elpv)["poly"] == {"train": 4, "test_normal": 2, "test_anomalous": 3}


def test_elpv_seeded_split(fake_elpv: Path) -> None:
    a = elpv_splits(tasks=["mono"], labels_csv=fake_elpv, seed=3)[0]
    assert elpv_splits(tasks=["mono"], labels_csv=fake_elpv, seed=3)[0] == a
    normals = {s.image_path for s in a.train} | {s.image_path for s in a.test if s.label == 0}
    assert len(normals) == 8 and not {s.image_path for s in a.train} & {s.image_path for s in a.test}
    others = [elpv_splits(tasks=["mono"], labels_csv=fake_elpv, seed=s)[0].train for s in range(4, 10)]
    assert any(train != a.train for train in others)
    half = elpv_splits(tasks=["mono"], labels_csv=fake_elpv, test_normal_fraction=0.5)[0]
    assert _counts(half)[:2] == (4, 4)
    one = elpv_splits(tasks=["mono"], labels_csv=fake_elpv, test_normal_fraction=0.01)[0]
    assert _counts(one)[:2] == (7, 1)  # at least one normal test image
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        elpv_splits(labels_csv=fake_elpv, test_normal_fraction=1.0)


def test_elpv_probability_tolerance(fake_elpv: Path) -> None:
    lines = fake_elpv.read_text().splitlines()
    assert "0.6666666666666666" in lines[8]
    lines[8] = lines[8].replace("0.6666666666666666", "0.666667")  # within 1e-6 of 2/3
    fake_elpv.write_text("\n".join(lines) + "\n")
    assert [_counts(s) for s in elpv_splits(labels_csv=fake_elpv)] == [(6, 2, 4), (4, 2, 3)]
    lines[8] = lines[8].replace("0.666667", "0.67")
    fake_elpv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 9 .*cell0009.*'0.67' is not one of 0, 1/3, 2/3, 1"):
        elpv_splits(labels_csv=fake_elpv)
    lines[8] = "images/cell0009.png 1.0 amorphous"
    fake_elpv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 9 .*'amorphous' is not one of \['mono', 'poly'\]"):
        elpv_splits(labels_csv=fake_elpv)


def test_elpv_errors(fake_elpv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"Unknown ELPV task\(s\) \['cdte'\].*\['mono', 'poly'\]"):
        elpv_splits(tasks=["mono", "cdte"], labels_csv=fake_elpv)
    with pytest.raises(ValueError, match="more than once"):
        elpv_splits(tasks=["mono", "mono"], labels_csv=fake_elpv)
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        elpv_splits(labels_csv=fake_elpv.parent / "nothing.csv")
    (fake_elpv.parent / "images/cell0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"'mono': 1 image\(s\).*cell0001.png"):
        elpv_splits(labels_csv=fake_elpv)
    monkeypatch.setattr(elpv_module, "ELPV_PACKAGE", "moleflow_no_such_package_for_tests")
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install elpv-dataset") + ".*demo"):
        elpv_splits()


def test_datamodule_elpv_source(fake_elpv: Path) -> None:
    dm = ContinualDataModule(
        None,
        None,
        image_size=24,
        train_batch_size=4,
        eval_batch_size=5,
        source="elpv",
        source_options={"labels_csv": fake_elpv, "include_uncertain": True},
    )
    dm.setup()
    assert dm.task_names == ["mono", "poly"] and dm.num_tasks == 2
    assert dm.has_masks(0) is False and dm.has_masks(1) is False
    train_batches = list(dm.train_dataloader())
    assert sum(len(b["label"]) for b in train_batches) == 6
    assert all(b["image"].shape[1:] == (3, 24, 24) and b["label"].eq(0).all() for b in train_batches)
    dm.set_task(1)
    loaders = dm.test_dataloader()
    assert len(loaders) == 2 and not loaders[1].dataset.with_masks
    batches = list(loaders[1])
    assert sum(len(b["label"]) for b in batches) == 6
    for batch in batches:
        assert batch["image"].shape[1:] == (3, 24, 24)
        assert batch["mask"].shape[1:] == (1, 24, 24) and batch["mask"].eq(0).all()
    labels = torch.cat([b["label"] for b in batches])
    assert labels.eq(0).any() and labels.eq(1).any()


def test_datamodule_source_and_options_checked(fake_elpv: Path, tmp_path: Path) -> None:
    known = (
        r"\['mvtec', 'elpv', 'folder', 'visa', 'magnetic_tile', 'kolektor', 'bsdata', 'piped', 'crackforest', 'multi'\]"
    )
    with pytest.raises(ValueError, match=r"Unknown data source 'csv'.*" + known):
        ContinualDataModule(tmp_path, ["a"], source="csv")
    with pytest.raises(ValueError, match=r"\['layout'\] are not accepted by source='elpv'.*labels_csv"):
        ContinualDataModule(None, ["mono"], source="elpv", source_options={"layout": "auto"})
    with pytest.raises(ValueError, match="accepted: none"):
        ContinualDataModule(tmp_path, ["a"], source_options={"seed": 1})
    with pytest.raises(ValueError, match="root is required for source='folder'"):
        ContinualDataModule(None, ["a"], source="folder")
    with pytest.raises(ValueError, match="categories is required for source='mvtec'"):
        ContinualDataModule(tmp_path, None)
    dm = ContinualDataModule(tmp_path / "ignored", ["poly"], source="elpv", source_options={"labels_csv": fake_elpv})
    assert dm.task_names == ["poly"] and len(dm.train_dataset(0)) == 4


# --------------------------------------------------------------------------------------------- folder
def _image(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def _mask(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[4:8, 4:8] = 255
    Image.fromarray(arr).save(path)


def _normal_abnormal(root: Path, category: str, normals: int = 8, abnormal: int = 3, masks: bool = False) -> Path:
    cat = root / category
    for i in range(normals):
        _image(cat / "normal" / f"n{i:02d}.png", 100 + i)
    for i in range(abnormal):
        _image(cat / "abnormal" / f"a{i:02d}.png", 10 + i)
        if masks:
            # Both accepted mask names: <stem>_mask.<ext> and <stem>.<ext>.
            _mask(cat / "masks" / (f"a{i:02d}_mask.png" if i % 2 == 0 else f"a{i:02d}.png"))
    (cat / "normal" / "notes.txt").write_text("not an image")
    return cat


def test_folder_normal_abnormal_with_masks(tmp_path: Path) -> None:
    cat = _normal_abnormal(tmp_path, "widget", masks=True)
    (split,) = folder_splits(tmp_path, ["widget"], layout="normal_abnormal")
    assert split.category == "widget" and split.has_masks is True
    assert _counts(split) == (6, 2, 3)
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in split.train)
    bad = [s for s in split.test if s.label == 1]
    assert [s.mask_path for s in bad] == [cat / "masks/a00_mask.png", cat / "masks/a01.png", cat / "masks/a02_mask.png"]
    assert {s.defect_type for s in bad} == {"abnormal"}
    normals = {s.image_path for s in split.train} | {s.image_path for s in split.test if s.label == 0}
    assert normals == set((cat / "normal").glob("*.png"))
    assert folder_splits(tmp_path, ["widget"], layout="normal_abnormal") == [split]

    dm = ContinualDataModule(tmp_path, ["widget"], image_size=16, eval_batch_size=10, source="folder")
    assert dm.has_masks(0) is True
    (batch,) = list(dm.test_dataloader_for(0))
    per_image = batch["mask"].flatten(1).sum(1)
    assert torch.equal(per_image > 0, batch["label"].bool())


def test_folder_normal_abnormal_without_masks(tmp_path: Path) -> None:
    _normal_abnormal(tmp_path, "widget")
    (split,) = folder_splits(tmp_path, ["widget"], layout="normal_abnormal", test_normal_fraction=0.5, seed=4)
    assert split.has_masks is False and _counts(split) == (4, 4, 3)
    assert all(s.mask_path is None for s in split.test)

    _normal_abnormal(tmp_path, "plain", abnormal=0)
    with pytest.warns(UserWarning, match=r"'plain' has no abnormal images.*normal images only"):
        (only_normal,) = folder_splits(tmp_path, ["plain"])
    assert _counts(only_normal) == (6, 2, 0)


def test_folder_auto_detects_both_layouts(tmp_path: Path) -> None:
    root = generate_synthetic_mvtec(
        tmp_path / "mixed", categories=["stripes"], num_train=3, num_test_good=2, num_test_defect=1, image_size=16
    )
    _normal_abnormal(root, "widget", masks=True)
    _normal_abnormal(root, "gizmo")
    splits = folder_splits(root, None)
    assert [s.category for s in splits] == ["gizmo", "stripes", "widget"]
    assert [s.has_masks for s in splits] == [False, True, True]
    assert splits[1] == scan_category(root, "stripes")
    assert folder_splits(root, ["stripes"], layout="mvtec") == [splits[1]]
    with pytest.raises(DatasetLayoutError, match="Missing training folder"):
        folder_splits(root, ["widget"], layout="mvtec")

    dm = ContinualDataModule(root, None, image_size=16, source="folder", source_options={"seed": 0})
    assert dm.task_names == ["gizmo", "stripes", "widget"] and dm.has_masks(0) is False

    (root / "odd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="neither a 'train' nor a 'normal' folder") as info:
        folder_splits(root, ["odd"])
    assert "ROOT/CATEGORY/train/good" in str(info.value) and "ROOT/CATEGORY/normal/" in str(info.value)


def test_folder_missing_mask_names_image_and_mask(tmp_path: Path) -> None:
    cat = _normal_abnormal(tmp_path, "widget", masks=True)
    (cat / "masks/a01.png").unlink()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(cat / "abnormal/a01.png"))) as info:
        folder_splits(tmp_path, ["widget"])
    assert str(cat / "masks/a01_mask.png") in str(info.value)


def test_folder_root_and_category_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match=re.escape(str(missing)) + " does not exist") as info:
        folder_splits(missing, ["widget"])
    assert "mvtec:" in str(info.value) and "normal_abnormal:" in str(info.value)
    with pytest.raises(DatasetLayoutError, match="no category sub-folders"):
        folder_splits(tmp_path, None)

    _normal_abnormal(tmp_path, "widget")
    _normal_abnormal(tmp_path, "gizmo")
    with pytest.raises(DatasetLayoutError, match=r"'bolt' not found.*present.*\['gizmo', 'widget'\]"):
        folder_splits(tmp_path, ["widget", "bolt"])
    with pytest.raises(ValueError, match="'widget' appears more than once"):
        folder_splits(tmp_path, ["widget", "widget"])
    with pytest.raises(ValueError, match=r"Unknown folder layout 'flat'.*'normal_abnormal'"):
        folder_splits(tmp_path, ["widget"], layout="flat")

    for p in (tmp_path / "gizmo/normal").iterdir():
        p.unlink()
    with pytest.raises(DatasetLayoutError, match="No normal images in " + re.escape(str(tmp_path / "gizmo/normal"))):
        folder_splits(tmp_path, ["gizmo"])
    _image(tmp_path / "gizmo/normal/only.png", 0)
    with pytest.raises(ValueError, match="'gizmo' has 1 normal image"):
        folder_splits(tmp_path, ["gizmo"])


def test_mvtec_splits_keep_masks(synthetic_root: Path) -> None:
    assert CategorySplit("x", [], []).has_masks is True
    dm = ContinualDataModule(synthetic_root, ["stripes"], image_size=32)
    assert dm.source == "mvtec" and dm.has_masks(0) is True and dm.test_dataset(0).with_masks
