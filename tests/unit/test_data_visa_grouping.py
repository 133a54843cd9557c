"""Tests of the VisA and MPDD data sets, task-grouping scenarios and their use in the DataModule."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from moleflow.data import (
    DATA_SOURCES,
    MPDD_CATEGORIES,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    CategorySplit,
    ContinualDataModule,
    DatasetLayoutError,
    Sample,
    SampleDataset,
    group_splits,
    parse_scenario,
    visa_splits,
)
from tests.helpers import compose_config

SYNTH = ["stripes", "checker", "dots"]

# Tiny VisA-like tree: per category (train normals, test normals, test anomalies).
VISA_COUNTS = {"candle": (4, 2, 3), "pcb1": (3, 1, 2)}
HEADER = "object,split,label,image,mask"


def _jpeg(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path, quality=95)


def _visa_mask(path: Path, size: int = 16) -> None:
    """A VisA-style mask: 0 background, a small non-255 class value on the defect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[2:6, 2:10] = 1
    Image.fromarray(arr).save(path)


def _write_visa(root: Path, counts: dict[str, tuple[int, int, int]] = VISA_COUNTS) -> list[str]:
    """Write images, masks and split_csv/1cls.csv; return the csv lines (header first)."""
    lines = [HEADER]
    for cat, (n_train, n_good, n_bad) in counts.items():
        # Listed out of order on purpose: the reader sorts by path.
        for i in reversed(range(n_train + n_good)):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            _jpeg(root / rel, 100 + i)
            lines.append(f"{cat},{'train' if i < n_train else 'test'},normal,{rel},")
        for i in range(n_bad):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mask = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            _jpeg(root / rel, 20 + i)
            _visa_mask(root / mask)
            lines.append(f"{cat},test,anomaly,{rel},{mask}")
    _write_csv(root, lines)
    return lines


def _write_csv(root: Path, lines: list[str]) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "visa"
    _write_visa(root)
    return root


# ----------------------------------------------------------------------------------------- datasets
def test_category_lists() -> None:
    assert len(VISA_CATEGORIES) == 12 and VISA_CATEGORIES[0] == "candle" and VISA_CATEGORIES[-1] == "pipe_fryum"
    assert MPDD_CATEGORIES == ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
    assert "visa" in DATA_SOURCES


def test_visa_counts_order_and_masks(visa_root: Path) -> None:
    splits = visa_splits(visa_root, ["pcb1", "candle"])
    assert [s.category for s in splits] == ["pcb1", "candle"]
    for split in splits:
        n_train, n_good, n_bad = VISA_COUNTS[split.category]
        assert split.has_masks
        assert len(split.train) == n_train and all(s.label == 0 and s.mask_path is None for s in split.train)
        assert [s.image_path.name for s in split.train] == sorted(s.image_path.name for s in split.train)
        assert Counter(s.label for s in split.test) == {0: n_good, 1: n_bad}
        bad = [s for s in split.test if s.label == 1]
        assert all(s.defect_type == "anomaly" and s.mask_path.is_file() for s in bad)
        assert all(s.mask_path.parent == visa_root / split.category / "Data/Masks/Anomaly" for s in bad)
    # Non-zero VisA mask values (here 1) are anomalous pixels.
    ds = SampleDataset(splits[1].test, image_size=16)
    item = ds[[s.label for s in ds.samples].index(1)]
    assert item["mask"].sum() == 32 and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["image"].shape == (3, 16, 16)
    # None = every category of the file, in VisA's usual order.
    assert [s.category for s in visa_splits(visa_root)] == ["candle", "pcb1"]


def test_visa_missing_root_and_csv(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match=re.escape(str(missing))) as info:
        visa_splits(missing)
    text = str(info.value)
    assert "amazon-science/spot-diff" in text and "VisA_20220922.tar" in text and "anomalib" in text
    assert "split_csv/1cls.csv" in text and "Data/Images" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(tmp_path / "empty" / "split_csv" / "1cls.csv"))):
        visa_splits(tmp_path / "empty")


def test_visa_unknown_category_and_bad_rows(visa_root: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"\['cashew'\] not in .*present: \['candle', 'pcb1'\]"):
        visa_splits(visa_root, ["candle", "cashew"])
    with pytest.raises(ValueError, match="more than once"):
        visa_splits(visa_root, ["candle", "candle"])
    lines = _write_visa(visa_root)
    _write_csv(visa_root, [*lines, "candle,val,normal,candle/x.JPG,"])
    with pytest.raises(ValueError, match=r"line \d+: split 'val'"):
        visa_splits(visa_root)
    _write_csv(visa_root, ["object,split,image", "candle,train,candle/x.JPG"])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['label', 'mask'\]"):
        visa_splits(visa_root)


def test_visa_missing_mask_and_image(visa_root: Path) -> None:
    mask = visa_root / "pcb1/Data/Masks/Anomaly/001.png"
    mask.unlink()
    with pytest.raises(DatasetLayoutError, match=re.escape(str(mask))) as info:
        visa_splits(visa_root, ["pcb1"])
    assert str(visa_root / "pcb1/Data/Images/Anomaly/001.JPG") in str(info.value)
    assert len(visa_splits(visa_root, ["candle"])) == 1  # other categories are unaffected
    image = visa_root / "candle/Data/Images/Normal/0000.JPG"
    image.unlink()
    with pytest.raises(DatasetLayoutError, match=r"1 image\(s\) listed in .* missing.*0000\.JPG"):
        visa_splits(visa_root, ["candle"])


def test_visa_datamodule(visa_root: Path) -> None:
    dm = ContinualDataModule(visa_root, ["candle", "pcb1"], image_size=16, source="visa")
    dm.setup()
    assert dm.task_names == ["candle", "pcb1"]
    assert len(dm.train_dataset(0)) == 4 and len(dm.test_dataset(1)) == 3 and dm.has_masks(1)
    dm_all = ContinualDataModule(visa_root, None, source="visa", source_options={"split_csv": "split_csv/1cls.csv"})
    assert dm_all.task_names == ["candle", "pcb1"]
    with pytest.raises(ValueError, match=r"accepted: \['split_csv'\]"):
        ContinualDataModule(visa_root, None, source="visa", source_options={"seed": 0})


def test_mpdd_missing_root_names_mpdd(tmp_path: Path) -> None:
    missing = tmp_path / "mpdd"
    dm = ContinualDataModule(missing, list(MPDD_CATEGORIES), source="mvtec", name="mpdd")
    with pytest.raises(DatasetLayoutError, match=re.escape(str(missing))) as info:
        dm.setup()
    text = str(info.value)
    assert "https://github.com/stepanje/MPDD" in text and "data.root" in text and "ROOT/CATEGORY/train/good" in text
    assert "mvtec.com" not in text
    # MVTec AD (and data sets without a hint) keep MVTec's message.
    for name in (None, "mvtec"):
        with pytest.raises(DatasetLayoutError, match="mvtec.com"):
            ContinualDataModule(missing, ["bottle"], name=name).setup()


def test_mpdd_missing_category_names_mpdd(synthetic_root: Path) -> None:
    dm = ContinualDataModule(synthetic_root, ["stripes", "tubes"], name="mpdd")
    with pytest.raises(DatasetLayoutError, match=r"'tubes' not found(.|\n)*stepanje/MPDD") as info:
        dm.setup()
    assert "mvtec.com" not in str(info.value)


def test_configs_compose(tmp_path: Path) -> None:
    visa = compose_config(["data=visa"], tmp_path).data
    assert visa.source == "visa" and list(visa.categories) == list(VISA_CATEGORIES)
    assert visa.root.endswith("/visa") and visa.task_groups is None
    mpdd = compose_config(["data=mpdd", "data.task_groups=3x2"], tmp_path).data
    assert mpdd.name == "mpdd" and mpdd.source == "mvtec" and list(mpdd.categories) == list(MPDD_CATEGORIES)
    assert mpdd.image_size == 224 and mpdd.root.endswith("/mpdd")
    assert parse_scenario(mpdd.task_groups, mpdd.categories) == [list(MPDD_CATEGORIES[:3]), list(MPDD_CATEGORIES[3:])]
    for name in ("mvtec", "generated", "elpv", "folder"):
        assert compose_config([f"data={name}"], tmp_path).data.task_groups is None


# ----------------------------------------------------------------------------------------- scenarios
def test_parse_scenario_standard() -> None:
    cats = list(MVTEC_CATEGORIES)
    # "A-B": the first A categories, then tasks of B each (the incremental-AD papers' "10-5 with 1 step").
    assert parse_scenario("10-5", cats) == [cats[:10], cats[10:]]
    assert parse_scenario("14-1", cats) == [cats[:14], [cats[14]]]
    assert parse_scenario("3x5", cats) == [cats[i : i + 3] for i in range(0, 15, 3)]
    assert parse_scenario(" 5 X 3 ", cats) == [cats[i : i + 5] for i in range(0, 15, 5)]
    ten_singles = [cats[:10], *[[c] for c in cats[10:]]]
    assert parse_scenario("10-1", cats) == ten_singles
    assert parse_scenario("10-1x5", cats) == ten_singles
    assert parse_scenario("10-1-1-1-1-1", cats) == ten_singles
    assert parse_scenario("10-2-3", cats) == [cats[:10], cats[10:12], cats[12:]]
    assert parse_scenario("5-5", cats) == [cats[:5], cats[5:10], cats[10:]]
    assert parse_scenario(None, cats) == [[c] for c in cats]
    assert parse_scenario("1x15", cats) == parse_scenario(None, cats)


def test_parse_scenario_explicit_lists() -> None:
    groups = [["stripes", "checker"], ["dots"]]
    assert parse_scenario(groups, SYNTH) == groups
    assert parse_scenario((["stripes"], ("checker", "dots")), SYNTH) == [["stripes"], ["checker", "dots"]]
    from_config = OmegaConf.create({"g": groups}).g  # ListConfig, as Hydra passes it
    assert parse_scenario(from_config, SYNTH) == groups


@pytest.mark.parametrize(
    ("scenario", "pattern"),
    [
        ("10-3", r"5 remain, which is not a multiple of 3"),
        ("16-1", r"data.categories has 15"),
        ("4x4", r"4 tasks of 4 = 16 categories, but data.categories has 15"),
        ("10-2-2", r"sizes summing to 14, but data.categories has 15"),
        ("10-1x4", r"one task of 10 then 4 tasks of 1 = 14 categories"),
        ("10-0x5", r">= 1"),
        ("10-0", r"size 0"),
        ("0x5", r">= 1"),
        ("ten-five", r"Unknown scenario 'ten-five'"),
        ("", r"Unknown scenario ''"),
    ],
)
def test_parse_scenario_bad_strings(scenario: str, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern) as info:
        parse_scenario(scenario, MVTEC_CATEGORIES)
    assert "Accepted task_groups" in str(info.value)


@pytest.mark.parametrize(
    ("groups", "pattern"),
    [
        ([["stripes", "bottle"], ["checker", "dots"]], r"Unknown category\(ies\) \['bottle'\]"),
        ([["stripes", "checker"], ["checker", "dots"]], r"\['checker'\] appear more than once"),
        ([["stripes"], ["checker"]], r"leave out \['dots'\]"),
        ([["checker", "stripes"], ["dots"]], r"reorder the categories"),
        ([["stripes"], []], r"task_groups\[1\] is empty"),
        (["stripes", ["checker", "dots"]], r"task_groups\[0\] is 'stripes', not a list"),
        ([], r"empty list"),
    ],
)
def test_parse_scenario_bad_lists(groups: list, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        parse_scenario(groups, SYNTH)


def test_parse_scenario_bad_types() -> None:
    with pytest.raises(TypeError, match="task_groups must be None, a scenario string or a list of lists"):
        parse_scenario(3, SYNTH)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than once"):
        parse_scenario(None, ["a", "a"])


def _split(name: str, n_train: int, n_test: int, has_masks: bool = True) -> CategorySplit:
    def sample(kind: str, i: int, label: int) -> Sample:
        return Sample(image_path=Path(f"/{name}/{kind}/{i}.png"), label=label, defect_type="good", mask_path=None)

    train = [sample("train", i, 0) for i in range(n_train)]
    test = [sample("test", i, i % 2) for i in range(n_test)]
    return CategorySplit(category=name, train=train, test=test, has_masks=has_masks)


def test_group_splits_counts_and_masks() -> None:
    splits = [_split("a", 3, 2), _split("b", 4, 5, has_masks=False), _split("c", 1, 1)]
    grouped = group_splits(splits, [["a", "b"], ["c"]])
    assert [g.category for g in grouped] == ["a+b", "c"]
    assert len(grouped[0].train) == 7 and len(grouped[0].test) == 7
    assert grouped[0].train == [*splits[0].train, *splits[1].train]
    assert grouped[0].test == [*splits[0].test, *splits[1].test]
    assert grouped[0].has_masks is False and grouped[1] is splits[2]
    assert group_splits(splits, [["a", "b", "c"]])[0].has_masks is False
    assert group_splits(splits[::2], [["a", "c"]])[0].has_masks is True
    with pytest.raises(ValueError, match=r"leave out \['c'\]"):
        group_splits(splits, [["a", "b"]])


# ----------------------------------------------------------------------------------------- datamodule
def test_datamodule_task_groups(synthetic_root: Path) -> None:
    dm = ContinualDataModule(synthetic_root, SYNTH, image_size=32, train_batch_size=64, task_groups="2-1")
    dm.setup()
    assert dm.task_names == ["stripes+checker", "dots"] and dm.num_tasks == 2
    assert dm.categories == SYNTH and [s.category for s in dm.category_splits] == SYNTH
    assert dm.task_categories(0) == ["stripes", "checker"] and dm.task_categories(1) == ["dots"]

    loader = dm.train_dataloader()
    parents = [s.image_path.parent for s in loader.dataset.samples]
    assert parents == [synthetic_root / "stripes/train/good"] * 12 + [synthetic_root / "checker/train/good"] * 12
    assert dm.train_sample_categories(0) == ["stripes"] * 12 + ["checker"] * 12
    assert sum(len(b["label"]) for b in loader) == 24

    test_loader = dm.test_dataloader_for(0)
    samples = test_loader.dataset.samples
    cats = dm.test_sample_categories(0)
    assert len(cats) == len(samples) == 24 and cats == ["stripes"] * 12 + ["checker"] * 12
    assert all(s.image_path.parents[2].name == c for s, c in zip(samples, cats, strict=True))
    labels = torch.cat([b["label"] for b in test_loader]).tolist()
    assert labels == [s.label for s in samples] and dm.has_masks(0)

    dm.set_task(1)
    assert len(dm.test_dataloader()) == 2 and dm.test_sample_categories(1) == ["dots"] * 12
    with pytest.raises(IndexError, match=r"out of range: there are 2 tasks .*'stripes\+checker', 'dots'"):
        dm.task_categories(2)


def test_datamodule_task_groups_explicit_and_errors(synthetic_root: Path, tmp_path: Path) -> None:
    dm = ContinualDataModule(synthetic_root, SYNTH, task_groups=[["stripes"], ["checker", "dots"]])
    assert dm.task_names == ["stripes", "checker+dots"]  # known before scanning
    assert dm.test_sample_categories(1) == ["checker"] * 12 + ["dots"] * 12
    plain = ContinualDataModule(synthetic_root, SYNTH)
    assert plain.task_names == SYNTH and plain.task_categories(2) == ["dots"]
    # Bad scenarios fail in the constructor, before any scanning (the root need not exist).
    with pytest.raises(ValueError, match="not a multiple of 2"):
        ContinualDataModule(tmp_path / "nowhere", SYNTH, task_groups="2-2")
    # With categories=None (folder source) the scenario is checked once the categories are known.
    lazy = ContinualDataModule(synthetic_root, None, source="folder", task_groups="3x1")
    assert lazy.task_names == ["checker+dots+stripes"]  # sub-folders sorted
    bad = ContinualDataModule(synthetic_root, None, source="folder", task_groups="2x2")
    with pytest.raises(ValueError, match="2 tasks of 2 = 4 categories"):
        bad.setup()
